"""The Optuna side of a sweep, through Optuna's and Ray Tune's public APIs only.

- The study (name ``eco-ray-<sweep>``, storage SQLite in the sweep directory or an RDB URL) is the source of
  truth: trials count when they are COMPLETE or really failed; trials an interrupted driver left RUNNING are
  failed and listed in the study's user attribute ``interrupted_trials`` (they are run again).
- :class:`StudySearcher` is Ray Tune's search algorithm over the study's ask-and-tell interface: each Tune
  trial asks the study for a trial (the define-by-run space samples it), and its result is told back with
  both objectives; a compute budget becomes an Optuna constraint on the trial before it is told
  (``Trial.set_constraint``: value <= 0 feasible), so infeasible trials stay in the study, marked, and the
  samplers steer away from them. Objectives are always finite (a NaN would leave a trial RUNNING).
"""

from __future__ import annotations

import math

from ray.tune.search import Searcher

from eco_ray.budget import Budget
from eco_ray.sweep.config import SweepConfig
from eco_ray.sweep.space import define_by_run

INTERRUPTED = "interrupted_trials"


def study_name(sweep: str) -> str:
    return f"eco-ray-{sweep}"


def make_sampler(cfg: SweepConfig):
    import optuna

    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=cfg.nsga2_population)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def open_study(cfg: SweepConfig, sweep: str, storage: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=study_name(sweep), storage=storage, directions=["maximize", "minimize"],
                               load_if_exists=True, sampler=make_sampler(cfg))


def close_interrupted(study) -> int:
    """Trials an interrupted driver left RUNNING -> FAIL, remembered as interrupted (they are re-run)."""
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        return 0
    for t in running:
        mark_interrupted(study, t.number)
    for t in running:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return len(running)


def mark_interrupted(study, number: int) -> None:
    """Trial ``number`` (failed already) failed through no fault of its own (its driver, worker or node was lost):
    it does not count toward the sweep's trials, so another runs in its place."""
    study.set_user_attr(INTERRUPTED, sorted(set(interrupted_numbers(study)) | {number}))


def interrupted_numbers(study) -> list[int]:
    """Trials failed because a driver was interrupted (studies begun by earlier versions marked each such
    trial with its own ``interrupted`` user attribute)."""
    legacy = [t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get("interrupted")]
    return sorted(set(study.user_attrs.get(INTERRUPTED, [])) | set(legacy))


def counted(study) -> int:
    """Finished trials that count toward ``trials``: complete ones and real crashes (not interruptions)."""
    import optuna

    interrupted = set(interrupted_numbers(study))
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state == optuna.trial.TrialState.COMPLETE
               or (t.state == optuna.trial.TrialState.FAIL and t.number not in interrupted))


class StudySearcher(Searcher):
    """Ray Tune search algorithm over an Optuna study: multi-objective, budgets as Optuna constraints."""

    def __init__(self, study, space: dict, objectives: list[str], budgets: list[Budget]):
        super().__init__()  # multi-objective: Tune itself ranks nothing, Optuna keeps the front
        self.study, self.space, self.objectives, self.budgets = study, space, list(objectives), list(budgets)
        self._asked: dict = {}

    def suggest(self, trial_id: str) -> dict | None:
        trial = self.study.ask()
        self._asked[trial_id] = trial
        fixed = define_by_run(trial, self.space)
        return {**trial.params, **fixed}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        trial = self._asked.pop(trial_id, None)
        if trial is None:
            return
        if error:
            # the trainable reports its own errors as results (eco_ray/sweep/trial.py), so a Tune-level error is
            # a lost worker (its actor or node) that Tune's retries did not mend: marked interrupted before it is
            # failed, so that it never counts and the sweep runs another trial in its place
            mark_interrupted(self.study, trial.number)
        values = None if (error or not result) else [result.get(k) for k in self.objectives]
        if values is None or any(v is None or not math.isfinite(float(v)) for v in values):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        for budget in self.budgets:
            trial.set_constraint(budget.key, budget.violation(result))
        self.study.tell(trial, [float(v) for v in values])
