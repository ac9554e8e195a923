"""Steps B and C: the derived table on a real local Ray, gates fitted on it, exact evaluation checked
against running the gated model end to end, reuse of a derived dataset, the CLI."""

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from eco_ray.cli import main
from eco_ray.config import ConfigError, load_config
from eco_ray.data import CocoPanopticDataset
from eco_ray.data.collate import pixel_values
from eco_ray.data.transforms import build_transform
from eco_ray.derive.config import DeriveConfig
from eco_ray.derive.run import run_derive
from eco_ray.derive.table import DerivedDataset, noise_floor, relative_costs
from eco_ray.evaluate import evaluate_exits
from eco_ray.gate.config import GateConfig
from eco_ray.gate.evaluate import fit_and_evaluate
from eco_ray.gate.fit import fit_gate
from eco_ray.metrics.panoptic import PanopticStats, aggregate, image_stats
from eco_ray.model.gates import decide
from eco_ray.model.io import load_gate, load_parent
from eco_ray.model.postprocess import to_panoptic
from eco_ray.tradeoff import exit_labels

pytestmark = pytest.mark.slow

from conftest import DERIVE_THRESHOLD as THRESHOLD


@pytest.fixture(scope="module")
def env(tiny_derived):
    return tiny_derived


def test_derived_table_matches_a_direct_evaluation(env):
    m = env["manifest"]
    assert not m["reused"]
    ds = DerivedDataset.open(m["path"])
    assert ds.exits == [2, 3, 4, 5, 6] and ds.split_names == ["train", "val"]
    val_data = CocoPanopticDataset.from_root(env["root"], "val")
    val = ds.split("val")
    assert val.dense_stats().tp.shape == (16, 2, 5, len(val_data.categories))  # (images, views, exits, categories)
    assert val.image_ids.tolist() == val_data.image_ids
    assert val.gate_features.shape == (16, m["gate_input_dim"])
    assert set(val.kinds.tolist()) <= {"clean", "outline", "relational"}
    # chunks evaluated by Ray tasks give exactly what one in-process pass gives
    model, _ = load_parent(env["parent_dir"])
    for view, flip in ((0, False), (1, True)):
        direct = evaluate_exits(model, val_data, batch_size=4, flip=flip, threshold=THRESHOLD)
        np.testing.assert_array_equal(direct.stats.tp, val.dense_stats().tp[:, view])
        np.testing.assert_allclose(direct.stats.iou_sum, val.dense_stats().iou_sum[:, view])
        if view == 0:
            np.testing.assert_allclose(direct.gate_features, val.gate_features, rtol=1e-6)
    assert (val.dense_stats().tp + val.dense_stats().fp).sum() > 0, "the parent predicted nothing: the comparison would be vacuous"
    # the manifest records what the table came from and what every exit costs
    assert m["parent"]["weights_sha256"] and set(m["data"]["annotations_sha256"]) == {"train", "val"}
    gflops = [e["encoder_gflops"] for e in m["costs"]["exits"]]
    assert gflops == sorted(gflops) and gflops[0] > 0 and all(e["latency_ms"] > 0 for e in m["costs"]["exits"])
    nf = m["splits"]["val"]["noise_floor"]
    assert nf["views"] == 2 and 0 <= nf["share_above_tolerance"] <= 1
    assert sum(m["splits"]["val"]["sufficient_exit_histogram"].values()) == 16
    # and it is in MLflow, tagged with its key
    run = MlflowClient(env["tracking"]).get_run(m["mlflow_run_id"])
    assert run.data.tags["derived_key"] == m["key"] and run.data.tags["eco_ray.stage"] == "derive"
    names = {a.path for a in MlflowClient(env["tracking"]).list_artifacts(m["mlflow_run_id"], "derived")}
    assert {"derived/manifest.json", "derived/train.images.arrow", "derived/train.stats.arrow",
            "derived/val.images.arrow", "derived/val.stats.arrow"} <= names


def test_rerunning_on_the_same_inputs_reuses_the_table(env):
    client = MlflowClient(env["tracking"])
    runs_before = len(client.search_runs([r.experiment_id for r in client.search_experiments()]))
    t0 = time.perf_counter()
    again = run_derive(env["cfg"], parent=str(env["parent_dir"]), data_root=env["root"], ctx=env["ctx"])
    assert again["reused"] and again["key"] == env["manifest"]["key"] and again["path"] == env["manifest"]["path"]
    assert time.perf_counter() - t0 < env["first_seconds"]
    assert len(client.search_runs([r.experiment_id for r in client.search_experiments()])) == runs_before
    # other settings into the same directory: refused, nothing overwritten
    other = load_config(DeriveConfig, layers=[{**env["cfg"].__dict__, "views": ["plain"]}])
    with pytest.raises(ConfigError, match="other inputs"):
        run_derive(other, parent=str(env["parent_dir"]), data_root=env["root"], ctx=env["ctx"], out=again["path"])
    assert DerivedDataset.open(again["path"]).manifest["key"] == env["manifest"]["key"]
    # an --out holding the run directory (and so the MLflow artifacts the table is logged to): refused
    with pytest.raises(ConfigError, match="holds the run directory"):
        run_derive(env["cfg"], parent=str(env["parent_dir"]), data_root=env["root"], ctx=env["ctx"],
                   out=env["ctx"].run_dir.parent)


def test_levels_gate_input_is_derived_recorded_and_served(env, tmp_path):
    """gate_input=levels: a table with 3x wider gate features, a different key, and a gate whose engine
    computes the same input (Step B, Step C and serving agree on what the gate sees)."""
    import ray

    from eco_ray.gate.run import run_gate
    from eco_ray.serve.engine import RequestControl, load_engine

    cfg = load_config(DeriveConfig, layers=[{**env["cfg"].__dict__, "gate_input": "levels", "max_images": 8,
                                             "views": ["plain"], "measure_latency": False}])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        m = run_derive(cfg, parent=str(env["parent_dir"]), data_root=env["root"], ctx=env["ctx"])
    finally:
        if started:
            ray.shutdown()
    base_dim = env["manifest"]["gate_input_dim"]
    assert m["gate_input"] == "levels" and m["gate_input_dim"] == 3 * base_dim and m["key"] != env["manifest"]["key"]
    g = run_gate(m["path"], GateConfig(epochs=5), [0.1], ctx=env["ctx"], out=str(tmp_path / "gate"), name="levels-gate")
    engine, meta = load_engine(str(env["parent_dir"]), g.path, env["tracking"])
    assert meta["gate_input"] == "levels" and engine.parent.config.gate_input == "levels"
    ds = CocoPanopticDataset.from_root(env["root"], "val")
    image = ds[0].image
    out = engine.respond([image], [RequestControl()], [{"mask_format": "rle"}])
    assert out[0]["exit"] in engine.exits


def test_noise_floor_of_identical_views_is_zero(env):
    val = DerivedDataset.open(env["manifest"]["path"]).split("val")
    same = replace(val, stats=PanopticStats(**{k: np.repeat(v[:, :1], 2, axis=1)
                                                for k, v in val.dense_stats().as_dict().items()}))
    nf = noise_floor(same)
    assert nf["mean_abs_diff"] == 0 and nf["share_above_tolerance"] == 0


def test_table_evaluation_equals_the_gated_model_run_end_to_end(env):
    ds = DerivedDataset.open(env["manifest"]["path"])
    cfg = GateConfig(kind="quality", epochs=50)
    rel = relative_costs(ds.costs("gflops"))
    train = ds.split("train")
    gate = fit_gate(train.gate_features, train.quality, rel, ds.exits, cfg)
    model, _ = load_parent(env["parent_dir"])
    val_data = CocoPanopticDataset.from_root(env["root"], "val")
    transform = build_transform(model.config.image_size, train=False)
    rng = np.random.default_rng(0)
    samples = [transform(val_data[i], rng) for i in range(len(val_data))]
    x = pixel_values([s.image for s in samples])
    mixed = 0
    for beta in (0.0, 0.3, 5.0, None):
        # end to end: the gate decides per image on the parent's own gate input, rows leave the encoder there
        # (beta None: a fixed assignment that cycles through the exits, so rows surely leave at every depth)
        with torch.no_grad():
            if beta is None:
                depth = torch.as_tensor([ds.exits[i % len(ds.exits)] for i in range(len(samples))])
                out = model.forward_per_image(x, depth)
            else:  # serving's path: the gate decides on the parent's own gate input within one pass
                exits = np.asarray(ds.exits)
                out = model.forward_gated(x, lambda f: exits[decide(gate, f, rel, beta)])
                depth = out.exit_per_image
        mixed += len(set(depth.tolist())) > 1
        preds = to_panoptic(out, val_data.categories, (model.config.image_size,) * 2, threshold=THRESHOLD)
        e2e = aggregate(PanopticStats.stack([image_stats(s.id_map, s.segments, *p, val_data.categories)
                                             for s, p in zip(samples, preds)]), val_data.categories)
        # from the table: the same decisions, on the stored statistics
        val = ds.split("val")
        if beta is None:
            choice = np.asarray([ds.exits.index(k) for k in depth.tolist()])
        else:
            choice = decide(gate, val.gate_features, rel, beta)
            assert [ds.exits[c] for c in choice] == depth.tolist()
        table = aggregate(val.dense_stats()[np.arange(len(val)), 0, choice], ds.categories)
        assert abs(table.pq - e2e.pq) < 1e-6 and abs(table.pq_things - e2e.pq_things) < 1e-6
        assert abs(table.miou - e2e.miou) < 1e-6
    assert mixed >= 1


def test_gates_learn_labels_that_the_features_carry():
    rng = np.random.default_rng(0)
    n, exits = 600, [2, 3, 4, 5, 6]
    x = rng.normal(size=(n, 8)).astype(np.float32)
    # image "difficulty" is feature 0: hard images gain quality with depth, easy ones do not
    hard = x[:, 0] > 0
    quality = np.where(hard[:, None], np.linspace(0.3, 0.9, 5)[None], 0.8) + rng.normal(0, 0.01, (n, 5))
    rel = np.asarray(exits, float) / 6
    labels = exit_labels(quality, rel, 0.1)
    assert 0.2 < (labels == 4).mean() < 0.8  # both classes present
    clf = fit_gate(x, quality, rel, exits, GateConfig(kind="classify", beta=0.1, epochs=300, lr=0.05))
    assert (decide(clf, x, rel, 0.1) == labels).mean() > 0.9
    budget = fit_gate(x, quality, rel, exits, GateConfig(kind="quality", epochs=300, lr=0.05, hidden=16))
    for beta in (0.1, 3.0):  # one fit, two trade-offs
        oracle = exit_labels(quality, rel, beta)
        assert (decide(budget, x, rel, beta) == oracle).mean() > 0.9


def test_fit_and_evaluate_reports_the_baselines(env):
    ds = DerivedDataset.open(env["manifest"]["path"])
    res = fit_and_evaluate(ds, GateConfig(kind="quality", epochs=30), betas=[0.0, 0.2, 10.0])
    assert len(res.gates) == 1 and len(res.evaluations) == 3  # a quality gate is fitted once
    static = res.static
    assert [p.exit for p in static] == ds.exits
    val = ds.split("val")
    for e, p in enumerate(static):
        assert p.pq == pytest.approx(aggregate(val.dense_stats()[:, 0, e], ds.categories).pq)
        assert p.encoder_gflops_mean == pytest.approx(ds.costs("gflops")[e])
    # beta 10 makes any depth not worth its cost: the oracle takes the shallowest exit for every image
    assert res.evaluations[-1].oracle.exit_histogram == {2: 16, 3: 0, 4: 0, 5: 0, 6: 0}
    # with beta 0 the oracle is at least as good as every static exit on per-image quality
    clf = fit_and_evaluate(ds, GateConfig(kind="classify", epochs=30), betas=[0.05, 0.5])
    assert len(clf.gates) == 2
    # the dataset-PQ contribution as label source: same baselines, a gate of the same shape
    dpq = fit_and_evaluate(ds, GateConfig(kind="classify", epochs=30, quality="dpq"), betas=[0.05])
    assert dpq.static == clf.static and len(dpq.gates) == 1
    train = ds.split("train")
    assert train.quality_of("dpq").shape == train.quality.shape
    assert train.quality_of("dpq")[:, -1].mean() == pytest.approx(
        np.mean([aggregate(train.dense_stats()[:, v, -1], ds.categories).pq for v in range(len(train.views))]))


def _informative_dataset(env, n_train=400, n_val=120, seed=0, dim=8):
    """The fixture's manifest (exits, costs, categories) with synthetic splits whose per-image PQ depends on
    the gate input (feature 0 > 0: gains with depth; else flat), so gate decisions vary between images."""
    from eco_ray.derive.table import DerivedSplit

    ds = DerivedDataset.open(env["manifest"]["path"])
    rng = np.random.default_rng(seed)
    exits, c = ds.exits, len(ds.categories)

    def split(name, n, first_id):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        q = np.where(x[:, :1] > 0, np.linspace(0.3, 0.9, len(exits))[None], 0.8) + rng.normal(0, 0.01, (n, len(exits)))
        stats = PanopticStats.zeros((n, 2, len(exits), c))
        stats.tp[..., 0], stats.iou_sum[..., 0] = 1, np.repeat(q[:, None], 2, axis=1)
        stats.sem_inter[..., 0] = stats.sem_union[..., 0] = 1
        return DerivedSplit(name, np.arange(first_id, first_id + n), exits, ["plain", "flip"], stats, x,
                            np.array(["clean"] * n, dtype=object), np.ones(n, np.int64))

    ds._splits = {"train": split("train", n_train, 1), "val": split("val", n_val, 100000)}
    return ds


def test_holdout_fits_on_the_rest_and_scores_the_held_out_images(env):
    from eco_ray.gate.evaluate import evaluate_choice, static_baseline

    ds = _informative_dataset(env)
    train, val = ds.split("train"), ds.split("val")
    kept, held = train.hold_out(0.25)
    assert len(kept) + len(held) == len(train) and 0.15 < len(held) / len(train) < 0.35
    assert not set(kept.image_ids) & set(held.image_ids)
    cfg = GateConfig(kind="quality", epochs=200, lr=0.05, hidden=16)
    res = fit_and_evaluate(ds, cfg, betas=[0.05, 0.3], holdout=0.25)
    assert res.train_images == len(kept) and res.holdout_images == len(held)
    assert res.static == fit_and_evaluate(ds, cfg, betas=[0.05]).static  # the eval split is untouched
    assert res.static_holdout == static_baseline(held, ds.categories, ds.cost_columns())
    rel = relative_costs(ds.costs("gflops"))
    # the gate was fitted on the kept images only: refitting on them reproduces both evaluations exactly,
    # while a gate fitted on the whole training split decides differently somewhere
    gate = fit_gate(kept.gate_features, kept.quality, rel, ds.exits, cfg)
    whole = fit_gate(train.gate_features, train.quality, rel, ds.exits, cfg)
    differs = 0
    for p in res.evaluations:
        for split, evaluation in ((val, p.gate), (held, p.holdout_gate)):
            choice = decide(gate, split.gate_features, rel, p.beta)
            assert len(set(choice.tolist())) > 1  # informative data: not one exit for every image
            expected = evaluate_choice(split, ds.categories, ds.cost_columns(), choice)
            assert evaluation.pq == pytest.approx(expected.pq)
            assert evaluation.exit_histogram == expected.exit_histogram
            differs += int((decide(whole, split.gate_features, rel, p.beta) != choice).any())
        assert p.holdout_gate.pq > p.holdout_oracle.pq - 0.05  # it learned the rule
    assert differs > 0
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        train.hold_out(1.0)


def test_cross_view_oracle_and_the_equal_compute_baseline(env):
    from dataclasses import replace

    from eco_ray.gate.evaluate import cross_view_oracle_point, oracle_point, static_baseline
    from eco_ray.results import static_at

    ds = DerivedDataset.open(env["manifest"]["path"])
    val, cols = ds.split("val"), ds.cost_columns()
    rel = relative_costs(ds.costs("gflops"))
    static = static_baseline(val, ds.categories, cols)
    for p in static:  # on the curve's own points, the interpolation is the point
        assert static_at(static, p.encoder_gflops_mean) == pytest.approx(p.pq)
    # two identical views: picking on the other view is picking on the same one
    same = replace(val, stats=PanopticStats(**{k: np.repeat(v[:, :1], 2, axis=1) for k, v in val.dense_stats().as_dict().items()}))
    for beta in (0.0, 0.1, 1.0):
        assert cross_view_oracle_point(same, ds.categories, cols, rel, beta).pq == pytest.approx(
            oracle_point(same, ds.categories, cols, rel, beta).pq)
    with pytest.raises(ValueError, match="needs a view"):
        cross_view_oracle_point(replace(val, views=["plain"]), ds.categories, cols, rel, 0.1)


def test_gate_cli_json_and_mlflow(env, capsys):
    code = main(["gate", "--derived", env["manifest"]["path"], "--beta", "0.1", "--kind", "classify", "--json",
                 "--run-dir", str(env["base"]), "--tracking-uri", env["tracking"], "--name", "cli-gate",
                 "--set", "epochs=20"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["beta"] == 0.1 and set(out) >= {"gate", "static", "oracle"}
    assert {"pq", "encoder_gflops_mean", "exit_histogram"} <= set(out["gate"])
    assert [s["exit"] for s in out["static"]] == [2, 3, 4, 5, 6] and "encoder_gflops_mean" in out["oracle"]
    client = MlflowClient(env["tracking"])
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             "attributes.run_name = 'cli-gate'")[0]
    assert run.data.tags["parent_uri"] == env["manifest"]["parent"]["uri"]
    assert run.data.metrics["val_pq"] == pytest.approx(out["gate"]["pq"])
    gate, meta = load_gate(env["base"] / "gates" / "cli-gate")
    assert meta["beta"] == 0.1 and meta["derived_key"] == env["manifest"]["key"]
    assert {"gate/tradeoff.png", "gate/model.safetensors", "gate/eco_config.json", "gate/evaluation.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "gate")}


def test_gate_bad_input_is_a_clear_error(env, tmp_path, capsys):
    assert main(["gate", "--derived", str(tmp_path / "missing"), "--tracking-uri", env["tracking"]]) == 2
    assert "neither a derived-dataset directory" in capsys.readouterr().err
    assert main(["gate", "--derived", env["manifest"]["path"], "--beta", "-1", "--tracking-uri", env["tracking"]]) == 2
    assert "beta" in capsys.readouterr().err
    assert main(["gate", "--derived", env["manifest"]["path"], "--set", "epochs=0"]) == 2
    assert "epochs" in capsys.readouterr().err
    assert main(["gate", "--derived", env["manifest"]["path"], "--set", "quality=iou"]) == 2
    assert "quality" in capsys.readouterr().err


def test_serving_engine_picks_the_exits_the_table_evaluation_picks(env):
    """One decision rule: for the same gate input and budget, the serving Engine chooses exactly the exits the
    exact table evaluation chose, in the cost measure the gate was fitted with (latency here: its relative
    costs differ from the GFLOPs ones, which serving used to apply to every gate)."""
    from eco_ray.budget import Budget
    from eco_ray.gate.evaluate import evaluate_choice
    from eco_ray.gate.run import gate_record
    from eco_ray.serve.engine import LoadCap, RequestControl, engine_from

    import copy

    parent, pmeta = load_parent(env["parent_dir"])
    ds = _informative_dataset(env, dim=parent.config.hidden_dim)
    # the latency column is set, not measured: the fixture's tiny encoder times within noise on a busy
    # machine (every exit can read the same after the no-fall rule), and this test is about the rule, not
    # the timer. A fixed per-image overhead makes the relative latencies differ from the GFLOPs ones.
    ds.manifest = copy.deepcopy(ds.manifest)
    for row in ds.manifest["costs"]["exits"]:
        row["latency_ms"] = 4.0 + 2.0 * float(row["encoder_gflops"]) / float(ds.costs("gflops")[-1])
    val = ds.split("val")
    rel_latency, rel_gflops = relative_costs(ds.costs("latency")), relative_costs(ds.costs("gflops"))
    # the informative images gain 0.6 PQ from the first exit to the last: a beta between the two measures'
    # break-even points sends them deep under one cost measure and shallow under the other
    def break_even(rel):
        return (0.6 / (len(rel) - 1)) / ((rel[-1] - rel[0]) / (len(rel) - 1))

    beta = float(np.sqrt(break_even(rel_latency) * break_even(rel_gflops)))
    features = torch.as_tensor(val.gate_features)
    for kind in ("quality", "classify"):
        cfg = GateConfig(kind=kind, cost="latency", beta=beta, epochs=200, lr=0.05, hidden=16 if kind == "quality" else 0)
        fit = fit_and_evaluate(ds, cfg, [beta])
        gate = fit.gate_for(beta)
        table = decide(gate, val.gate_features, rel_latency, beta)
        assert fit.evaluations[0].gate == evaluate_choice(val, ds.categories, ds.cost_columns(), table, beta)
        engine = engine_from(parent, pmeta, gate, gate_record(ds, cfg, beta, []))
        served = engine.choose_exits(features, [RequestControl()] * len(val))
        assert served == [ds.exits[i] for i in table]
        if kind == "quality":  # the test can tell the cost measures apart: GFLOPs costs decide otherwise
            assert (decide(gate, val.gate_features, rel_gflops, beta) != table).any()
        # a per-request compute budget: the same rule among the exits it allows
        cap = float(ds.costs("gflops")[2])
        allowed = ds.costs("gflops") <= cap + 1e-12
        capped = decide(gate, val.gate_features, rel_latency, beta, allowed=allowed)
        budget = RequestControl(budget=Budget.named("max_gflops", cap))
        served = engine.choose_exits(features, [budget] * len(val))
        assert served == [ds.exits[i] for i in capped] and max(served) <= ds.exits[2]
        # a load cap: the same rule among the exits under it, for the requests without a control of their own
        load = LoadCap(level=2, exit_cap=ds.exits[-3], floor_exit=ds.exits[0])
        under = np.asarray(ds.exits) <= load.exit_cap
        mixed = [RequestControl(), RequestControl(exit=ds.exits[-1]), budget] * (len(val) // 3)
        bound = [False] * len(mixed)
        served = engine.choose_exits(features[:len(mixed)], mixed, load=load, bound=bound)
        rule = decide(gate, val.gate_features[:len(mixed)], rel_latency, beta, allowed=under)
        assert served[0::3] == [ds.exits[i] for i in rule[0::3]] and max(served[0::3]) <= load.exit_cap
        assert bound[0::3] == [bool(ds.exits[i] > load.exit_cap) for i in table[:len(mixed)][0::3]]
        assert served[1::3] == [ds.exits[-1]] * len(served[1::3])  # a forced exit is honoured as given
        assert served[2::3] == [ds.exits[i] for i in capped[:len(mixed)][2::3]]  # so is a budget
        if kind == "quality":
            assert (rule[0::3] != table[:len(mixed)][0::3]).any()  # the cap changed decisions here
        # a floor: a capped request gets the rule among the exits from the floor to the cap; one whose own
        # exit is under the cap keeps it, even below the floor
        floored = LoadCap(level=2, exit_cap=ds.exits[-3], floor_exit=ds.exits[1])
        band = under & (np.asarray(ds.exits) >= floored.floor_exit)
        in_band = decide(gate, val.gate_features, rel_latency, beta, allowed=band)
        expected = [ds.exits[b] if ds.exits[t] > floored.exit_cap else ds.exits[t] for t, b in zip(table, in_band)]
        assert engine.choose_exits(features, [RequestControl()] * len(val), load=floored) == expected
        unfloored = decide(gate, val.gate_features, rel_latency, beta, allowed=under)
        assert expected != [ds.exits[i] for i in unfloored]  # the floor changed decisions here
        every = LoadCap(level=2, exit_cap=ds.exits[-3], floor_exit=ds.exits[0], all_requests=True)  # "load"
        assert set(engine.choose_exits(features[:len(mixed)], mixed, load=every)[1::3]) == {load.exit_cap}


def test_evaluate_scores_a_parent_at_an_exit_and_a_gate_as_the_table_does(env, tmp_path, capsys):
    """`eco-ray evaluate --parent`: the serving engine's predictions written in the COCO format and scored
    against the ground truth give the derived table's figures (the images are the model's size: nothing is
    resized, so the two must agree)."""
    from eco_ray.gate.run import run_gate

    ds = DerivedDataset.open(env["manifest"]["path"])
    val = ds.split("val")
    common = ["evaluate", "--gt", str(env["root"]), "--split", "val", "--threshold", str(THRESHOLD),
              "--tracking-uri", env["tracking"], "--json"]
    for k in (ds.exits[0], ds.exits[-1]):
        out = tmp_path / f"exit{k}.json"
        assert main([*common, "--parent", str(env["parent_dir"]), "--exit", str(k), "--out", str(out)]) == 0
        got = json.loads(capsys.readouterr().out)
        ref = aggregate(val.dense_stats()[:, 0, ds.exits.index(k)], ds.categories)
        assert got["exits"] == {str(k): len(val)} and abs(got["pq"] - ref.pq) < 1e-6
        assert abs(got["miou"] - ref.miou) < 1e-6 and got["encoder_gflops_mean"] > 0
        # the folder it wrote is a prediction set like any other
        assert main(["evaluate", "--gt", str(env["root"]), "--pred", str(out), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["pq"] == got["pq"]
    g = run_gate(env["manifest"]["path"], GateConfig(kind="quality", epochs=30), [0.1], ctx=env["ctx"],
                 out=str(tmp_path / "gate"), name="eval-gate")
    gate, _ = load_gate(g.path)
    rel = relative_costs(ds.costs("gflops"))
    for beta in (0.0, 0.3):
        assert main([*common, "--parent", str(env["parent_dir"]), "--gate", g.path, "--beta", str(beta),
                     "--out", str(tmp_path / f"gate{beta}.json")]) == 0
        got = json.loads(capsys.readouterr().out)
        choice = decide(gate, val.gate_features, rel, beta)
        written = json.loads((tmp_path / f"gate{beta}.json").read_text())["annotations"]
        assert [a["eco_exit"] for a in written] == [ds.exits[c] for c in choice]
        ref = aggregate(val.dense_stats()[np.arange(len(val)), 0, choice], ds.categories)
        assert abs(got["pq"] - ref.pq) < 1e-6
    # what cannot be evaluated says so in one line
    for extra, message in ((["--parent", str(env["parent_dir"])], "give --exit K"),
                           (["--parent", str(env["parent_dir"]), "--exit", "9"], "is not one of the model's exits"),
                           (["--parent", str(env["parent_dir"]), "--exit", "2", "--beta", "0.1"], "need --gate"),
                           (["--parent", str(tmp_path / "nothing"), "--exit", "2"], "nor a local directory")):
        assert main([*common, *extra]) == 2
        assert message in capsys.readouterr().err
