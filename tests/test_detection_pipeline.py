"""The detection pipeline end to end on a tiny config (``eco-ray pipeline --config detection``): the generator's
instance files, Step A on Ray Train, Step B on Ray tasks, the verdict, the sweep on AP, the selection registering
``eco-det-gate``, and Serve answering ``POST /v1/detect`` over real HTTP; then a rerun that reuses every stage
before the selection."""

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from cluster_stack import free_port

pytestmark = pytest.mark.slow

# the tiny detector on 64 px scenes; its validation and the table score the same first 8 val images
TINY_DETECTION = [
    "data.train_images=48", "data.val_images=16", "data.synth.size=64", "data.synth.seed=3",
    "train.model_preset=tiny", "train.model.exits=[3,6]", "train.steps=4", "train.num_workers=2",
    "train.batch_size=4", "train.warmup_steps=2", "train.eval_every=4", "train.eval_images=8",
    "train.checkpoint_every=2", "derive.max_images=8", "derive.chunk_size=3", "derive.batch_size=4",
    "derive.label_block=4", "derive.measure_latency=false", "sweep.trials=2", "sweep.concurrency=2",
    "sweep.holdout=0.25", "select.limit=1.0", "serve.requests=3",
]


def test_the_detection_pipeline_trains_derives_sweeps_selects_and_serves(tmp_path):
    import ray
    from ray import serve

    from eco_ray.config import ConfigError
    from eco_ray.context import RunContext
    from eco_ray.data.coco_instances import CocoInstancesDataset
    from eco_ray.data.collate import collate_detection
    from eco_ray.derive.table import DerivedDataset
    from eco_ray.model.early_exit_detr import EarlyExitDeformableDetr
    from eco_ray.model.io import load_parent
    from eco_ray.model.postprocess import to_detections
    from eco_ray.pipeline import Pipeline, format_summary, load_pipeline_config
    from eco_ray.tracking import resolve_model_dir

    port = free_port()
    cfg = load_pipeline_config("detection", [*TINY_DETECTION, f"serve.port={port}", f"run_dir={tmp_path}"])
    ctx = RunContext.create(tmp_path)
    lines: list[str] = []
    try:
        s = Pipeline(cfg, ctx, keep_serving=True, log=lines.append).run()
        url = s["serving"]["url"]

        # Serve: COCO detections at the image's own size, the segmenter's per-request budgets, clear errors
        ds = CocoInstancesDataset.from_root(tmp_path / "data", "val")
        body = ds.image_path(0).read_bytes()
        post = lambda path, **kw: httpx.post(f"{url}{path}", content=body, headers={"Content-Type": "image/png"},
                                             timeout=60, **kw)
        r = post("/v1/detect", params={"exit": 3, "image_id": int(ds.image_ids[0]), "min_score": 0.01})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["exit"] == 3 and (out["height"], out["width"]) == (64, 64) and out["request_id"]
        names = {c["id"]: c["name"] for c in ds.categories}
        for d in out["detections"]:
            assert d["image_id"] == int(ds.image_ids[0]) and names[d["category_id"]] == d["category"]
            assert d["score"] >= 0.01 and len(d["bbox"]) == 4
        assert post("/v1/detect", params={"max_gflops": 1e-9}).json()["target"]["met"] is False
        for path, params, status, says in (("/v1/detect", {"min_score": 2}, 422, "min_score"),
                                           ("/v1/detect", {"exit": 4}, 422, "not one of the model's exits"),
                                           ("/v1/segment", {}, 404, "POST /v1/detect")):
            r = post(path, params=params)
            assert r.status_code == status and says in r.json()["error"], (path, r.text)
        assert httpx.get(f"{url}/v1/models", timeout=30).json()["route"] == "/v1/detect"
    finally:
        serve.shutdown()
        ray.shutdown()

    # the summary, in AP
    assert s["task"] == "detection" and s["metric"] == "ap" and "ap_lost" in s
    assert {"ap", "ap50", "ap75"} <= set(s["static_full_depth"]) and s["static_full_depth"]["exit"] == 6
    assert s["serving"]["route"] == "/v1/detect" and s["serving"]["requests"] == 3
    assert s["serving"]["full_depth_check"]["exit"] == 6 and all(n > 0 for n in s["serving"]["detections_per_image"])
    assert s["diagnosis"]["verdict"] and "AP" in format_summary(s) and "PQ" not in format_summary(s)
    assert s["selection"]["model_uri"] == "models:/eco-det-gate@production"

    # Step A: the detector registered under its own name, loading as one, its losses and plot in MLflow
    state = json.loads((tmp_path / "pipeline" / "detection" / "state.json").read_text())
    train = state["train"]["output"]
    assert train["model_uri"] == "models:/eco-det-parent/1" and set(train["val_ap_per_exit"]) == {"3", "6"}
    client = MlflowClient(ctx.tracking_uri)
    assert len(client.get_metric_history(train["run_id"], "loss_exit6")) == 4
    assert {"parent", "ap_per_exit.png"} <= {a.path for a in client.list_artifacts(train["run_id"])}
    model, meta = load_parent(resolve_model_dir(train["model_uri"], ctx.tracking_uri), task="detection")
    assert isinstance(model, EarlyExitDeformableDetr) and meta["categories"] == ds.categories
    batch = collate_detection([ds[0], ds[1]], ds.labels, model.config.image_size)
    with torch.no_grad():
        dets = to_detections(model.forward_per_image(batch["pixel_values"], [3, 6]), ds.category_ids, batch["sizes"])
    pairs = model.config.num_queries * len(ds.categories)  # (query, class) pairs, of which COCO keeps 100
    assert [len(d) for d in dets] == [min(100, pairs)] * 2

    # Step B: the table's AP per exit is the validation's on the same images; its labels and MLflow run
    derived = state["derive"]["output"]
    table = DerivedDataset.open(derived["path"])
    val = table.split("val")
    assert table.manifest["task"] == "detection" and table.exits == [3, 6] and len(val) == 8
    for k in (3, 6):
        assert table.static("val")[k]["ap"] == pytest.approx(train["val_ap_per_exit"][str(k)], abs=1e-6)
    assert val.labels["dap"].shape == (8, 2, 2) and np.all(val.labels["dap"][:, :, -1] == 0)
    assert {"val_ap_exit3", "val_ap50_exit6"} <= set(client.get_run(derived["mlflow_run_id"]).data.metrics)

    # Step C: the trials scored on AP over the detection labels
    sweep = state["sweep"]["output"]
    assert sweep["complete"] == 2 and sweep["failed"] == 0
    results = [json.loads(f.read_text()) for f in Path(sweep["path"]).glob("trials/*/result.json")]
    assert len(results) == 2 and all("ap" in r["metrics"] and "pq" not in r["metrics"]
                                     and r["params"]["quality"] in ("dap", "ap") for r in results)

    # resubmitted from the selection: everything before it reused, a new gate version registered
    lines.clear()
    again = Pipeline(load_pipeline_config("detection", [*TINY_DETECTION, "serve.requests=0", f"run_dir={tmp_path}"]),
                     ctx, from_stage="select", log=lines.append).run()
    for stage in ("data", "train", "derive", "sweep"):
        assert f"[pipeline] {stage}: reused" in "\n".join(lines), stage
    assert again["eco_selected"] == s["eco_selected"] and again["serving"] is None
    assert sorted(str(v.version) for v in client.search_model_versions("name='eco-det-gate'")) == ["1", "2"]
    with pytest.raises(ConfigError, match="task"):
        load_pipeline_config("detection", ["train.task=keypoints"])
    from eco_ray.budget import Budget
    from eco_ray.derive.config import DeriveConfig
    from eco_ray.derive.run import run_derive
    from eco_ray.sweep import select
    from eco_ray.tracking import RegistryError

    with pytest.raises(RegistryError, match="use min_ap"):  # a detector's sweep has no PQ to hold to
        select(sweep["name"], Budget.named("min_pq", 0.0), ctx=ctx)
    with pytest.raises(ConfigError, match="data_root="):
        run_derive(DeriveConfig(), parent=train["model_uri"], data_root=tmp_path / "nowhere", ctx=ctx)
