"""Step A on a real local Ray cluster: 2 CPU workers, the tiny config, a few steps; MLflow on SQLite."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from eco_ray.cluster import init_ray
from eco_ray.config import ConfigError
from eco_ray.context import RunContext
from eco_ray.data import CocoPanopticDataset, collate_panoptic
from eco_ray.model.io import load_parent
from eco_ray.model.postprocess import to_panoptic
from eco_ray.tracking import RegistryError, resolve_model_dir
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
    with pytest.raises(ConfigError, match="the pipeline runs the panoptic task"):
        from eco_ray.pipeline.config import load_pipeline_config

        load_pipeline_config(None, ["train.task=detection"])


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



def test_a_detector_trains_registers_and_derives_its_table(ray_cluster, synth_root, tmp_path):
    """Step A for detection: the same Ray Train loop, the task's batches, loss and validation (COCO AP), the
    detector registered under its own name and loading as one. Then Step B from the registry on the same Ray
    (the table's AP per exit is the validation's on the same images) and the verdict on it."""
    from eco_ray.data.coco_instances import CocoInstancesDataset
    from eco_ray.data.collate import collate_detection
    from eco_ray.model.early_exit_detr import EarlyExitDeformableDetr
    from eco_ray.model.postprocess import to_detections
    from eco_ray.train.ray_train import run_training

    cfg = load_train_config(overrides=["task=detection", "model_preset=tiny", "batch_size=4", "num_workers=2",
                                       "warmup_steps=2", "eval_images=8", "steps=4", "checkpoint_every=2",
                                       "eval_every=4", "exit_sampling=deepest_plus_one", "model.exits=[3,6]"])
    summary = run_training(cfg, data_root=synth_root, ctx=RunContext.create(tmp_path), name="det")
    assert summary["model_uri"] == "models:/eco-det-parent/1" and summary["task"] == "detection"
    assert set(summary["val_ap_per_exit"]) == {3, 6} and all(0 <= v <= 1 for v in summary["val_ap_per_exit"].values())
    client = MlflowClient(summary["tracking_uri"])
    assert len(client.get_metric_history(summary["run_id"], "loss_exit6")) == 4
    assert {"parent", "ap_per_exit.png"} <= {a.path for a in client.list_artifacts(summary["run_id"])}
    model, meta = load_parent(resolve_model_dir(summary["model_uri"], summary["tracking_uri"]), task="detection")
    ds = CocoInstancesDataset.from_root(synth_root, "val")
    assert isinstance(model, EarlyExitDeformableDetr) and meta["categories"] == ds.categories
    batch = collate_detection([ds[0], ds[1]], ds.labels, model.config.image_size)
    with torch.no_grad():
        dets = to_detections(model.forward_per_image(batch["pixel_values"], [3, 6]), ds.category_ids, batch["sizes"])
    assert [len(d) for d in dets] == [100, 100]

    from eco_ray.config import load_config
    from eco_ray.derive.config import DeriveConfig
    from eco_ray.derive.run import run_derive
    from eco_ray.derive.table import DerivedDataset
    from eco_ray.diagnose.run import diagnose_table

    ctx = RunContext.create(tmp_path, summary["tracking_uri"])
    derive_cfg = load_config(DeriveConfig, overrides=["max_images=8", "chunk_size=3", "batch_size=4",
                                                      "label_block=4", "measure_latency=false"])
    manifest = run_derive(derive_cfg, parent=summary["model_uri"], data_root=synth_root, ctx=ctx)
    table = DerivedDataset.open(manifest["path"])
    val = table.split("val")
    assert manifest["task"] == "detection" and table.exits == [3, 6] and len(val) == 8
    for k in (3, 6):  # the validation scored the same first 8 images at each exit
        assert table.static("val")[k]["ap"] == pytest.approx(summary["val_ap_per_exit"][k], abs=1e-6)
    assert val.labels["dap"].shape == (8, 2, 2) and np.all(val.labels["dap"][:, :, -1] == 0)
    runs = client.search_runs([client.get_run(manifest["mlflow_run_id"]).info.experiment_id],
                              f"attributes.run_id = '{manifest['mlflow_run_id']}'")
    assert {"val_ap_exit3", "val_ap50_exit6"} <= set(runs[0].data.metrics)
    again = run_derive(derive_cfg, parent=summary["model_uri"], data_root=synth_root, ctx=ctx)
    assert again["reused"] and again["key"] == manifest["key"]
    d, plot = diagnose_table(manifest["path"], ctx, resamples=50)
    assert d.metric == "ap" and plot.is_file() and len(d.cross_view_oracle) == 3

    # Step C: a sweep over the table samples the detection labels, scores its trials on AP, and the selection
    # registers the chosen gate as a detector's
    from eco_ray.sweep import SweepConfig, run_sweep, select
    from eco_ray.budget import Budget

    s = run_sweep(load_config(SweepConfig, overrides=["trials=2", "concurrency=2", "holdout=0.25"]),
                  derived=manifest["path"], ctx=ctx, name="det-sweep")
    assert s.metric == "ap" and s.complete == 2 and s.failed == 0
    assert all("ap" in t.metrics and "pq" not in t.metrics and t.params["quality"] in ("dap", "ap") for t in s.trials)
    chosen = select("det-sweep", Budget.named("min_ap", 0.0), ctx=ctx)
    assert chosen.registered_model == "eco-det-gate" and chosen.model_uri == "models:/eco-det-gate@production"
    with pytest.raises(RegistryError, match="use min_ap"):
        select("det-sweep", Budget.named("min_pq", 0.0), ctx=ctx)
    with pytest.raises(ConfigError, match="data_root="):
        run_derive(derive_cfg, parent=summary["model_uri"], data_root=tmp_path / "nowhere", ctx=ctx)
