"""eco-ray: ECO-M2F early-exit Mask2Former (and Deformable DETR) as a Ray pipeline.

The public API (imported lazily, so ``import eco_ray`` is cheap); everything else is internal:

    RunContext                          where a job runs (run_dir, MLflow, Ray, experiment)
    PipelineConfig, load_pipeline_config, Pipeline    the main job
    TrainConfig, DetectionTrainConfig, run_training, resume_training     Step A (segmenter, detector)
    DeriveConfig, run_derive, DerivedDataset          Step B
    diagnose, diagnose_table, Diagnosis               will a gate pay off on this table?
    GateConfig, fit_and_evaluate, run_gate            Step C
    SweepConfig, run_sweep, resume_sweep, select      the sweep and selection under a Budget
    Budget, choose                                    the one budget type and the one decision rule
    EarlyExitMask2Former, EarlyExitDeformableDetr, load_parent, load_gate    models
    get_task                                          the task axis (panoptic, detection)
    Engine, load_engine                               the serving engine (Ray-free)
    EcoRayError                                       every error reported as a message
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "RunContext": "eco_ray.context", "Budget": "eco_ray.budget", "choose": "eco_ray.tradeoff",
    "EcoRayError": "eco_ray.errors", "OperatingPoint": "eco_ray.results",
    "PipelineConfig": "eco_ray.pipeline", "load_pipeline_config": "eco_ray.pipeline", "Pipeline": "eco_ray.pipeline",
    "TrainConfig": "eco_ray.train.config", "DetectionTrainConfig": "eco_ray.train.config", "run_training": "eco_ray.train.ray_train",
    "resume_training": "eco_ray.train.ray_train",
    "DeriveConfig": "eco_ray.derive.config", "run_derive": "eco_ray.derive.run", "DerivedDataset": "eco_ray.derive.table",
    "diagnose": "eco_ray.diagnose", "diagnose_table": "eco_ray.diagnose", "Diagnosis": "eco_ray.diagnose",
    "GateConfig": "eco_ray.gate.config", "fit_and_evaluate": "eco_ray.gate.evaluate", "run_gate": "eco_ray.gate.run",
    "SweepConfig": "eco_ray.sweep", "run_sweep": "eco_ray.sweep", "resume_sweep": "eco_ray.sweep",
    "select": "eco_ray.sweep",
    "EarlyExitMask2Former": "eco_ray.model.early_exit", "EarlyExitDeformableDetr": "eco_ray.model.early_exit_detr",
    "get_task": "eco_ray.tasks", "load_parent": "eco_ray.model.io",
    "load_gate": "eco_ray.model.io", "Engine": "eco_ray.serve.engine", "load_engine": "eco_ray.serve.engine",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eco_ray' has no attribute {name!r}")
