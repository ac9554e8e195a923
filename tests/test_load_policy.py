"""The load-adaptive policy (eco_ray/serve/load.py), Ray-free: the level rises stepwise under pressure, never
past the floor, holds between the thresholds, and falls back one step per calm period, also while idle."""

import pytest

from eco_ray.serve.load import LoadController, LoadPolicy, LoadPolicyError

EXITS = [2, 3, 4, 5, 6]


def controller(**knobs):
    policy = LoadPolicy.parse({"enabled": True, "queue_high": 4, "queue_low": 1, "step_s": 1.0,
                               "relax_after_s": 3.0, **knobs}, EXITS)
    return LoadController(policy, EXITS, now=0.0)


def test_pressure_tightens_one_step_per_interval_down_to_the_floor():
    c = controller(floor_exit=4)
    assert c.observe(4, 0.5)[0] == 0  # too soon after the start: a step needs time to show
    assert c.observe(4, 1.0)[0] == 1 and c.exit_cap == 5
    assert c.observe(9, 1.5)[0] == 1  # one step per interval, however high the queue
    assert c.observe(9, 2.0)[0] == 2 and c.exit_cap == 4
    for t in range(3, 30):
        c.observe(50, float(t))
    assert c.level == c.max_level == 2 and c.exit_cap == 4  # the floor is never crossed


def test_calm_relaxes_one_step_per_period_and_between_thresholds_the_level_holds():
    c = controller()
    for t in (1.0, 2.0, 3.0):
        c.observe(6, t)
    assert c.level == 3
    assert c.observe(2, 10.0)[0] == 3  # between queue_low and queue_high: hold, however long
    assert c.observe(1, 11.0)[0] == 3  # calm starts now
    assert c.observe(0, 13.9)[0] == 3
    assert c.observe(0, 14.0)[0] == 2
    assert c.observe(0, 23.5)[0] == 0  # read late (an idle replica): every elapsed period counts
    assert c.observe(0, 100.0)[0] == 0
    # pressure in the middle of a calm period restarts it
    c.observe(5, 101.0)
    assert c.level == 1
    c.observe(0, 103.0)
    c.observe(3, 104.0)  # not calm: the period starts again at the next calm reading
    assert c.observe(0, 105.0)[0] == 1 and c.observe(0, 107.9)[0] == 1 and c.observe(0, 108.0)[0] == 0


def test_latency_is_a_signal_while_fresh():
    c = controller(queue_high=100, queue_low=1, latency_high_ms=200.0)
    c.record_latency(250.0, 0.9)
    assert c.observe(0, 1.0)[0] == 1  # slow answers with an empty queue: the batches themselves are slow
    c.record_latency(150.0, 1.1)  # averaged: 0.7 * 250 + 0.3 * 150 = 220, still over
    assert c.observe(0, 2.0)[0] == 2
    c.record_latency(120.0, 2.5)  # 0.7 * 220 + 0.3 * 120 = 190: under the high mark, over the low one (100)
    assert c.observe(0, 3.0)[0] == 2 and c.observe(0, 7.0)[0] == 2  # between the thresholds: hold
    # with no answer for latency_window_s the old figure is no signal: an idle replica is calm
    # calm counts from when the latency went stale (7.5), not from the first reading after it
    assert c.observe(0, 8.0)[0] == 2 and c.observe(0, 10.4)[0] == 2 and c.observe(0, 10.5)[0] == 1


def test_disabled_never_caps():
    c = LoadController(LoadPolicy(), EXITS)
    assert c.max_level == 0 and all(c.observe(1000, float(t)) == (0, 6) for t in range(10)) and c.exit_cap == 6


@pytest.mark.parametrize("knobs, message", [
    ({"floor_exit": 7}, "floor_exit=7 is not one of the model's exits"),
    ({"queue_low": 8}, "queue_low \\(8\\) must be below queue_high"),
    ({"queue_high": 0}, "queue_high must be a whole number >= 1"),
    ({"queue_high": 2.5}, "queue_high must be a whole number"),
    ({"latency_low_ms": 10}, "latency_low_ms needs latency_high_ms"),
    ({"latency_high_ms": 10, "latency_low_ms": 20}, "must be below latency_high_ms"),
    ({"relax_after_s": 0}, "relax_after_s must be a number > 0"),
    ({"latency_window_s": 0}, "latency_window_s must be a number > 0"),
    ({"latency_high_ms": 0}, "latency_high_ms must be a number > 0"),
    ({"queue_high": 10 ** 400}, "queue_high must be a whole number"),
    ({1: 2, "x": 3}, "unknown key"),
    ({"step_s": -1}, "step_s must be a number >= 0"),
    ({"precedence": "gate"}, "precedence must be one of"),
    ({"shed_held": 0}, "shed_held must be a whole number >= 1"),
    ({"enabled": "yes"}, "enabled must be true or false"),
    ({"floor": 3}, "unknown key\\(s\\) \\['floor'\\]"),
])
def test_bad_knobs_get_one_clear_error(knobs, message):
    with pytest.raises(LoadPolicyError, match=message):
        LoadPolicy.parse({"enabled": True, **knobs}, EXITS)


def test_not_a_mapping():
    with pytest.raises(LoadPolicyError, match="must be a mapping"):
        LoadPolicy.parse("on", EXITS)
    assert LoadPolicy.parse(None, EXITS) == LoadPolicy()


def test_shedding_only_at_the_top_level_and_only_past_its_mark():
    c = controller(floor_exit=5, shed_held=6)
    assert not c.sheds(10, 0.5)  # level 0 < max level 1: depth still has something to give
    c.observe(10, 1.0)
    assert c.level == c.max_level == 1
    assert c.sheds(6, 1.1) and not c.sheds(5, 1.2)
    never = controller()
    for t in range(1, 10):
        never.observe(50, float(t))
    assert never.level == never.max_level and not never.sheds(1000, 10.0)  # shed_held unset: never
    only = controller(floor_exit=6, shed_held=3)  # the floor at full depth: shedding alone, no cap
    assert only.max_level == 0 and only.sheds(3, 0.0) and not only.sheds(2, 0.0) and only.exit_cap == 6
