"""Will adaptive depth pay off on this data? A verdict from the derived table, before any sweep.

    from eco_ray.diagnose import diagnose, diagnose_table, Diagnosis
"""

from eco_ray.diagnose.verdict import SCHEMA_VERSION, VERDICTS, DiagnoseError, Diagnosis, Lead, Probe, diagnose

__all__ = ["SCHEMA_VERSION", "VERDICTS", "DiagnoseError", "Diagnosis", "Lead", "Probe", "diagnose", "diagnose_table"]


def diagnose_table(*args, **kwargs):
    """See eco_ray.diagnose.run.diagnose_table (the table, the files, MLflow)."""
    from eco_ray.diagnose.run import diagnose_table as run

    return run(*args, **kwargs)
