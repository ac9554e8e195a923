"""The derived table of a detector (Ray-free): chunks assembled, labels, storage, parts, and the verdict on it."""

import json
from pathlib import Path

import numpy as np
import pytest

from eco_ray.derive import _detection
from eco_ray.derive.table import DerivedDataset, write_manifest, write_split
from eco_ray.diagnose.verdict import VERDICTS, diagnose
from eco_ray.metrics.detection import DetectionRecords, match_images
from eco_ray.testing.coco_scene import random_detection_scene

EXITS = [2, 4, 6]


def _chunk(gt, per_exit, ids, kinds):
    """What DetectionTask.derive_part returns for the images ``ids`` (two views: the detectors of the exits,
    and the same detectors in another order as the 'mirror')."""
    mirror = per_exit[1:] + per_exit[:1]
    views = [{k: match_images(gt, dets, image_ids=ids) for k, dets in zip(EXITS, v)} for v in (per_exit, mirror)]
    rng = np.random.default_rng(ids[0])
    return {"image_ids": np.asarray(ids), "exits": EXITS, "records": DetectionRecords.from_matches(views),
            "gate_features": rng.normal(size=(len(ids), 8)).astype(np.float32), "kinds": [kinds[i] for i in ids],
            "num_objects": [int(i % 3) for i in ids]}


@pytest.fixture(scope="module")
def scene():
    gt, per_exit = random_detection_scene(31, n_images=30, n_exits=3)
    ids = [im["id"] for im in gt["images"]]
    kinds = {i: ("near" if n % 2 else "far") for n, i in enumerate(ids)}
    order = ids[::-1]  # chunks arrive in any order, their images in dataset order
    parts = [_chunk(gt, per_exit, order[s:s + 7], kinds) for s in range(0, 30, 7)]
    return gt, per_exit, ids, _detection.assemble("val", parts, ["plain", "flip"], label_block=10)


def test_chunks_assemble_by_image_id_with_their_labels(scene):
    gt, per_exit, ids, split = scene
    assert split.image_ids.tolist() == sorted(ids) and split.exits == EXITS and len(split) == 30
    whole = DetectionRecords.from_matches([{k: match_images(gt, dets) for k, dets in zip(EXITS, per_exit)}])
    choice = np.random.default_rng(0).integers(0, 3, 30)
    assert split.summary_of(choice)["ap"] == pytest.approx(whole.ap(choice)["AP"], abs=1e-12)
    assert np.array_equal(split.labels["ap"], split.records.per_image_ap())
    assert np.array_equal(split.labels["dap"], split.records.contributions(10))
    calls = []

    def mapped(fn, items):  # what Step B passes: the blocks run as Ray tasks
        calls.append(len(items))
        return [fn(*args) for args in items]

    again = _detection.assemble("val", [_chunk(gt, per_exit, sorted(ids), {i: "" for i in ids})], ["plain", "flip"],
                                label_block=10, map_blocks=mapped)
    assert calls == [3] and np.array_equal(again.labels["dap"], split.labels["dap"])
    assert split.quality_of("dap").shape == (30, 3) and np.array_equal(split.quality_per_view, split.labels["dap"])
    assert split.kinds[0] == ("near" if sorted(ids).index(split.image_ids[0]) % 2 else "far")
    with pytest.raises(ValueError, match="quality must be one of"):
        split.quality_of("pq")


def test_a_detection_table_round_trips_and_splits_into_parts(scene, tmp_path):
    _, _, _, split = scene
    write_split(tmp_path, split)
    write_manifest(tmp_path, {"task": "detection", "exits": EXITS, "splits": {"val": {}}, "categories": [],
                              "costs": {"exits": [{"exit": k, "encoder_gflops": 0.1 * k} for k in EXITS]}})
    ds = DerivedDataset.open(tmp_path)
    again = ds.split("val")
    assert ds.task == "detection" and isinstance(again, _detection.DetectionSplit)
    assert sorted(p.name for p in tmp_path.glob("val.*.arrow")) == ["val.detections.arrow", "val.images.arrow",
                                                                      "val.truth.arrow"]
    choice = np.random.default_rng(1).integers(0, 3, 30)
    assert again.summary_of(choice) == split.summary_of(choice)
    for name in ("ap", "dap"):
        assert np.array_equal(again.labels[name], split.labels[name])
    assert np.array_equal(again.gate_features, split.gate_features) and again.label_block == 10
    fit, held = again.hold_out(0.3)
    assert len(fit) + len(held) == 30 and set(fit.image_ids).isdisjoint(held.image_ids)
    mask = np.isin(again.image_ids, held.image_ids)
    assert np.array_equal(held.labels["dap"], again.labels["dap"][mask])
    assert held.summary_of(choice[mask])["ap"] == pytest.approx(again.summary_of(choice, images=mask)["ap"], abs=1e-12)
    shallow = again.with_exits([2, 4])  # a new deepest exit: the contribution is measured from it again
    assert np.array_equal(shallow.labels["dap"], again.records.with_exits([2, 4]).contributions(10))
    assert np.array_equal(again.with_exits([4, 6]).labels["dap"], again.labels["dap"][..., 1:])


def test_the_verdict_on_a_detection_table_is_judged_on_ap_with_intervals(scene):
    _, _, _, split = scene
    costs = [0.05, 0.1, 0.15]
    gate = np.random.default_rng(2).integers(0, 3, 30)
    d = diagnose(split, None, costs, betas=(0.05, 0.3), resamples=200, seed=0, gate_choice=gate, gate_source="random")
    assert d.metric == "ap" and d.verdict in VERDICTS
    static = split.static_summaries()
    assert [r["ap"] for r in d.static] == [static[k]["ap"] for k in EXITS]
    assert set(d.static[0]) == {"exit", "ap", "ap50", "ap75", "encoder_gflops_mean"}
    for lead in d.cross_view_oracle + d.oracle + [d.gate]:
        lo, hi = lead.lead_ci95
        assert lo <= lead.lead <= hi and lo < hi  # the bootstrap spreads, around the full-sample figure
        assert sum(lead.exit_histogram.values()) == 30
    assert d.gate.quality == pytest.approx(split.summary_of(gate)["ap"], abs=1e-12)
    cost = float(np.asarray(costs)[gate].mean())
    assert d.gate.encoder_gflops_mean == pytest.approx(cost)
    assert d.gate.static_at_cost == pytest.approx(np.interp(cost, costs, [r["ap"] for r in d.static]))
    # the usual oracle picks on the view it is scored on: it leads the cross-view one
    assert max(p.lead for p in d.oracle) >= max(p.lead for p in d.cross_view_oracle)
    assert set(d.per_kind_by_exit) == {"near", "far"}
    near = split.kinds == "near"
    assert d.per_kind_by_exit["near"][6] == pytest.approx(split.summary_of(np.full(30, 2), images=near)["ap"])


def test_gates_fit_and_evaluate_on_a_detection_table_in_ap(scene, tmp_path):
    """Step C on a detector's table: the gate learns from the default label (dap) and every point is COCO AP,
    exact, beside static depth and the oracle; `eco-ray gate` logs it to a real MLflow store."""
    from eco_ray.context import RunContext
    from eco_ray.gate.config import GateConfig
    from eco_ray.gate.evaluate import fit_and_evaluate
    from eco_ray.gate.run import run_gate
    from eco_ray.cli import format as fmt
    from eco_ray.model.gates import decide
    from eco_ray.tradeoff import choose

    _, _, _, split = scene
    half = np.arange(len(split)) % 2 == 0
    (tmp_path / "t").mkdir()
    for name, mask in (("train", half), ("val", ~half)):
        write_split(tmp_path / "t", split.subset(mask, name))
    costs = [0.05, 0.1, 0.15]
    write_manifest(tmp_path / "t", {
        "key": "k", "task": "detection", "exits": EXITS, "parent": {"uri": "p"}, "views": ["plain", "flip"],
        "categories": [{"id": 1, "name": "c0"}], "splits": {"train": {}, "val": {}},
        "costs": {"exits": [{"exit": k, "encoder_gflops": c} for k, c in zip(EXITS, costs)]}})
    ds = DerivedDataset.open(tmp_path / "t")
    val = ds.split("val")
    fit = fit_and_evaluate(ds, GateConfig(kind="quality", epochs=50), [0.05, 0.3])
    assert [p.metric for p in fit.static] == ["ap"] * 3 and [p.exit for p in fit.static] == EXITS
    assert [p.ap for p in fit.static] == [val.static_summaries()[k]["ap"] for k in EXITS]
    rel = np.asarray(costs) / costs[-1]
    for e in fit.evaluations:
        choice = decide(fit.gate_for(e.beta), val.gate_features, rel, e.beta)
        assert e.gate.ap == pytest.approx(val.summary_of(choice)["ap"], abs=1e-12) and e.gate.pq is None
        assert e.gate.encoder_gflops_mean == pytest.approx(np.asarray(costs)[choice].mean())
        oracle = val.summary_of(choose(val.quality_per_view[:, 0], rel, e.beta))["ap"]  # picks on view 0's dap
        assert e.oracle.ap == pytest.approx(oracle, abs=1e-12)
    with pytest.raises(ValueError, match="for a detection table"):
        fit_and_evaluate(ds, GateConfig(quality="pq"))
    # a sweep samples the detection labels on this table, and refuses a space that would sample PQ labels
    from eco_ray.config import ConfigError
    from eco_ray.sweep import SweepConfig
    from eco_ray.sweep.driver import _check_labels
    from eco_ray.sweep.space import load_space

    space = SweepConfig().space_for(ds.task)
    assert space == "detection" and load_space(space)["quality"]["choices"] == ["dap", "ap"]
    _check_labels(load_space(space), ds, space)
    with pytest.raises(ConfigError, match=r"samples quality \['pq', 'dpq'\], which a detection table"):
        _check_labels(load_space("default"), ds, "default")
    run = run_gate(str(tmp_path / "t"), GateConfig(kind="classify", epochs=20), [0.1], ctx=RunContext.create(
        tmp_path / "runs", f"sqlite:///{tmp_path}/mlflow.db"))
    text = fmt.gate(run)
    assert "AP50" in text and "PQ" not in text and Path(run.plot).is_file()
    assert json.loads((Path(run.gate_dirs[0.1]) / "eco_config.json").read_text())["task"] == "detection"
