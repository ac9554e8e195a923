import pytest

from eco_ray.data.synth import SynthConfig, write_dataset


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small generated dataset shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, SynthConfig(size=64, seed=3), {"train": 48, "val": 16}, workers=2)
    return root


@pytest.fixture(scope="session")
def tiny_derived(synth_root, tmp_path_factory):
    """A derived dataset (Step B) of a random tiny parent on the small generated dataset, made once on a
    real local Ray. A random parent scores low, so a low query threshold keeps predictions non-empty."""
    import time

    import ray
    import torch

    from eco_ray.config import load_config
    from eco_ray.context import RunContext
    from eco_ray.data import CocoPanopticDataset
    from eco_ray.derive.config import DeriveConfig
    from eco_ray.derive.run import run_derive
    from eco_ray.model.config import load_model_config
    from eco_ray.model.early_exit import EarlyExitMask2Former
    from eco_ray.model.io import save_parent

    base = tmp_path_factory.mktemp("derive")
    torch.manual_seed(0)
    ds = CocoPanopticDataset.from_root(synth_root, "train")
    cfg = load_model_config("tiny", [f"num_labels={len(ds.categories)}"])
    parent_dir = save_parent(EarlyExitMask2Former(cfg), base / "parent", extra={"categories": ds.categories.to_coco()})
    derive_cfg = load_config(DeriveConfig, overrides=[
        "chunk_size=10", "batch_size=4", f"threshold={DERIVE_THRESHOLD}", "latency_repeats=2"])
    tracking = f"sqlite:///{base}/mlflow.db"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    ctx = RunContext.create(base, tracking)
    manifest = run_derive(derive_cfg, parent=str(parent_dir), data_root=synth_root, ctx=ctx)
    first_seconds = time.perf_counter() - t0
    if started:
        ray.shutdown()
    return {"base": base, "parent_dir": parent_dir, "cfg": derive_cfg, "tracking": tracking, "manifest": manifest,
            "first_seconds": first_seconds, "root": synth_root, "ctx": ctx}


DERIVE_THRESHOLD = 0.05
