"""Step A on a real local Ray cluster: 2 CPU workers, the tiny config, a few steps; MLflow on SQLite."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from eco_ray.cluster import init_ray
from eco_ray.config import ConfigError
from eco_ray.context import RunContext
from eco_ray.data import CocoPanopticDataset, collate_panoptic
from eco_ray.model.io import load_parent
from eco_ray.model.postprocess import to_panoptic
from eco_ray.tracking import resolve_model_dir
from eco_ray.train.config import load_train_config

pytestmark = pytest.mark.slow


def tiny_config(*extra):
    return load_train_config(overrides=[
        "model_preset=tiny", "batch_size=4", "num_workers=2", "warmup_steps=2", "eval_images=8", *extra])


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    init_ray(num_cpus=4, log_to_driver=False)  # as the CLI starts it: with our worker setup hook
    yield ray
    ray.shutdown()


def test_bad_config_or_data_fails_before_ray_starts(tmp_path):
    import ray

    from eco_ray.train.ray_train import run_training

    with pytest.raises(ConfigError, match="steps"):
        load_train_config(overrides=["steps=0"])
    with pytest.raises(ConfigError, match="--data-root"):  # no longer a setting: the flag names it
        load_train_config(overrides=[f"data_root={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="nope"):
        run_training(load_train_config(), data_root=tmp_path / "nope", ctx=RunContext.create(tmp_path))
    assert not ray.is_initialized()


def test_a_missing_pretrained_directory_fails_before_ray_starts(synth_root, tmp_path):
    import ray

    from eco_ray.train.ray_train import run_training

    cfg = tiny_config(f"model.pretrained={tmp_path / 'no-such-model'}")
    with pytest.raises(ConfigError, match="no-such-model"):
        run_training(cfg, data_root=synth_root, ctx=RunContext.create(tmp_path))
    assert not ray.is_initialized()


def test_a_detection_config_is_the_detectors_and_says_what_is_wrong():
    from eco_ray.model.config import DetectionModelConfig
    from eco_ray.train.config import DetectionTrainConfig

    cfg = load_train_config(overrides=["task=detection"])
    assert isinstance(cfg, DetectionTrainConfig) and isinstance(cfg.model, DetectionModelConfig)
    assert cfg.registered_model == "eco-det-parent" and cfg.model.name == "small" and cfg.model.num_queries == 50
    with pytest.raises(ConfigError, match="not one of the detection presets"):
        load_train_config(overrides=["task=detection", "model_preset=swin-t"])
    with pytest.raises(ConfigError, match="'task'"):
        load_train_config(overrides=["task=keypoints"])
    from eco_ray.pipeline.config import load_pipeline_config

    # the pipeline's train section is the detector's, its state apart from the segmenter's
    pipe = load_pipeline_config(None, ["train.task=detection"])
    assert isinstance(pipe.train, DetectionTrainConfig) and pipe.name == "detection"
    with pytest.raises(ConfigError, match="not one of the detection presets"):
        load_pipeline_config(None, ["train.task=detection", "train.model_preset=swin-t"])


def test_workers_know_their_own_cluster_and_skip_the_known_noise(ray_cluster):
    """Ray's State API otherwise looks up the newest local cluster, which need not be ours (eco_ray/cluster.py)."""
    import logging

    @ray_cluster.remote
    def probe():
        cleaner = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
        return os.environ.get("RAY_ADDRESS"), cleaner.getEffectiveLevel()

    address, level = ray_cluster.get(probe.remote())
    assert address == ray_cluster.get_runtime_context().gcs_address
    assert level == logging.ERROR


def test_training_registers_a_parent_that_loads_and_predicts(ray_cluster, synth_root, tmp_path, monkeypatch):
    """Exits short of the last encoder layer, trained deepest-plus-one: no step reaches the layers past the last
    exit, so DDP must look for unused parameters (the default exits train in tests/test_multinode.py's job)."""
    from eco_ray.train.ray_train import run_training

    monkeypatch.chdir(synth_root.parent)  # relative paths, as a user types them, must reach the workers
    cfg = tiny_config("steps=6", "checkpoint_every=2", "eval_every=6", "exit_sampling=deepest_plus_one",
                      "model.exits=[2,4]")
    ctx = RunContext.create(tmp_path)
    summary = run_training(cfg, data_root=synth_root.name, ctx=ctx, name="t1")
    assert summary["steps"] == 6 and summary["model_uri"] == "models:/eco-parent/1"
    assert set(summary["val_pq_per_exit"]) == {2, 4}
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.data.params["model.name"] == "tiny" and run.data.tags["data_hash"]
    assert len(client.get_metric_history(summary["run_id"], "loss")) == 6  # one per step
    version = client.get_model_version("eco-parent", "1")
    assert version.tags["data_hash"] == run.data.tags["data_hash"] and version.tags["config_hash"]
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"parent", "pq_per_exit.png"} <= artifacts

    model, meta = load_parent(resolve_model_dir("models:/eco-parent/1", summary["tracking_uri"]))
    ds = CocoPanopticDataset.from_root(synth_root, "val")
    batch = collate_panoptic([ds[0], ds[1]], ds.categories)
    with torch.no_grad():
        out = model.forward_per_image(batch["pixel_values"], [2, 4])
    preds = to_panoptic(out, ds.categories, (64, 64), threshold=0.0)
    assert all(p[0].shape == (64, 64) for p in preds) and meta["data_hash"] == run.data.tags["data_hash"]
    # a second run may not silently reuse the name
    with pytest.raises(ConfigError, match="exists already"):
        run_training(cfg, data_root=synth_root.name, ctx=ctx, name="t1")


def test_training_starts_from_a_users_transformers_checkpoint_with_other_labels(ray_cluster, synth_root, tmp_path):
    """A user's own Mask2Former (saved with save_pretrained, 3 labels) -> Step A on this data's 9 categories
    (the class head re-initialised, every other weight loaded: with a vanishing learning rate they come out
    of training as they went in) -> Step B and a gate on the trained parent."""
    from eco_ray.derive.config import DeriveConfig
    from eco_ray.derive.run import run_derive
    from eco_ray.gate.config import GateConfig
    from eco_ray.gate.run import run_gate
    from eco_ray.model.config import load_model_config
    from eco_ray.model.early_exit import EarlyExitMask2Former
    from eco_ray.train.ray_train import run_training

    torch.manual_seed(1)
    user = EarlyExitMask2Former(load_model_config("tiny", ["num_labels=3"])).m2f
    user.save_pretrained(tmp_path / "hf")
    cfg = tiny_config("steps=2", "checkpoint_every=2", "eval_every=2", "lr=1e-12", "warmup_steps=0",
                      f"model.pretrained={tmp_path / 'hf'}")
    ctx = RunContext.create(tmp_path)
    summary = run_training(cfg, data_root=synth_root, ctx=ctx, name="from-hf")
    parent, meta = load_parent(resolve_model_dir(summary["model_uri"], summary["tracking_uri"]))
    categories = CocoPanopticDataset.from_root(synth_root, "train").categories
    trained = dict(parent.m2f.named_parameters())
    loaded = 0
    for name, value in user.named_parameters():
        if name.startswith("class_predictor"):
            assert trained[name].shape[0] == len(categories) + 1 != value.shape[0]
            continue
        torch.testing.assert_close(trained[name], value, atol=1e-8, rtol=0, msg=name)
        loaded += 1
    assert loaded > 100 and meta["model"]["pretrained"] == str(tmp_path / "hf")
    derive = run_derive(DeriveConfig(max_images=8, views=["plain"], measure_latency=False, batch_size=4),
                        parent=summary["model_uri"], data_root=synth_root, ctx=ctx)
    gate = run_gate(derive["path"], GateConfig(epochs=5), [0.1], ctx=ctx, out=str(tmp_path / "gate"), name="hf-gate")
    assert gate.path and (tmp_path / "gate").is_dir()


def _latest_checkpoint_step(storage: Path) -> int:
    steps = [json.loads(p.read_text())["step"] for p in storage.rglob("state.json")]
    return max(steps, default=0)


def test_resume_after_the_driver_is_killed(synth_root, tmp_path):
    args = ["--data-root", str(synth_root), "--set", "model_preset=tiny", "--run-dir", str(tmp_path),
            "--set", "batch_size=4", "--set", "steps=30", "--set", "checkpoint_every=10", "--set", "eval_every=30",
            "--set", "eval_images=8", "--set", "warmup_steps=2"]
    driver = subprocess.Popen([sys.executable, "-m", "eco_ray.cli", "train", "--name", "drv", *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    storage = tmp_path / "ray" / "drv"
    deadline = time.time() + 240
    while _latest_checkpoint_step(storage) < 20 and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    stopped_after = _latest_checkpoint_step(storage)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local cluster it started
    driver.wait()
    assert 20 <= stopped_after < 30, "the driver must be stopped mid-way"
    run = json.loads((tmp_path / "train" / "drv" / "run.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "eco_ray.cli", "train", "--resume", "drv", "--run-dir", str(tmp_path),
                           "--json"], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["run_id"] == run["run_id"] and summary["steps"] == 30  # the same MLflow run, continued
    client = MlflowClient(summary["tracking_uri"])
    resumed = [m.value for m in client.get_metric_history(summary["run_id"], "resumed_from_step")]
    assert resumed and min(resumed) >= stopped_after - 10 and min(resumed) > 0
