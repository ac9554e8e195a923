"""The Ray Tune + Optuna sweep on a real local Ray and a real MLflow SQLite store; selection from MLflow
under a budget and the registry alias; interruption and resume; failing trials."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient

from eco_ray.budget import Budget, BudgetError
from eco_ray.cli import main
from eco_ray.config import ConfigError, load_config
from eco_ray.context import RunContext
from eco_ray.resources import resource_path
from eco_ray.sweep import SweepConfig, pick_trial, resume_sweep, run_sweep, select
from eco_ray.sweep.space import define_by_run, load_space
from eco_ray.tracking import RegistryError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = resource_path("search_spaces", "default")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def sweep_cfg(*extra):
    return load_config(SweepConfig, overrides=[f"space={DEFAULT_SPACE}", *extra])


def sweep(tiny_derived, run_dir, cfg, name, tracking=None):
    return run_sweep(cfg, derived=tiny_derived["manifest"]["path"], ctx=RunContext.create(run_dir, tracking), name=name)


def children(tracking, parent_run_id):
    client = MlflowClient(tracking)
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_space_file_is_checked_and_sampled(tmp_path):
    space = load_space(DEFAULT_SPACE)
    assert load_space("default") == space  # the shipped space by name, from any directory
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    kinds = set()
    for _ in range(20):
        trial = study.ask()
        fixed = define_by_run(trial, space)
        params = {**trial.params, **fixed}
        kinds.add(params["kind"])
        assert 0.003 <= params["beta"] <= 1.0 and params["cost"] == "gflops"
        assert ("hidden" in params) == (params["kind"] == "quality")  # conditional parameters
        assert ("class_balance" in params) == (params["kind"] == "classify")
        study.tell(trial, [0.5, 0.1])
    assert kinds == {"classify", "quality"}
    bad = tmp_path / "bad.yaml"
    for text, message in (("beta: {type: float, low: 1, high: 0}", "low <= high"),
                          ("nonsense: {value: 1}", "not a gate setting"),
                          ("hidden: {type: categorical, choices: [0], when: {kind: budget}}", "not a parameter above"),
                          ("beta: {type: float, low: 0, high: 1, log: true}", "log scale")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_space(bad)


def test_an_interrupted_sweep_resumes_to_exactly_n_trials(tiny_derived, tmp_path):
    # first in the module, before the module's own Ray cluster exists: the sweep subprocess then starts
    # its Ray on an otherwise idle machine (under load a second local cluster has timed out at startup)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "eco_ray.cli", "sweep", "--derived", tiny_derived["manifest"]["path"],
           "--space", str(DEFAULT_SPACE), "--trials", "14", "--concurrency", "2",
           "--name", "r1", "--run-dir", str(tmp_path), "--tracking-uri", tracking]
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    trials_dir = tmp_path / "sweeps" / "r1" / "trials"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(trials_dir.glob("*/result.json"))) < 4:
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be interrupted: " + \
        (tmp_path / "sweep.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    log.close()
    done_before = len(list(trials_dir.glob("*/result.json")))
    assert 4 <= done_before < 14
    import ray

    try:
        code = main(["sweep", "--resume", "r1", "--run-dir", str(tmp_path), "--json"])
    finally:
        ray.shutdown()  # the later tests start their own cluster
    assert code == 0
    study = optuna.load_study(study_name="eco-ray-r1",
                              storage=json.loads((tmp_path / "sweeps" / "r1" / "sweep.json").read_text())["storage"])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 14
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    info = json.loads((tmp_path / "sweeps" / "r1" / "sweep.json").read_text())
    numbers = [int(r.data.tags["optuna_trial"]) for r in children(tracking, info["run_id"])
               if r.info.status == "FINISHED"]
    assert len(numbers) == len(set(numbers)) == 14  # every finished trial exactly once in MLflow
    assert set(numbers) == {t.number for t in complete}


def test_sweep_logs_every_trial_once_and_finds_a_true_pareto_front(tiny_derived, tmp_path, ray_local):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    s = sweep(tiny_derived, tmp_path, sweep_cfg("trials=8", "concurrency=2", "max_gflops=1e9"), "s1", tracking)
    assert s.complete == 8 and s.failed == 0
    runs = children(tracking, s.run_id)
    assert sorted(int(r.data.tags["optuna_trial"]) for r in runs) == list(range(8))
    assert all(r.info.status == "FINISHED" and "pq" in r.data.metrics for r in runs)
    pts = [(t.metrics["pq"], t.metrics["encoder_gflops_mean"]) for t in s.trials]
    front = {(p["pq"], p["encoder_gflops_mean"]) for p in s.front}
    assert front
    for q, c in front:  # nothing dominates a front point
        assert not any(q2 >= q and c2 <= c and (q2 > q or c2 < c) for q2, c2 in pts)
    for q, c in set(pts) - front:  # and every other point is dominated by one
        assert any(q2 >= q and c2 <= c and (q2 > q or c2 < c) for q2, c2 in front)
    assert (tmp_path / "sweeps" / "s1" / "pareto.png").stat().st_size > 0
    names = {a.path for a in MlflowClient(tracking).list_artifacts(s.run_id)}
    assert {"pareto.png", "pareto_front.json"} <= names
    storage = s.storage
    study = optuna.load_study(study_name="eco-ray-s1", storage=storage)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) and len(study.trials) == 8
    # a new sweep never takes an existing name
    with pytest.raises(ConfigError, match="exists already"):
        sweep(tiny_derived, tmp_path, sweep_cfg("trials=1"), "s1", tracking)

    # --- select under budgets, from MLflow, moving the alias
    ctx = RunContext.create(tmp_path, tracking)
    gflops = sorted(t.metrics["encoder_gflops_mean"] for t in s.trials)
    budget = gflops[len(gflops) // 2]
    r1 = select("s1", Budget.named("max_gflops", budget), ctx=ctx)
    ok = [t.metrics for t in s.trials if t.metrics["encoder_gflops_mean"] <= budget]
    assert r1.chosen["encoder_gflops_mean"] <= budget
    assert r1.chosen["pq"] == pytest.approx(max(m["pq"] for m in ok))
    client = MlflowClient(tracking)
    assert client.get_model_version_by_alias("eco-gate", "production").version == r1.version
    r2 = select("s1", Budget.named("min_pq", 0.0), ctx=ctx)
    assert r2.chosen["encoder_gflops_mean"] == pytest.approx(gflops[0])
    assert client.get_model_version_by_alias("eco-gate", "production").version == r2.version != r1.version
    with pytest.raises(RegistryError, match="cheapest available point"):
        select("s1", Budget.named("max_gflops", gflops[0] / 10), ctx=ctx)
    assert client.get_model_version_by_alias("eco-gate", "production").version == r2.version  # unchanged
    # the same selection again registers nothing new (idempotent: a job killed after registering, before
    # the alias moved, leaves no duplicate when it runs again) and moves the alias back to it
    before = len(client.search_model_versions("name='eco-gate'"))
    again = select("s1", Budget.named("max_gflops", budget), ctx=ctx)
    assert again.version == r1.version and len(client.search_model_versions("name='eco-gate'")) == before
    assert client.get_model_version_by_alias("eco-gate", "production").version == r1.version
    # a relative budget: a share of the full-depth encoder GFLOPs
    full = float(tiny_derived["manifest"]["costs"]["exits"][-1]["encoder_gflops"])
    r3 = select("s1", Budget.named("max_relative_gflops", budget / full), ctx=ctx,
                full_depth={"encoder_gflops": full})
    assert r3.chosen["run_id"] == r1.chosen["run_id"]
    # the registered gate loads and is the trial's gate
    from eco_ray.model.io import load_gate
    from eco_ray.tracking import resolve_model_dir

    gate, meta = load_gate(resolve_model_dir("models:/eco-gate@production", tracking))
    assert meta["derived_key"] == tiny_derived["manifest"]["key"]
    # trials were fitted without, and scored on, the held-out training images; the validation split only
    # reports (val_*). (This random parent scores PQ 0 everywhere, so the values themselves are checked on
    # informative data in test_derive_gate.py::test_holdout_fits_on_the_rest_and_scores_the_held_out_images.)
    from eco_ray.derive.table import DerivedDataset

    kept, held = DerivedDataset.open(tiny_derived["manifest"]["path"]).split("train").hold_out(0.25)
    assert s.selection_split == {"split": "train", "held_out": 0.25, "images": len(held)}
    assert s.eval_split == {"split": "val", "images": 16}
    assert all("val_pq" in r.data.metrics and "val_encoder_gflops_mean" in r.data.metrics for r in runs)
    assert meta["fitted_on"] == {"split": "train", "images": len(kept), "held_out": 0.25}
    assert "held out of every fit" in r2.why
    assert main(["models", "--tracking-uri", tracking]) == 0


def test_budget_is_an_optuna_constraint(tiny_derived, tmp_path, ray_local):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    costs = [e["encoder_gflops"] for e in tiny_derived["manifest"]["costs"]["exits"]]
    budget = (costs[0] + costs[-1]) / 2
    s = sweep(tiny_derived, tmp_path, sweep_cfg("trials=6", f"max_gflops={budget}", "sampler=random", "holdout=0"),
              "c1", tracking)
    # holdout 0: trials are scored on the validation split itself
    assert s.selection_split["split"] == "val" and s.static_val == s.static
    assert all(t.metrics["pq"] == t.metrics["val_pq"] for t in s.trials)
    study = optuna.load_study(study_name="eco-ray-c1", storage=s.storage)
    by_number = {t.number: t for t in s.trials}
    for t in study.trials:
        constraint = [v for k, v in t.system_attrs.items() if "constraint" in k]
        assert constraint, "every finished trial carries its constraint value"
        cost = by_number[t.number].metrics["encoder_gflops_mean"]
        assert np.isclose(np.max(constraint[0]) if np.ndim(constraint[0]) else constraint[0], cost - budget)
        assert by_number[t.number].feasible == (cost <= budget)
    feasible_tags = {r.data.tags["optuna_trial"]: r.data.tags["feasible"] for r in children(tracking, s.run_id)}
    assert feasible_tags == {str(n): str(t.feasible).lower() for n, t in by_number.items()}
    assert all(p["encoder_gflops_mean"] <= budget for p in s.front)


def test_crashing_trials_are_failed_not_left_running(tiny_derived, tmp_path, ray_local):
    space = tmp_path / "broken.yaml"
    space.write_text("beta: {type: float, low: 0.01, high: 0.5}\nepochs: {value: 0}\n")  # GateConfig rejects 0
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    s = sweep(tiny_derived, tmp_path, sweep_cfg("trials=2", f"space={space}"), "f1", tracking)
    assert s.failed == 2 and s.complete == 0 and s.front == []
    study = optuna.load_study(study_name="eco-ray-f1", storage=s.storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert sorted(r.info.status for r in children(tracking, s.run_id)) == ["FAILED", "FAILED"]


def test_pick_trial_rules():
    pts = [{"pq": 0.5, "encoder_gflops_mean": 0.1, "latency_ms_mean": 5}, {"pq": 0.6, "encoder_gflops_mean": 0.2,
           "latency_ms_mean": 7}, {"pq": 0.6, "encoder_gflops_mean": 0.15, "latency_ms_mean": 9}]
    assert pick_trial(pts, Budget.named("max_gflops", 0.16))[0] is pts[2]  # best PQ within budget, cheaper on ties
    assert pick_trial(pts, Budget.named("max_latency_ms", 6))[0] is pts[0]
    assert pick_trial(pts, Budget.named("min_pq", 0.55))[0] is pts[2]
    with pytest.raises(RegistryError, match="cheapest available point is 0.1000"):
        pick_trial(pts, Budget.named("max_gflops", 0.01))
    with pytest.raises(RegistryError, match="best reaches PQ 0.6000"):
        pick_trial(pts, Budget.named("min_pq", 0.9))
    # a detector's trials are scored on AP: the same rules, on AP; a PQ floor is refused with the one to use
    det = [{"ap": p["pq"] / 2, **{k: v for k, v in p.items() if k != "pq"}} for p in pts]
    assert pick_trial(det, Budget.named("max_gflops", 0.16))[0] is det[2]
    assert pick_trial(det, Budget.named("min_ap", 0.27))[0] is det[2]
    with pytest.raises(RegistryError, match="best reaches AP 0.3000"):
        pick_trial(det, Budget.named("min_ap", 0.9))
    with pytest.raises(RegistryError, match="use min_ap"):
        pick_trial(det, Budget.named("min_pq", 0.1))
    with pytest.raises(BudgetError, match="use min_ap"):
        Budget("ap", 0.5, relative=True)


def test_resuming_a_sweep_begun_before_held_out_scoring_keeps_its_scoring(tiny_derived, tmp_path, ray_local):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    sweep(tiny_derived, tmp_path, sweep_cfg("trials=2", "holdout=0"), "old", tracking)
    config = tmp_path / "sweeps" / "old" / "config.yaml"
    # what such a sweep's saved config looked like: no holdout key; and one trial still to run
    text = "\n".join(line for line in config.read_text().splitlines() if not line.startswith("holdout:"))
    config.write_text(text.replace("trials: 2", "trials: 3") + "\n")
    s = resume_sweep("old", RunContext.create(tmp_path))
    assert s.complete == 3 and s.selection_split["split"] == "val"
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweeps" / "old" / "trials").glob("*/result.json"))]
    assert len(results) == 3 and all(r["holdout_exit_histogram"] is None for r in results)
