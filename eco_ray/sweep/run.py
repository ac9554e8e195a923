"""``eco-ray sweep``: Ray Tune + Optuna, multi-objective (maximise PQ, minimise encoder GFLOPs or latency).

Each trial is one Step-C fit + exact evaluation from the derived table (eco_ray/gate/run.py), so trials
take seconds and run ``concurrency`` at a time on the local cluster or across a real one.

Robustness, by design:
- the Optuna study (name ``eco-ray-<sweep>``, storage SQLite in the sweep directory or an RDB URL) is the
  source of truth; ``--resume`` runs only the trials still missing, and trials an interruption left
  RUNNING are marked FAIL (interrupted) so that nothing stays RUNNING;
- a compute budget is an Optuna constraint (``trial.set_constraint``): infeasible trials stay in the
  study, marked infeasible, and the samplers steer away from them;
- objectives are always finite (a NaN would leave the Optuna trial RUNNING forever);
- MLflow is written from the driver only (SQLite tolerates one writer): one parent run per sweep, one
  child run per finished trial, keyed by the Optuna trial number, so a resumed sweep never logs a
  trial twice; a crashed trial gets a FAILED child run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from eco_ray.cluster import init_ray
from eco_ray.config import ConfigError, load_config
from eco_ray.gate.fit import GateConfig

SAMPLERS = ("tpe", "nsga2", "random")
OBJECTIVE_COSTS = {"gflops": "encoder_gflops_mean", "latency": "latency_ms_mean"}
REPORTED = ("pq", "pq_things", "pq_stuff", "miou", "encoder_gflops_mean", "encoder_gflops_p95", "latency_ms_mean",
            "latency_ms_p95", "layers_mean")


@dataclass
class SweepConfig:
    derived: str = ""  # a derived-dataset directory (eco-ray derive)
    space: str = "search_spaces/default.yaml"
    trials: int = 40  # finished trials the sweep ends with
    concurrency: int = 2  # trials at a time
    sampler: str = "tpe"  # tpe | nsga2 | random
    seed: int = 0
    nsga2_population: int = 16
    objective_cost: str = "gflops"  # the cost objective: gflops (mean encoder GFLOPs) | latency (mean ms)
    max_gflops: float | None = None  # budget on mean encoder GFLOPs (an Optuna constraint)
    max_latency_ms: float | None = None  # budget on mean latency
    storage: str | None = None  # Optuna storage URL; default sqlite in the sweep directory
    cpus_per_trial: float = 1.0
    train_split: str = "train"
    eval_split: str = "val"
    # share of the training split's images held out of every trial's gate fit: the objectives, the budget
    # and `eco-ray select` use them, so the eval split is never selected on and its PQ stays an unbiased
    # estimate; 0 = select on the eval split itself (optimistic: the best of many trials on the same images)
    holdout: float = 0.25
    run_dir: str = "runs"
    experiment: str = "eco-ray"

    def validate(self) -> None:
        if not self.derived:
            raise ValueError("derived must name a derived-dataset directory (eco-ray derive)")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.objective_cost not in OBJECTIVE_COSTS:
            raise ValueError(f"objective_cost must be one of {list(OBJECTIVE_COSTS)}, got {self.objective_cost!r}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.trials < 1 or self.concurrency < 1 or self.nsga2_population < 2 or self.cpus_per_trial <= 0:
            raise ValueError("need trials >= 1, concurrency >= 1, nsga2_population >= 2, cpus_per_trial > 0")
        for name in ("max_gflops", "max_latency_ms"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v}")

    def constraints(self) -> dict[str, float]:
        out = {}
        if self.max_gflops is not None:
            out["encoder_gflops_mean"] = float(self.max_gflops)
        if self.max_latency_ms is not None:
            out["latency_ms_mean"] = float(self.max_latency_ms)
        return out


# ------------------------------------------------------------------------------------------------- trial
_DATASETS: dict = {}


def _dataset(path: str):
    """Trial actors are reused: read the derived table once per process."""
    from eco_ray.derive.table import DerivedDataset

    if path not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[path] = DerivedDataset.open(path)
    return _DATASETS[path]


def run_trial(config: dict, derived: str, sweep_dir: str, train_split: str, eval_split: str,
              holdout: float = 0.0) -> dict:
    """One trial, Ray-free: fit + exact evaluation, the gate saved under the sweep directory; returns the
    finite metrics Tune reports: the selection metrics (on the held-out training images, or on the eval split
    when ``holdout`` is 0) under their plain names, the eval split's under ``val_<name>``."""
    from eco_ray.gate.run import fit_and_evaluate
    from eco_ray.model.io import save_gate

    params = {k: v for k, v in config.items() if k != "optuna_trial"}
    number = int(config["optuna_trial"])
    cfg = load_config(GateConfig, layers=[params])
    ds = _dataset(derived)
    res = fit_and_evaluate(ds, cfg, [cfg.beta], train_split, eval_split, holdout=holdout)
    point = res["points"][0]
    worst_cost = {"encoder_gflops": float(ds.costs("gflops")[-1]), "latency_ms": float(ds.costs("latency")[-1])
                  if "latency_ms" in ds.manifest["costs"]["exits"][0] else 0.0, "layers": float(ds.exits[-1])}

    def finite(evaluation: dict) -> dict:
        out = {}
        for key in REPORTED:
            value = float(evaluation.get(key, float("nan")))
            if not math.isfinite(value):  # never report a NaN: Optuna would keep the trial RUNNING
                value = 0.0 if key.startswith(("pq", "miou")) else worst_cost[key.rsplit("_", 1)[0]]
            out[key] = value
        return out

    val = finite(point["gate"])
    metrics = {**(finite(point["holdout"]["gate"]) if holdout > 0 else val), **{f"val_{k}": v for k, v in val.items()},
               "fit_seconds": res["fit_seconds"]}
    gate_dir = Path(sweep_dir) / "trials" / f"{number:05d}"
    save_gate(res["gates"][cfg.beta], gate_dir / "gate", extra={
        "derived_key": ds.manifest["key"], "parent": ds.manifest["parent"], "beta": cfg.beta, "cost": cfg.cost,
        "costs": {m: ds.costs(m).tolist() for m in ("gflops", "latency", "layers")
                  if m != "latency" or "latency_ms" in ds.manifest["costs"]["exits"][0]},
        "categories": ds.manifest["categories"], "config": asdict(cfg),
        "gate_input": ds.manifest.get("gate_input", "stride32"),
        "fitted_on": {"split": train_split, "images": res["train_images"], "held_out": holdout},
        "operating_points": [{"beta": cfg.beta, "split": eval_split, **val,
                              "exit_histogram": point["gate"]["exit_histogram"]}]})
    (gate_dir / "result.json").write_text(json.dumps({
        "optuna_trial": number, "params": params, "metrics": metrics, "exit_histogram": point["gate"]["exit_histogram"],
        "holdout_exit_histogram": point["holdout"]["gate"]["exit_histogram"] if holdout > 0 else None}))
    return metrics


def _tune_trainable(config: dict, derived: str, sweep_dir: str, train_split: str, eval_split: str,
                    holdout: float) -> None:
    from ray import tune

    tune.report(run_trial(config, derived, sweep_dir, train_split, eval_split, holdout))


# ------------------------------------------------------------------------------------------------ driver
def sweep_dir(run_dir: str, name: str) -> Path:
    return Path(run_dir) / "sweeps" / name


def _make_sampler(cfg: SweepConfig):
    import optuna

    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=cfg.nsga2_population)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class ConstrainedOptunaSearch(OptunaSearch):
        """OptunaSearch that records compute budgets as Optuna 5 constraints (value <= 0: feasible)."""

        def __init__(self, *args, constraints: dict[str, float] | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._constraints = constraints or {}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and result and not error:
                for key, limit in self._constraints.items():
                    ot_trial.set_constraint(key, float(result[key]) - limit)
            super().on_trial_complete(trial_id, result, error)

    return ConstrainedOptunaSearch


def _study(cfg: SweepConfig, name: str, directions: list[str]):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=f"eco-ray-{name}", storage=cfg.storage, directions=directions,
                               load_if_exists=True, sampler=_make_sampler(cfg))


def _close_interrupted(study) -> int:
    """Trials an interrupted driver left RUNNING -> FAIL, marked as interrupted (they are re-run)."""
    import optuna

    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        n += 1
    return n


def _counted(study) -> int:
    """Finished trials that count toward ``trials``: complete ones and real crashes (not interruptions)."""
    import optuna

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state == optuna.trial.TrialState.COMPLETE
               or (t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("interrupted")))


class _MlflowLogger:
    """One child run per finished trial under the sweep's parent run, written from the driver only."""

    def __init__(self, tracking_uri: str, parent_run_id: str, experiment_id: str, sweep: str, sdir: Path):
        from mlflow import MlflowClient

        self.client, self.parent, self.experiment_id = MlflowClient(tracking_uri), parent_run_id, experiment_id
        self.sweep, self.sdir = sweep, sdir
        self.logged = set()
        for r in self._children():
            if "optuna_trial" not in r.data.tags:
                continue
            if r.info.status == "RUNNING":  # an interrupted driver died while logging it: log it again
                self.client.set_terminated(r.info.run_id, status="KILLED")
                continue
            self.logged.add(int(r.data.tags["optuna_trial"]))

    def _children(self):
        return self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent}'",
                                       max_results=50000)

    def log(self, number: int, status: str, params: dict, metrics: dict, feasible: bool | None,
            error: str = "") -> None:
        from mlflow.entities import Metric, Param

        if number in self.logged:
            return
        tags = {"mlflow.parentRunId": self.parent, "optuna_trial": str(number), "eco_ray.stage": "sweep-trial",
                "sweep": self.sweep}
        if feasible is not None:
            tags["feasible"] = str(feasible).lower()
        if error:
            tags["error"] = error[:4000]
        run = self.client.create_run(self.experiment_id, run_name=f"{self.sweep}-trial-{number:05d}", tags=tags)
        now = int(time.time() * 1000)
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                              metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        gate = self.sdir / "trials" / f"{number:05d}" / "gate"
        if status == "FINISHED" and gate.is_dir():
            self.client.log_artifacts(run.info.run_id, str(gate), "gate")
        self.client.set_terminated(run.info.run_id, status=status)
        self.logged.add(number)


def _callback(logger: _MlflowLogger, constraints: dict[str, float]):
    from ray import tune

    class MlflowTrialCallback(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            metrics = {k: result[k] for k in (*REPORTED, *(f"val_{k}" for k in REPORTED), "fit_seconds")
                       if k in result}
            feasible = all(metrics.get(k, math.inf) <= v for k, v in constraints.items()) if constraints else None
            params = {k: v for k, v in trial.config.items() if k != "optuna_trial"}
            logger.log(int(trial.config["optuna_trial"]), "FINISHED", params, metrics, feasible)

        def on_trial_error(self, iteration, trials, trial, **info):
            params = {k: v for k, v in trial.config.items() if k != "optuna_trial"}
            logger.log(int(trial.config["optuna_trial"]), "FAILED", params, {}, None,
                       error=str(getattr(trial, "error_file", "") or "trial raised"))
            print(f"[sweep] trial {trial.config['optuna_trial']} failed: see {trial.local_path}", file=sys.stderr)

    return MlflowTrialCallback()


def run_sweep(cfg: SweepConfig | None = None, *, name: str | None = None, resume: str | None = None,
              tracking_uri: str | None = None, address: str | None = None, run_dir: str | None = None) -> dict:
    from mlflow import MlflowClient
    from ray import tune

    from eco_ray.config import to_yaml
    from eco_ray.derive.table import DerivedDataset
    from eco_ray.registry import default_tracking_uri, ensure_experiment, flat_params
    from eco_ray.sweep.space import define_by_run, load_space

    if resume:
        sdir = sweep_dir(run_dir or "runs", resume)
        if not (sdir / "sweep.json").is_file():
            raise ConfigError(f"cannot resume sweep {resume!r}: {sdir / 'sweep.json'} not found")
        info = json.loads((sdir / "sweep.json").read_text())
        cfg = load_config(SweepConfig, sdir / "config.yaml")
        if "holdout:" not in (sdir / "config.yaml").read_text():
            cfg.holdout = 0.0  # a sweep begun before held-out selection existed: go on scoring as it began
        name, tracking_uri = resume, info["tracking_uri"]
    else:
        cfg = cfg or SweepConfig()
        cfg.validate()
        name = name or "sweep-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        sdir = sweep_dir(cfg.run_dir, name)
        if (sdir / "sweep.json").exists():
            raise ConfigError(f"a sweep named {name!r} exists already; continue it with --resume {name} or pick "
                              f"another --name")
    space = load_space(cfg.space)  # before Ray starts: a bad space or table fails fast
    ds = DerivedDataset.open(cfg.derived)
    for split in (cfg.train_split, cfg.eval_split):
        ds.split(split)
    if cfg.objective_cost == "latency" or cfg.max_latency_ms is not None:
        ds.costs("latency")  # a clear error when the table has no latency
    cfg.derived = str(Path(cfg.derived).resolve())
    cfg.storage = cfg.storage or f"sqlite:///{(sdir / 'optuna.db').resolve()}"
    tracking_uri = tracking_uri or default_tracking_uri(cfg.run_dir)
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(cfg.experiment, cfg.run_dir, tracking_uri)
    if not resume:
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / "config.yaml").write_text(to_yaml(cfg))
        parent = client.create_run(experiment_id, run_name=name, tags={
            "eco_ray.stage": "sweep", "sweep": name, "derived_key": ds.manifest["key"],
            "parent_uri": ds.manifest["parent"]["uri"], "parent_version": ds.manifest["parent"].get("version", ""),
            "study_name": f"eco-ray-{name}"})
        client.log_batch(parent.info.run_id, params=[__import__("mlflow").entities.Param(k, v[:6000])
                                                     for k, v in flat_params(asdict(cfg)).items()])
        info = {"name": name, "run_id": parent.info.run_id, "tracking_uri": tracking_uri,
                "study_name": f"eco-ray-{name}", "storage": cfg.storage}
        (sdir / "sweep.json").write_text(json.dumps(info, indent=2))
    cost_key = OBJECTIVE_COSTS[cfg.objective_cost]
    study = _study(cfg, name, ["maximize", "minimize"])
    interrupted = _close_interrupted(study)
    logger = _MlflowLogger(tracking_uri, info["run_id"], experiment_id, name, sdir)
    _log_missing(study, logger, cfg, sdir)  # finished before an interruption but not yet in MLflow
    remaining = cfg.trials - _counted(study)
    t0 = time.perf_counter()
    if remaining > 0:
        init_ray(address, log_to_driver=False)
        searcher = _searcher_class()(
            space=functools.partial(define_by_run, space=space), metric=["pq", cost_key], mode=["max", "min"],
            sampler=_make_sampler(cfg), study_name=f"eco-ray-{name}", storage=_storage(cfg.storage),
            constraints=cfg.constraints())
        trainable = tune.with_resources(functools.partial(
            _tune_trainable, derived=cfg.derived, sweep_dir=str(sdir.resolve()), train_split=cfg.train_split,
            eval_split=cfg.eval_split, holdout=cfg.holdout), {"cpu": cfg.cpus_per_trial})
        attempt = len(list((Path(cfg.run_dir) / "ray" / "sweeps").glob(f"{name}-*"))) if \
            (Path(cfg.run_dir) / "ray" / "sweeps").exists() else 0
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=remaining,
                                        max_concurrent_trials=cfg.concurrency, reuse_actors=True),
            run_config=tune.RunConfig(name=f"{name}-{attempt}", storage_path=str((Path(cfg.run_dir) / "ray" /
                                                                                   "sweeps").resolve()),
                                      callbacks=[_callback(logger, cfg.constraints())], verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)))
        print(f"[sweep] {name}: {remaining} trials to run, {cfg.concurrency} at a time, sampler {cfg.sampler}",
              file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # Tune prints tables to stdout; keep stdout for --json
            tuner.fit()
    seconds = time.perf_counter() - t0
    study = _study(cfg, name, ["maximize", "minimize"])
    _close_interrupted(study)
    _log_missing(study, logger, cfg, sdir)
    summary = summarize(study, cfg, ds, sdir, name)
    summary.update({"run_id": info["run_id"], "tracking_uri": tracking_uri, "seconds": round(seconds, 2),
                    "path": str(sdir), "plot": str(sdir / "pareto.png"),
                    "trials_run_now": max(remaining, 0), "interrupted_trials_closed": interrupted,
                    "trials_per_minute": (max(remaining, 0) / seconds * 60) if remaining > 0 and seconds > 0 else None})
    _log_front(client, info["run_id"], summary, sdir)
    (sdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _storage(url: str):
    import optuna

    return optuna.storages.RDBStorage(url) if "://" in url else url


def _log_missing(study, logger: _MlflowLogger, cfg: SweepConfig, sdir: Path) -> None:
    import optuna

    constraints = cfg.constraints()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number in logger.logged:
            continue
        path = sdir / "trials" / f"{t.number:05d}" / "result.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        feasible = all(r["metrics"][k] <= v for k, v in constraints.items()) if constraints else None
        logger.log(t.number, "FINISHED", r["params"], r["metrics"], feasible)


def summarize(study, cfg: SweepConfig, ds, sdir: Path, name: str) -> dict:
    """Trials, the Pareto front of feasible complete trials, and the static / oracle baselines."""
    import optuna

    from eco_ray.derive.table import relative_costs
    from eco_ray.gate.report import oracle_curve, static_baseline
    from eco_ray.tradeoff import pareto_front

    cost_key = OBJECTIVE_COSTS[cfg.objective_cost]
    trials = []
    for t in study.get_trials(deepcopy=False):
        entry = {"number": t.number, "state": t.state.name, "params": t.params,
                 "interrupted": bool(t.user_attrs.get("interrupted"))}
        path = sdir / "trials" / f"{t.number:05d}" / "result.json"
        if t.state == optuna.trial.TrialState.COMPLETE and path.is_file():
            entry["metrics"] = json.loads(path.read_text())["metrics"]
            entry["feasible"] = all(entry["metrics"][k] <= v for k, v in cfg.constraints().items())
        trials.append(entry)
    done = [t for t in trials if "metrics" in t]
    feasible = [t for t in done if t["feasible"]]
    front_idx = pareto_front([t["metrics"]["pq"] for t in feasible], [t["metrics"][cost_key] for t in feasible]) \
        if feasible else np.zeros(0, int)
    front = [{"number": feasible[i]["number"], "params": feasible[i]["params"], **feasible[i]["metrics"]}
             for i in front_idx]
    val = ds.split(cfg.eval_split)
    selection = ds.split(cfg.train_split).hold_out(cfg.holdout)[1] if cfg.holdout > 0 else val
    cols = ds.cost_columns()
    rel = relative_costs(ds.costs("gflops"))

    def baselines(split) -> dict:
        return {"static": [{k: p[k] for k in ("exit", "pq", "pq_things", "pq_stuff", "encoder_gflops_mean",
                                              "latency_ms_mean") if k in p}
                           for p in static_baseline(split, ds.categories, cols)],
                "oracle": [{k: p[k] for k in ("beta", "pq", "encoder_gflops_mean", "latency_ms_mean") if k in p}
                           for p in oracle_curve(split, ds.categories, cols, rel)]}

    sel_base, val_base = baselines(selection), baselines(val)
    # "static" / "oracle": on the split the trials were selected on (the front's axes); "*_val": the eval split
    return {"name": name, "study_name": f"eco-ray-{name}", "storage": cfg.storage, "objective_cost": cost_key,
            "constraints": cfg.constraints(), "trials": trials, "complete": len(done), "feasible": len(feasible),
            "failed": sum(t["state"] == "FAIL" and not t["interrupted"] for t in trials), "front": front,
            "selection_split": {"split": cfg.train_split, "held_out": cfg.holdout, "images": len(selection)}
            if cfg.holdout > 0 else {"split": cfg.eval_split, "held_out": 0.0, "images": len(val)},
            "eval_split": {"split": cfg.eval_split, "images": len(val)},
            **sel_base, "static_val": val_base["static"], "oracle_val": val_base["oracle"]}


def _log_front(client, run_id: str, summary: dict, sdir: Path) -> None:
    from mlflow.entities import Metric

    plot = plot_sweep(summary, sdir / "pareto.png")
    table = sdir / "pareto_front.json"
    table.write_text(json.dumps(summary["front"], indent=2, default=float))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("trials_complete", summary["complete"], now, 0),
                                      Metric("trials_feasible", summary["feasible"], now, 0),
                                      Metric("front_size", len(summary["front"]), now, 0)])
    client.log_artifact(run_id, str(table))
    client.log_artifact(run_id, str(plot))


def plot_sweep(summary: dict, path: Path) -> Path:
    """Two panels on the same cost axis: the split the trials were selected on (all trials, the Pareto front,
    static depth, the oracle, the budget) and the eval split (the front's gates, static depth, the oracle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = summary["objective_cost"]
    sel = summary.get("selection_split") or {"split": "val", "held_out": 0.0}
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.5), sharex=True)
    ax = axes[0]
    done = [t for t in summary["trials"] if "metrics" in t]
    for feasible, style in ((True, dict(c="tab:blue", alpha=0.5)), (False, dict(c="tab:red", alpha=0.4, marker="x"))):
        pts = [t["metrics"] for t in done if t["feasible"] == feasible]
        if pts:
            ax.scatter([p[key] for p in pts], [p["pq"] for p in pts], s=14,
                       label="trials" if feasible else "trials over budget", **style)
    front = sorted(summary["front"], key=lambda p: p[key])
    if front:
        ax.step([p[key] for p in front], [p["pq"] for p in front], where="post", c="tab:blue", lw=1.5)
        ax.scatter([p[key] for p in front], [p["pq"] for p in front], s=40, facecolors="none", edgecolors="k",
                   label="Pareto front")
    for limit_key, limit in summary["constraints"].items():
        if limit_key == key:
            ax.axvline(limit, c="tab:red", ls=":", lw=1, label="budget")
    title = (f"selected on {sel.get('images', '?')} held-out {sel['split']} images" if sel["held_out"] > 0
             else f"selected on the {sel['split']} split itself (optimistic)")
    _baselines(ax, summary["static"], summary["oracle"], key, f"{summary['name']}: {summary['complete']} trials, "
               f"front of {len(front)}\n{title}")
    ax = axes[1]
    vkey = f"val_{key}"
    front_val = sorted((p for p in summary["front"] if vkey in p), key=lambda p: p[vkey])
    if front_val:
        ax.scatter([p[vkey] for p in front_val], [p["val_pq"] for p in front_val], s=40, c="tab:blue",
                   label="the front's gates")
    ev = summary.get("eval_split") or {"split": "val", "images": "?"}
    _baselines(ax, summary.get("static_val", summary["static"]), summary.get("oracle_val", summary["oracle"]), key,
               f"the same gates on the {ev['split']} split ({ev['images']} images, never selected on)")
    axes[0].set_ylabel("PQ")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _baselines(ax, static: list[dict], oracle: list[dict], key: str, title: str) -> None:
    if static and key in static[0]:
        ax.plot([p[key] for p in static], [p["pq"] for p in static], "o-", c="0.3", label="static depth")
    oracle = sorted((p for p in oracle if key in p), key=lambda p: p[key])
    ax.plot([p[key] for p in oracle], [p["pq"] for p in oracle], "--", c="tab:green", label="oracle (per image)")
    ax.set_xlabel({"encoder_gflops_mean": "mean encoder GFLOPs per image", "latency_ms_mean": "mean latency (ms)"}[key])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
