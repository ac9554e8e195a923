"""Joining or starting the Ray cluster the same way from every stage."""

from __future__ import annotations

import logging
import os

# Ray Train V2's placement-group cleaner asks the State API (served by the dashboard) once a second whether
# the train controller still lives; with the dashboard off, as in the embedded default, every check logs
# this warning: about a thousand lines in a 30-minute training. The cleaner keeps working without it.
_KNOWN_NOISE = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def setup_worker_process() -> None:
    """Runs in every Ray worker process of our jobs (runtime_env ``worker_process_setup_hook``).

    RAY_ADDRESS: the State API finds "its" cluster through RAY_ADDRESS, else through the newest local
    cluster on the machine. Without it, a second local Ray with a dashboard (another user's, a test's)
    makes the cleaner look up our controller there, find nothing, take it for dead and remove the training's
    placement group: the workers are killed and Ray Train restarts the run from its last checkpoint.
    Pinning the worker's own cluster makes that lookup ask the right GCS.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    for name in _KNOWN_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(address: str | None = None, log_to_driver: bool = True, **init_kwargs) -> None:
    """``ray.init`` unless Ray is up already: a local cluster, or ``address`` (``auto``, ``ray://...``).
    ``init_kwargs`` go to ``ray.init`` (tests size their local cluster with ``num_cpus``)."""
    import ray  # lazily: the CLI checks its inputs before paying for Ray's import

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver,
             runtime_env={"worker_process_setup_hook": "eco_ray.cluster.setup_worker_process"}, **init_kwargs)
