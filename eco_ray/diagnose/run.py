"""``eco-ray diagnose``: the verdict on a derived table, written beside it and logged to its MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

from eco_ray.context import RunContext
from eco_ray.derive.table import DerivedDataError, open_derived, relative_costs
from eco_ray.diagnose.verdict import DEFAULT_BETAS, DiagnoseError, Diagnosis, diagnose


def gate_choice_on(ds, split, gate_dir: str | Path) -> tuple:
    """The exits a saved gate picks on ``split`` (its own cost measure and beta), and a label for it."""
    from eco_ray.model.gates import decide
    from eco_ray.model.io import load_gate

    gate, meta = load_gate(gate_dir)
    if meta.get("task", "panoptic") != ds.task:
        raise DiagnoseError(f"the gate in {gate_dir} was fitted on a {meta.get('task', 'panoptic')} table; this is "
                            f"a {ds.task} table")
    if list(gate.exits) != list(ds.exits):
        raise DiagnoseError(f"the gate in {gate_dir} has exits {gate.exits}, the table {ds.exits}")
    rel = relative_costs(ds.costs(meta.get("cost", "gflops")))
    return decide(gate, split.gate_features, rel, float(meta.get("beta", 0.0))), f"{gate.kind}, beta {meta.get('beta')}"


def diagnose_table(derived: str | Path, ctx: RunContext, *, split: str = "val", probe_split: str | None = "train",
                   gate: str | Path | None = None, betas=DEFAULT_BETAS, resamples: int = 1000, seed: int = 0,
                   min_lead: float = 0.005, out_dir: str | Path | None = None, log_to_mlflow: bool = True,
                   exits: list[int] | None = None) -> tuple[Diagnosis, Path]:
    """Diagnose ``split`` of a derived table (probe cross-validated on ``probe_split`` when the table has it),
    optionally with a saved gate (a directory or a models:/ URI); write ``diagnosis.json`` and
    ``diagnosis.png`` into ``out_dir`` (default: the table's directory) and log both to the table's MLflow
    run. ``exits`` judges on a subset of the table's exits (no gate then). Returns (the diagnosis, the plot)."""
    from eco_ray.plots import plot_diagnosis

    ds = open_derived(str(derived), ctx.tracking_uri)
    try:
        target = ds.split(split)
        probe = ds.split(probe_split) if probe_split and probe_split in ds.split_names else None
        costs = ds.costs("gflops")
        if exits:
            if gate is not None:
                raise DiagnoseError("--exits and --gate do not go together: a gate decides among all its exits")
            target, probe = target.with_exits(exits), probe.with_exits(exits) if probe is not None else None
            costs = costs[[ds.exits.index(k) for k in exits]]
    except DerivedDataError as e:
        raise DiagnoseError(str(e)) from None
    for s in (target, probe):
        if s is not None and s.gate_features.shape[0] != len(s):
            raise DiagnoseError(f"{ds.root}: split {s.split!r} has {s.gate_features.shape[0]} gate inputs for "
                                f"{len(s)} images")
    choice, label = (None, None)
    if gate is not None:
        from eco_ray.tracking import resolve_model_dir

        choice, label = gate_choice_on(ds, target, resolve_model_dir(str(gate), ctx.tracking_uri))
    d = diagnose(target, ds.categories, costs, probe_split=probe, betas=betas, resamples=resamples,
                 seed=seed, gate_choice=choice, gate_source=label, min_lead=min_lead)
    d.extra = {"derived": str(ds.root), "derived_key": ds.manifest.get("key"), "gate": str(gate) if gate else None}
    out = Path(out_dir) if out_dir else ds.root
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(d.to_json(), indent=2))
    plot = plot_diagnosis(d, out / "diagnosis.png", title=f"{ds.manifest.get('parent', {}).get('uri', '')}")
    run_id = ds.manifest.get("mlflow_run_id")
    if log_to_mlflow and run_id:
        _log(ctx, run_id, out, d)
    return d, plot


def _log(ctx: RunContext, run_id: str, out: Path, d: Diagnosis) -> None:
    from mlflow.exceptions import MlflowException

    tracker = ctx.tracker()
    try:
        best = d.cross_view_oracle_lead
        tracker.log_artifact(run_id, out / "diagnosis.json", "diagnose")
        tracker.log_artifact(run_id, out / "diagnosis.png", "diagnose")
        tracker.log_metrics(run_id, {"diagnose_cross_view_oracle_lead": best.lead,
                                     "diagnose_label_noise_share": d.label_noise_share})
        tracker.set_tags(run_id, {"diagnose_verdict": d.verdict})
    except MlflowException:  # the table's run lives in another store: the files beside the table remain
        pass
