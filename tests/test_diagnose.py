"""The verdict on a derived table, on synthetic statistics where the truth is known; the bootstrap against a
brute-force recomputation; the one budget type."""

import json
from dataclasses import replace

import numpy as np
import pytest

from eco_ray.bootstrap import interval, resample_counts, weighted_totals
from eco_ray.budget import Budget, BudgetError
from eco_ray.derive.table import DerivedSplit
from eco_ray.diagnose import DiagnoseError, diagnose
from eco_ray.metrics import CategorySet, PanopticStats, aggregate
from eco_ray.metrics.panoptic import totals_summary

CATS = CategorySet([{"id": i + 1, "name": f"c{i}", "isthing": int(i < 2)} for i in range(4)])
EXITS = [2, 3, 4, 5, 6]
GFLOPS = [2.0, 3.0, 4.0, 5.0, 6.0]


def table(n, planted=0.0, view_noise=0.1, seed=0, name="val"):
    """n images, one segment each; the quality of exit k is the matched IoU of that segment. With ``planted``,
    images whose feature 0 is positive gain ``planted`` from the first exit to the last and the others lose
    nothing; without, every image has the same linear curve (static mixing is on the line). Each view adds its
    own noise to the per-image quality."""
    rng = np.random.default_rng(seed)
    e = len(EXITS)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    hard = x[:, 0] > 0
    base = np.linspace(0.55, 0.65, e)[None].repeat(n, 0)
    if planted:
        base = np.where(hard[:, None], np.linspace(0.8 - planted, 0.8, e)[None], 0.8)
    stats = PanopticStats.zeros((n, 2, e, len(CATS)))
    cat = np.arange(n) % len(CATS)
    for v in range(2):
        q = np.clip(base + rng.normal(0, view_noise, base.shape), 0.51, 1.0)
        stats.tp[np.arange(n), v, :, cat] = 1
        stats.iou_sum[np.arange(n), v, :, cat] = q
        stats.sem_inter[np.arange(n), v, :, cat] = 10
        stats.sem_union[np.arange(n), v, :, cat] = 12
    kinds = np.where(hard, "hard", "easy").astype(object)
    return DerivedSplit(name, np.arange(1, n + 1), list(EXITS), ["plain", "flip"], stats, x, kinds,
                        np.ones(n, np.int64))


def test_totals_summary_is_the_aggregate_of_the_summed_rows():
    rng = np.random.default_rng(0)
    tp = rng.integers(0, 3, (30, 5, 4))
    stats = PanopticStats(tp * rng.uniform(0.5, 1, tp.shape), tp, rng.integers(0, 2, tp.shape),
                          rng.integers(0, 2, tp.shape), rng.integers(0, 9, tp.shape), rng.integers(9, 20, tp.shape))
    batched = totals_summary(stats.sum_images(), CATS.isthing)  # (5,): every exit at once
    for e in range(5):
        want = aggregate(stats[:, e], CATS)
        for key in ("pq", "pq_things", "pq_stuff", "sq", "rq", "miou"):
            assert batched[key][e] == pytest.approx(getattr(want, key), abs=1e-12)


def test_the_bootstrap_equals_summing_the_drawn_rows():
    rng = np.random.default_rng(1)
    split = table(12, planted=0.2)
    stats = split.dense_stats()[:, 0, 2]  # (N, C)
    counts = resample_counts(12, 50, seed=3)
    assert (counts.sum(1) == 12).all() and counts.shape == (50, 12)
    totals = weighted_totals(stats, counts)
    for b in range(50):
        drawn = np.repeat(np.arange(12), counts[b])  # the resample as a list of rows, brute force
        brute = PanopticStats(**{k: v[drawn].sum(0) for k, v in stats.as_dict().items()})
        for k in ("tp", "fp", "fn", "sem_inter", "sem_union"):
            np.testing.assert_array_equal(getattr(totals, k)[b], getattr(brute, k))  # counts: exactly
        np.testing.assert_allclose(totals.iou_sum[b], brute.iou_sum, rtol=0, atol=1e-12)
        assert totals_summary(totals[b], CATS.isthing)["pq"] == pytest.approx(aggregate(brute, CATS).pq, abs=1e-12)
    lo, hi = interval(rng.normal(size=20000))
    assert lo == pytest.approx(-1.96, abs=0.05) and hi == pytest.approx(1.96, abs=0.05)


def test_pure_noise_does_not_pay():
    d = diagnose(table(4000, planted=0.0, view_noise=0.05), CATS, GFLOPS, resamples=300)
    assert d.verdict == "does not pay", d.reasons
    assert abs(d.gain_reliability[2]) < 0.1  # nothing real in an image's gain
    assert d.label_noise_share > 0.5  # yet the labels move between the views
    assert max(p.lead for p in d.oracle) > max(p.lead for p in d.cross_view_oracle)  # the usual oracle: noise
    # the intervals cover the true lead, 0, as often as a 95% interval should (over independent tables)
    covered = [p.lead_ci95[0] <= 0 <= p.lead_ci95[1]
               for seed in range(20) for p in diagnose(table(400, view_noise=0.05, seed=100 + seed), CATS, GFLOPS,
                                                      resamples=200, seed=seed).cross_view_oracle]
    assert np.mean(covered) >= 0.85, np.mean(covered)


def test_a_planted_depth_need_that_a_feature_predicts_pays():
    split = table(1500, planted=0.3, view_noise=0.1)
    probe = table(1500, planted=0.3, view_noise=0.1, seed=1, name="train")
    d = diagnose(split, CATS, GFLOPS, probe_split=probe, resamples=300)
    assert d.verdict == "pays", d.reasons
    best = d.cross_view_oracle_lead
    assert best.lead_ci95[0] < best.lead < best.lead_ci95[1] and best.lead_ci95[0] > 0.005
    assert d.gain_reliability[2] > 0.5
    gate_input = next(p for p in d.probes if p.input == "gate input")
    assert gate_input.share > 0.7  # the feature carries the real gain
    assert d.per_kind_by_exit["hard"][6] - d.per_kind_by_exit["hard"][2] > 0.2
    assert abs(d.per_kind_by_exit["easy"][6] - d.per_kind_by_exit["easy"][2]) < 0.02
    # a gate that sends exactly the hard images deep captures most of it
    hard = split.gate_features[:, 0] > 0
    gate = diagnose(split, CATS, GFLOPS, resamples=300, gate_choice=np.where(hard, 4, 0), gate_source="perfect")
    assert gate.gate.lead_ci95[0] > 0 and gate.gate_capture > 0.5
    doc = json.loads(json.dumps(gate.to_json()))  # the --json schema
    assert doc["verdict"] == "pays" and doc["gate"]["lead"] == pytest.approx(gate.gate.lead)
    assert {"label_noise_share", "gain_reliability", "cross_view_oracle", "probes", "schema_version"} <= set(doc)


def test_a_small_sample_cannot_tell_yet():
    d = diagnose(table(40, planted=0.04, view_noise=0.15), CATS, GFLOPS, resamples=300)
    assert d.verdict == "cannot tell yet", d.reasons
    assert d.images_for_tight_interval > 40
    assert "images would narrow the interval" in d.reasons[1]


def test_tables_it_cannot_judge_are_clear_errors():
    split = table(30)
    with pytest.raises(DiagnoseError, match="one view"):
        diagnose(replace(split, views=["plain"], stats=split.dense_stats()[:, :1]), CATS, GFLOPS)
    with pytest.raises(DiagnoseError, match="no images"):
        diagnose(split.subset(np.zeros(30, bool)), CATS, GFLOPS)
    with pytest.raises(DiagnoseError, match="one encoder GFLOPs value per exit"):
        diagnose(split, CATS, GFLOPS[:3])
    with pytest.raises(DiagnoseError, match="one exit index per image"):
        diagnose(split, CATS, GFLOPS, gate_choice=np.zeros(3, int))


def test_one_budget_type():
    b = Budget.named("max_gflops", 0.05)
    assert (b.metric, b.limit, b.relative, b.key, str(b)) == ("encoder_gflops", 0.05, False, "encoder_gflops_mean",
                                                              "max_gflops=0.05")
    assert b.admits({"encoder_gflops_mean": 0.05}) and not b.admits({"encoder_gflops_mean": 0.051})
    assert b.violation({"encoder_gflops_mean": 0.06}) == pytest.approx(0.01)  # Optuna: <= 0 is feasible
    assert Budget.named("min_pq", 0.5).admits({"pq": 0.6}) and not Budget.named("min_pq", 0.5).admits({"pq": 0.4})
    rel = Budget.named("max_relative_gflops", 0.7)
    absolute = rel.absolute(0.1)
    assert absolute.limit == pytest.approx(0.07) and not absolute.relative and absolute.name == "max_gflops"
    with pytest.raises(BudgetError, match="absolute"):
        rel.admits({"encoder_gflops_mean": 0.01})
    for name, limit, message in (("cheapest", 1, "must be one of"), ("max_gflops", "x", "not a number"),
                                 ("max_gflops", -1, ">= 0"), ("max_relative_gflops", 1.5, "share")):
        with pytest.raises(BudgetError, match=message):
            Budget.named(name, limit)


def test_the_diagnose_command_on_tables_on_disk(tmp_path, capsys):
    """`eco-ray diagnose` reads a table from disk (no model, no Ray): a verdict and --json, and one clear line
    (exit 2) for a table it cannot judge: one view, an empty split, a missing column, a newer schema."""
    import pyarrow as pa

    from eco_ray.cli import main
    from eco_ray.derive.table import write_manifest, write_split

    def table_dir(name, val, train=None):
        root = tmp_path / name
        root.mkdir()
        for split in (val, train or table(200, planted=0.3, seed=1, name="train")):
            write_split(root, split)
        costs = {"exits": [{"exit": k, "encoder_gflops": g} for k, g in zip(EXITS, GFLOPS)]}
        write_manifest(root, {"key": name, "exits": EXITS, "views": ["plain", "flip"], "categories": CATS.to_coco(),
                              "costs": costs, "splits": {"val": {}, "train": {}}, "parent": {"uri": "x"}})
        return root

    good = table_dir("good", table(300, planted=0.3))
    assert main(["diagnose", "--derived", str(good), "--resamples", "100", "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "verdict: PAYS" in out and "cross-view oracle" in out and (good / "diagnosis.png").stat().st_size > 0
    assert main(["diagnose", "--derived", str(good), "--resamples", "100", "--json", "--exits", "2,4,6"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["exits"] == [2, 4, 6] and doc["schema_version"] == 3 and set(doc["static"][0]) >= {"exit", "pq"}
    split = table(30)
    one_view = table_dir("one-view", replace(split, views=["plain"], stats=split.dense_stats()[:, :1]))
    empty = table_dir("empty", split.subset(np.zeros(30, bool)))
    missing = table_dir("missing", split)
    images = missing / "val.images.arrow"
    without = pa.ipc.open_file(pa.OSFile(str(images))).read_all().drop_columns(["gate_features"])  # read, not mapped
    with pa.OSFile(str(images), "wb") as sink, pa.ipc.new_file(sink, without.schema) as writer:
        writer.write_table(without)
    newer = table_dir("newer", split)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    for root, message in ((one_view, "one view"), (empty, "no images"), (missing, "gate_features"),
                          (newer, "schema version 99"), (tmp_path / "nowhere", "neither a derived-dataset")):
        assert main(["diagnose", "--derived", str(root), "--run-dir", str(tmp_path)]) == 2, root
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (root, err)
