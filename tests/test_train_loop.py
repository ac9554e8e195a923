"""Step A's loop parts without Ray: the exit schedule (which exits a step trains, their weights) and one step."""

from collections import Counter

import numpy as np
import pytest
import torch

from eco_ray.data import CocoPanopticDataset
from eco_ray.model.config import load_model_config
from eco_ray.model.early_exit import EarlyExitMask2Former
from eco_ray.train.config import EXIT_SAMPLING
from eco_ray.train.loop import ExitSchedule, make_optimizer, train_step, training_batches

EXITS = [2, 3, 4, 5, 6]


def counts(schedule: ExitSchedule, steps: int = 4000) -> Counter:
    return Counter(k for step in range(steps) for k in schedule.exits_for_step(step))


@pytest.mark.parametrize("sampling", EXIT_SAMPLING)
def test_schedule_is_a_function_of_seed_and_step(sampling):
    """Every data-parallel worker and a resumed run must train the same exits at the same step."""
    a, b = ExitSchedule(EXITS, sampling, seed=3), ExitSchedule(EXITS, sampling, seed=3)
    assert [a.exits_for_step(s) for s in range(200)] == [b.exits_for_step(s) for s in reversed(range(200))][::-1]


def test_uniform_and_deep_sample_one_exit_with_their_probabilities():
    uniform, deep = counts(ExitSchedule(EXITS, "uniform")), counts(ExitSchedule(EXITS, "deep"))
    assert sum(uniform.values()) == sum(deep.values()) == 4000  # one exit per step
    for k in EXITS:
        assert abs(uniform[k] / 4000 - 1 / 5) < 0.03
        assert abs(deep[k] / 4000 - k / sum(EXITS)) < 0.03


def test_deepest_plus_one_trains_the_deepest_exit_every_step_and_one_shallower_exit():
    schedule = ExitSchedule(EXITS, "deepest_plus_one")
    steps = [schedule.exits_for_step(s) for s in range(4000)]
    assert all(len(e) == 2 and e[-1] == 6 and e[0] in EXITS[:-1] for e in steps)
    shallow = Counter(e[0] for e in steps)
    assert all(abs(shallow[k] / 4000 - 1 / 4) < 0.03 for k in EXITS[:-1])
    assert ExitSchedule([6], "deepest_plus_one").exits_for_step(0) == [6]  # a plain model: nothing to add
    # DDP may then skip its search for unused parameters; one sampled exit per step may not
    assert schedule.every_step_reaches_the_deepest_exit
    assert ExitSchedule(EXITS, "all").every_step_reaches_the_deepest_exit
    assert not ExitSchedule(EXITS, "deep").every_step_reaches_the_deepest_exit
    assert ExitSchedule([6], "uniform").every_step_reaches_the_deepest_exit


def test_all_and_alpha_rules():
    assert ExitSchedule(EXITS, "all").exits_for_step(7) == EXITS
    depth, sq, flat = (ExitSchedule(EXITS, alpha=a) for a in ("depth", "depth_sq", "uniform"))
    assert [depth.alpha(k) for k in (3, 6)] == [0.5, 1.0]
    assert [sq.alpha(k) for k in (3, 6)] == [0.25, 1.0]
    assert flat.alpha(2) == flat.alpha(6) == 1.0
    plus_one = ExitSchedule([0, 1, 2, 3, 4, 5, 6], alpha="depth_plus_one")
    assert plus_one.alpha(0) == pytest.approx(1 / 7) and plus_one.alpha(6) == 1.0  # exit 0 gets a gradient too


def test_a_two_exit_step_reports_and_trains_both_exits(synth_root):
    torch.manual_seed(0)
    model = EarlyExitMask2Former(load_model_config("tiny"))
    dataset = CocoPanopticDataset.from_root(synth_root, "train")
    batch = next(training_batches(dataset, batch_size=2, image_size=64, seed=0))
    schedule = ExitSchedule(model.exits, "deepest_plus_one")
    exits = schedule.exits_for_step(0)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = train_step(model, model, optimizer, batch, exits, schedule, grad_clip=1.0, device=torch.device("cpu"))
    assert set(metrics) == {"loss", "grad_norm"} | {f"loss_exit{k}" for k in exits}
    expected = sum(schedule.alpha(k) * metrics[f"loss_exit{k}"] for k in exits)
    assert np.isclose(metrics["loss"], expected, rtol=1e-5)
    # the deepest exit's step reaches the last encoder layer, which the shallow exit alone would not
    last = [n for n in before if ".layers.5." in n and "encoder" in n]
    assert last and any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in last)
