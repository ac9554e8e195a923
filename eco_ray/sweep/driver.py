"""``eco-ray sweep``: Ray Tune + Optuna, multi-objective (maximise PQ, or AP on a detector's table; minimise
encoder GFLOPs or latency).

Each trial is one Step-C fit + exact evaluation from the derived table (eco_ray/sweep/trial.py), so trials
take seconds and run ``concurrency`` at a time on the local cluster or across a real one.

Robustness, by design:
- the Optuna study is the source of truth (eco_ray/sweep/study.py); ``--resume`` runs only the trials still
  missing, and trials an interruption left RUNNING are failed and run again;
- MLflow is written from the driver only (SQLite tolerates one writer): one parent run per sweep, one child
  run per finished trial, keyed by the Optuna trial number, so a resumed sweep never logs a trial twice; a
  crashed trial gets a FAILED child run;
- a trial whose actor or node is lost is run again by Tune as the same Optuna trial (``LOST_TRIAL_RETRIES``);
  one lost beyond that is failed as interrupted and another trial runs in its place; an error of the trial's
  own code is reported as its result and fails it at once (a retry would fail again);
- the Optuna storage URL's password never reaches the sweep's files or MLflow: a resume of a sweep whose
  storage has a password takes the URL again (``--storage`` or ``$OPTUNA_STORAGE``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np

from eco_ray.cluster import init_ray
from eco_ray.config import ConfigError, load_config, to_yaml
from eco_ray.resources import resolve_resource
from eco_ray.context import RunContext
from eco_ray.files import write_json as _write_json, write_text
from eco_ray.results import METRICS, OperatingPoint, SweepSummary, TrialRecord
from eco_ray.sweep.config import ABSENT_IN_OLD_SWEEPS, MOVED_KEYS, SweepConfig, has_masked_password, mask_url
from eco_ray.sweep.study import StudySearcher, close_interrupted, counted, interrupted_numbers, open_study, study_name
from eco_ray.sweep.trial import TRIAL_ERROR, read_result, trial_dir, tune_trainable

STORAGE_ENV = "OPTUNA_STORAGE"
LOGGED_METRICS = (*METRICS, *(f"val_{k}" for k in METRICS), "fit_seconds")
# a trial whose actor or node is lost is run again, as the same Optuna trial (it stays RUNNING in the study
# meanwhile, and is told once); a trial's own error is its result and is never retried (eco_ray/sweep/trial.py)
LOST_TRIAL_RETRIES = 3
LOST_TRIAL_ROUNDS = 3  # Tune runs after the first for trials lost beyond those retries


class _TrialLogger:
    """One child run per finished trial under the sweep's parent run, written from the driver only."""

    def __init__(self, tracker, parent_run_id: str, sweep: str, sdir: Path):
        from eco_ray.tracking import Tag

        self.tracker, self.parent, self.sweep, self.sdir = tracker, parent_run_id, sweep, sdir
        self.logged: set[int] = set()
        for r in tracker.child_runs(parent_run_id):
            if Tag.TRIAL not in r.data.tags:
                continue
            if r.info.status == "RUNNING":  # an interrupted driver died while logging it: log it again
                tracker.end_run(r.info.run_id, "KILLED")
                continue
            self.logged.add(int(r.data.tags[Tag.TRIAL]))

    def log(self, number: int, status: str, params: dict, metrics: dict, feasible: bool | None,
            error: str = "") -> None:
        from eco_ray.tracking import Stage, Tag

        if number in self.logged:
            return
        tags = {Tag.TRIAL: str(number), Tag.SWEEP: self.sweep}
        if feasible is not None:
            tags[Tag.FEASIBLE] = str(feasible).lower()
        if error:
            tags[Tag.ERROR] = error[:4000]
        run_id = self.tracker.start_run(Stage.SWEEP_TRIAL, f"{self.sweep}-trial-{number:05d}", tags, params,
                                        parent_run_id=self.parent)
        self.tracker.log_metrics(run_id, metrics)
        gate = trial_dir(self.sdir, number) / "gate"
        if status == "FINISHED" and gate.is_dir():
            self.tracker.log_artifacts(run_id, gate, "gate")
        self.tracker.end_run(run_id, status)
        self.logged.add(number)


def _feasible(cfg: SweepConfig, metrics: dict) -> bool | None:
    budgets = cfg.budgets()
    return all(b.admits(metrics) for b in budgets) if budgets else None


def _callback(logger: _TrialLogger, cfg: SweepConfig):
    from ray import tune

    class MlflowTrialCallback(tune.Callback):
        def _log(self, number: int, *args, **kwargs) -> None:
            # a callback that raises fails the trial in Tune, which would then run again a trial the study holds
            # as finished: a logging error is reported instead, and the end of the sweep logs what is missing
            try:
                logger.log(number, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the tracking server's error, not the trial's
                print(f"[sweep] trial {number}: could not log it to MLflow now ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); it is logged when the sweep ends",
                      file=sys.stderr, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            params = {k: v for k, v in trial.config.items() if k != "optuna_trial"}
            number = int(trial.config["optuna_trial"])
            if TRIAL_ERROR in result:  # the trial's own code failed (eco_ray/sweep/trial.py): not retried
                self._log(number, "FAILED", params, {}, None, error=result[TRIAL_ERROR])
                print(f"[sweep] trial {number} failed: {result[TRIAL_ERROR]}", file=sys.stderr, flush=True)
                return
            metrics = {k: result[k] for k in LOGGED_METRICS if k in result}
            self._log(number, "FINISHED", params, metrics, _feasible(cfg, metrics))

        def on_trial_recover(self, iteration, trials, trial, **info):
            print(f"[sweep] trial {trial.config['optuna_trial']} lost its worker (a lost node or process): "
                  f"running it again", file=sys.stderr, flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            # the study holds it as failed and interrupted already (StudySearcher.on_trial_complete)
            number = int(trial.config["optuna_trial"])
            params = {k: v for k, v in trial.config.items() if k != "optuna_trial"}
            self._log(number, "FAILED", params, {}, None,
                      error=f"lost its worker: {getattr(trial, 'error_file', '') or 'the trial actor died'}")
            print(f"[sweep] trial {number} lost its worker beyond {LOST_TRIAL_RETRIES} retries: failed as "
                  f"interrupted, another trial runs in its place (see {trial.local_path})", file=sys.stderr, flush=True)

    return MlflowTrialCallback()


def run_sweep(cfg: SweepConfig, *, derived: str | Path, ctx: RunContext, name: str | None = None) -> SweepSummary:
    """A new sweep over the derived table at ``derived``; a name already taken is refused (resume it)."""
    from eco_ray.sweep.space import load_space
    from eco_ray.tracking import Stage, Tag

    cfg.validate()
    name = name or "sweep-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    sdir = ctx.sweep_dir(name)
    if (sdir / "sweep.json").exists():
        raise ConfigError(f"a sweep named {name!r} exists already; continue it with --resume {name} or pick "
                          f"another --name")
    ds = _check_table(cfg, derived)  # before Ray starts: a bad space or table fails fast
    space_name = cfg.space_for(ds.task)
    _check_labels(load_space(space_name), ds, space_name)
    _warn_if_it_does_not_pay(ds, cfg.eval_split)
    storage = cfg.storage or f"sqlite:///{(sdir / 'optuna.db').resolve()}"
    tracker = ctx.tracker()
    sdir.mkdir(parents=True, exist_ok=True)
    saved = SweepConfig(**{**asdict(cfg), "storage": mask_url(storage)})
    write_text(sdir / "config.yaml", to_yaml(saved))
    write_text(sdir / "space.yaml", resolve_resource("search_spaces", space_name).read_text())  # frozen with it
    parent = tracker.start_run(Stage.SWEEP, name, {
        Tag.SWEEP: name, Tag.DERIVED_KEY: ds.manifest["key"], Tag.PARENT_URI: ds.manifest["parent"]["uri"],
        Tag.PARENT_VERSION: ds.manifest["parent"].get("version", ""), Tag.STUDY: study_name(name)},
        {**asdict(saved), "derived": str(Path(derived).resolve())})
    info = {"name": name, "run_id": parent, "tracking_uri": ctx.tracking_uri, "study_name": study_name(name),
            "storage": mask_url(storage), "derived": str(Path(derived).resolve()), "format": 2}
    _write_json(sdir / "sweep.json", info)
    return _run(cfg, info, storage, ds, sdir, ctx)


def resume_sweep(name: str, ctx: RunContext, storage: str | None = None) -> SweepSummary:
    """Continue the stopped sweep ``name``: only the missing trials run; the saved settings are kept."""
    sdir = ctx.sweep_dir(name)
    if not (sdir / "sweep.json").is_file():
        raise ConfigError(f"cannot resume sweep {name!r}: {sdir / 'sweep.json'} not found")
    info = json.loads((sdir / "sweep.json").read_text())
    saved_derived = dict.fromkeys(MOVED_KEYS)  # sweeps saved before these became arguments kept them here
    cfg = load_config(SweepConfig, sdir / "config.yaml", renamed=saved_derived, absent=ABSENT_IN_OLD_SWEEPS)
    if "derived" not in info:
        import yaml

        info["derived"] = (yaml.safe_load((sdir / "config.yaml").read_text()) or {}).get("derived", "")
    storage = storage or info.get("storage") or cfg.storage
    if has_masked_password(storage):
        storage = os.environ.get(STORAGE_ENV)
        if not storage:
            raise ConfigError(f"sweep {name!r} keeps its study in {info['storage']}: give the URL with its password "
                              f"again (--storage or ${STORAGE_ENV}); it is never written to disk")
    ctx = RunContext(ctx.run_dir, info["tracking_uri"], ctx.address, ctx.experiment)
    return _run(cfg, info, storage, _check_table(cfg, info["derived"]), sdir, ctx)


def _warn_if_it_does_not_pay(ds, split: str) -> None:
    """A sweep on a table whose diagnosis says a gate cannot beat static depth still runs (it may be wanted for
    its static points), but says so first."""
    from eco_ray.diagnose import DiagnoseError, diagnose

    try:
        d = diagnose(ds.split(split), ds.categories, ds.costs("gflops"), resamples=200)
    except DiagnoseError:
        return  # one view: nothing to tell
    if d.verdict == "does not pay":
        print(f"[sweep] warning: the diagnosis of this table says adaptive depth does not pay here: {d.reasons[1]} "
              f"(eco-ray diagnose --derived {ds.root})", file=sys.stderr, flush=True)


def _check_labels(space: dict, ds, space_name: str) -> None:
    """Every label source the space can sample is one the table has: else every trial would fail."""
    spec = space.get("quality")
    if spec is None:
        return
    sampled = spec.get("choices", [spec.get("value")])
    have = ds.split_type.measures
    wrong = [q for q in sampled if q is not None and q not in have]
    if wrong:
        raise ConfigError(f"the search space {space_name!r} samples quality {wrong}, which a {ds.task} table does not "
                          f"have (it has {list(have)}); use a space whose quality choices are among them")


def _check_table(cfg: SweepConfig, derived: str | Path):
    from eco_ray.derive.table import DerivedDataset

    ds = DerivedDataset.open(derived)
    for split in (cfg.train_split, cfg.eval_split):
        ds.split(split)
    for budget in cfg.budgets():
        ds.costs(budget.cost_measure)  # a clear error when the table has no latency
    if cfg.objective_cost == "latency":
        ds.costs("latency")
    return ds


def _run(cfg: SweepConfig, info: dict, storage: str, ds, sdir: Path, ctx: RunContext) -> SweepSummary:
    from ray import tune

    name = info["name"]
    tracker = ctx.tracker()
    derived = str(Path(info["derived"]).resolve())
    study = open_study(cfg, name, storage)
    interrupted = close_interrupted(study)
    logger = _TrialLogger(tracker, info["run_id"], name, sdir)
    _log_missing(study, logger, cfg, sdir)  # finished before an interruption but not yet in MLflow
    remaining = cfg.trials - counted(study)
    t0 = time.perf_counter()
    if remaining > 0:
        init_ray(ctx.address, log_to_driver=False)
        trainable = tune.with_resources(functools.partial(
            tune_trainable, derived=derived, sweep_dir=str(sdir.resolve()), train_split=cfg.train_split,
            eval_split=cfg.eval_split, holdout=cfg.holdout), {"cpu": cfg.cpus_per_trial})
        print(f"[sweep] {name}: {remaining} trials to run, {cfg.concurrency} at a time, sampler {cfg.sampler}",
              file=sys.stderr, flush=True)
        # a round ends with fewer counted trials only when some lost their worker beyond Tune's retries: those are
        # marked interrupted (not counted) and the next round runs that many more
        started = 0
        for _ in range(1 + LOST_TRIAL_ROUNDS):
            missing = cfg.trials - counted(study)
            if missing <= 0:
                break
            started += missing
            searcher = StudySearcher(study, _space_of(cfg, sdir, ds.task), [ds.metric, cfg.objective_key],
                                     cfg.budgets())
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=missing,
                                            max_concurrent_trials=cfg.concurrency, reuse_actors=True),
                # each launch is its own Tune run: the study, not Tune's state, is what a resume continues
                run_config=tune.RunConfig(name=f"{name}-{uuid.uuid4().hex[:8]}",
                                          storage_path=str(ctx.ray_storage.resolve() / "sweeps"),
                                          callbacks=[_callback(logger, cfg)], verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=LOST_TRIAL_RETRIES)))
            with contextlib.redirect_stdout(sys.stderr):  # Tune prints tables to stdout; keep stdout for --json
                tuner.fit()
        if cfg.trials - counted(study) > 0:
            print(f"[sweep] {name}: {cfg.trials - counted(study)} trials still missing after {LOST_TRIAL_ROUNDS} more "
                  f"rounds for trials that lost their workers; continue with eco-ray sweep --resume {name}",
                  file=sys.stderr, flush=True)
        remaining = started
    seconds = time.perf_counter() - t0
    study = open_study(cfg, name, storage)
    close_interrupted(study)
    _log_missing(study, logger, cfg, sdir)
    summary = summarize(study, cfg, ds, sdir, name, mask_url(storage))
    summary.run_id, summary.tracking_uri, summary.seconds = info["run_id"], ctx.tracking_uri, round(seconds, 2)
    summary.path, summary.plot = str(sdir), str(sdir / "pareto.png")
    summary.trials_run_now, summary.interrupted_trials_closed = max(remaining, 0), interrupted
    summary.trials_per_minute = (remaining / seconds * 60) if remaining > 0 and seconds > 0 else None
    _log_front(tracker, info["run_id"], summary, sdir)
    _write_json(sdir / "summary.json", summary.to_json())
    return summary


def _space_of(cfg: SweepConfig, sdir: Path, task: str = "panoptic") -> dict:
    """The space a sweep samples: the copy frozen in its directory when it started (a resumed sweep keeps the
    space its study began with, even if the shipped one changed since), else the configured one."""
    from eco_ray.sweep.space import load_space

    frozen = sdir / "space.yaml"
    if frozen.is_file():
        return load_space(frozen)
    try:
        return load_space(cfg.space_for(task))
    except ConfigError as e:
        raise ConfigError(f"sweep {sdir.name!r} was started with the search space {cfg.space!r}, which is gone ({e}); "
                          "start a new sweep (a study cannot change its space)") from None


def _log_missing(study, logger: _TrialLogger, cfg: SweepConfig, sdir: Path) -> None:
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number in logger.logged:
            continue
        r = read_result(sdir, t.number)
        if r is not None:
            logger.log(t.number, "FINISHED", r["params"], r["metrics"], _feasible(cfg, r["metrics"]))


def summarize(study, cfg: SweepConfig, ds, sdir: Path, name: str, storage: str) -> SweepSummary:
    """Trials, the Pareto front of feasible complete trials, and the static / oracle baselines."""
    import optuna

    from eco_ray.derive.table import relative_costs
    from eco_ray.gate.evaluate import oracle_curve, static_baseline
    from eco_ray.tradeoff import pareto_front

    key = cfg.objective_key
    interrupted = set(interrupted_numbers(study))
    trials = []
    for t in study.get_trials(deepcopy=False):
        record = TrialRecord(t.number, t.state.name, dict(t.params), t.number in interrupted)
        r = read_result(sdir, t.number) if t.state == optuna.trial.TrialState.COMPLETE else None
        if r is not None:
            record.metrics = r["metrics"]
            record.feasible = all(b.admits(r["metrics"]) for b in cfg.budgets())
        trials.append(record)
    feasible = [t for t in trials if t.metrics is not None and t.feasible]
    front_idx = pareto_front([t.metrics[ds.metric] for t in feasible], [t.metrics[key] for t in feasible]) \
        if feasible else np.zeros(0, int)
    front = [{"number": feasible[i].number, "params": feasible[i].params, **feasible[i].metrics} for i in front_idx]
    val = ds.split(cfg.eval_split)
    selection = ds.split(cfg.train_split).hold_out(cfg.holdout)[1] if cfg.holdout > 0 else val
    cols = ds.cost_columns()
    rel = relative_costs(ds.costs("gflops"))

    def baselines(split) -> tuple[list[OperatingPoint], list[OperatingPoint]]:
        return static_baseline(split, ds.categories, cols), oracle_curve(split, ds.categories, cols, rel)

    (static, oracle), (static_val, oracle_val) = baselines(selection), baselines(val)
    return SweepSummary(
        name=name, study_name=study_name(name), storage=storage, objective_cost=key, metric=ds.metric,
        constraints={b.key: b.limit for b in cfg.budgets()}, trials=trials, front=front,
        selection_split={"split": cfg.train_split, "held_out": cfg.holdout, "images": len(selection)}
        if cfg.holdout > 0 else {"split": cfg.eval_split, "held_out": 0.0, "images": len(val)},
        eval_split={"split": cfg.eval_split, "images": len(val)},
        static=static, oracle=oracle, static_val=static_val, oracle_val=oracle_val)


def _log_front(tracker, run_id: str, summary: SweepSummary, sdir: Path) -> None:
    from eco_ray.plots import plot_sweep

    plot = plot_sweep(summary, sdir / "pareto.png")
    table = sdir / "pareto_front.json"
    table.write_text(json.dumps(summary.front, indent=2, default=float))
    tracker.log_metrics(run_id, {"trials_complete": summary.complete, "trials_feasible": summary.feasible,
                                 "front_size": len(summary.front)})
    tracker.log_artifact(run_id, table)
    tracker.log_artifact(run_id, plot)
