"""``eco-ray pipeline``: data -> train -> derive (+ diagnose) -> sweep -> select -> serve, each stage reused
when its inputs repeat.

    from eco_ray.pipeline import Pipeline, PipelineConfig, load_pipeline_config
"""

from eco_ray.pipeline.config import STAGES, PipelineConfig, load_pipeline_config
from eco_ray.pipeline.run import Pipeline
from eco_ray.pipeline.summary import format_summary

__all__ = ["STAGES", "Pipeline", "PipelineConfig", "format_summary", "load_pipeline_config"]
