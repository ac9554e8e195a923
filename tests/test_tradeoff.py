"""The trade-off arithmetic: labels and ties, exact evaluation of per-image choices, baselines, Pareto."""

import numpy as np
import pytest

from eco_ray.metrics import CategorySet, PanopticStats, aggregate
from eco_ray.tradeoff import (
    evaluate_assignment,
    exit_labels,
    hypervolume_2d,
    oracle_assignment,
    pareto_front,
    shallowest_sufficient,
    static_points,
)

CATS = CategorySet([{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
                    {"id": 3, "name": "s", "isthing": 0}])
EXITS = [2, 3, 4]
COSTS = {"encoder_gflops": [2.0, 3.0, 4.0], "layers": [2, 3, 4]}


def random_table(rng, n=40, e=3, c=3):
    tp = rng.integers(0, 4, (n, e, c))
    iou = tp * rng.uniform(0.5, 1.0, (n, e, c))
    return PanopticStats(iou, tp, rng.integers(0, 3, (n, e, c)), rng.integers(0, 3, (n, e, c)),
                         rng.integers(0, 50, (n, e, c)), rng.integers(50, 100, (n, e, c)))


def test_labels_and_ties():
    q = np.array([[0.5, 0.6, 0.62], [0.5, 0.5, 0.5], [0.2, 0.9, 0.9]])
    assert exit_labels(q, [2, 3, 4], 0.0).tolist() == [2, 0, 1]  # equal quality: the cheaper exit
    assert exit_labels(q, [2, 3, 4], 0.05).tolist() == [1, 0, 1]  # u = .40 .45 .42 | .4 .35 .3 | .1 .75 .7
    assert exit_labels(q, [2, 3, 4], 10.0).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="ordered"):
        exit_labels(q, [3, 2, 4], 0.0)
    with pytest.raises(ValueError, match="costs"):
        exit_labels(q, [2, 3], 0.0)


def test_shallowest_sufficient_exit():
    q = np.array([[0.80, 0.81, 0.82], [0.5, 0.7, 0.71], [0.3, 0.2, 0.1], [0.0, 0.0, 0.5]])
    assert shallowest_sufficient(q, 0.02).tolist() == [0, 1, 0, 2]


def test_evaluation_of_a_choice_is_the_aggregate_of_the_chosen_rows():
    rng = np.random.default_rng(0)
    stats = random_table(rng)
    choice = rng.integers(0, 3, 40)
    got = evaluate_assignment(stats, choice, CATS, COSTS, EXITS)
    chosen = PanopticStats.stack([stats[i, choice[i]] for i in range(40)])
    want = aggregate(chosen, CATS)
    assert got.pq == pytest.approx(want.pq, abs=1e-12) and got.miou == pytest.approx(want.miou, abs=1e-12)
    assert got.encoder_gflops_mean == pytest.approx(np.asarray(COSTS["encoder_gflops"])[choice].mean())
    assert sum(got.exit_histogram.values()) == 40
    assert got.exit_histogram == {k: int((choice == e).sum()) for e, k in enumerate(EXITS)}


def test_static_points_are_each_exit_for_every_image():
    rng = np.random.default_rng(1)
    stats = random_table(rng)
    points = static_points(stats, CATS, COSTS, EXITS)
    for e, p in enumerate(points):
        assert p.exit == EXITS[e] and p.pq == pytest.approx(aggregate(stats[:, e], CATS).pq)
        assert p.encoder_gflops_mean == COSTS["encoder_gflops"][e] and p.exit_histogram[EXITS[e]] == 40


def test_oracle_is_at_least_as_good_as_every_static_exit_in_utility():
    rng = np.random.default_rng(2)
    q = rng.uniform(0, 1, (200, 3))
    for beta in (0.0, 0.01, 0.1):
        u = q - beta * np.asarray(COSTS["encoder_gflops"])
        best = u[np.arange(200), oracle_assignment(q, COSTS["encoder_gflops"], beta)].sum()
        assert all(best >= u[:, e].sum() for e in range(3))


def test_pareto_front_is_exactly_the_non_dominated_points():
    rng = np.random.default_rng(3)
    for _ in range(20):
        q, c = rng.uniform(0, 1, 30).round(2), rng.uniform(0, 1, 30).round(2)
        front = set(pareto_front(q, c).tolist())

        def dominated(i):
            return any(q[j] >= q[i] and c[j] <= c[i] and (q[j] > q[i] or c[j] < c[i]) for j in range(30))

        for i in range(30):
            if i in front:
                assert not dominated(i)
            else:
                # not on the front: dominated, or a duplicate of a front point
                assert dominated(i) or any(q[j] == q[i] and c[j] == c[i] for j in front)


def test_hypervolume_by_hand():
    assert hypervolume_2d([1.0], [1.0], 0.0, 2.0) == pytest.approx(1.0)
    assert hypervolume_2d([0.5, 1.0], [1.0, 1.5], 0.0, 2.0) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    # a dominated point adds nothing
    assert hypervolume_2d([0.5, 1.0, 0.4], [1.0, 1.5, 1.2], 0.0, 2.0) == pytest.approx(0.75)


def test_held_out_mask_depends_on_the_image_id_alone():
    from eco_ray.derive.table import held_out_mask

    ids = np.arange(1, 4001)
    mask = held_out_mask(ids, 0.25)
    assert 0.22 < mask.mean() < 0.28
    # the same image is held out whatever the order of the rows or the size of the table
    perm = np.random.default_rng(0).permutation(len(ids))
    assert (held_out_mask(ids[perm], 0.25) == mask[perm]).all()
    assert (held_out_mask(ids[:1000], 0.25) == mask[:1000]).all()
    assert held_out_mask(ids, 0.25, seed=1).tolist() != mask.tolist()  # another seed, other images
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="in \\(0, 1\\)"):
            held_out_mask(ids, bad)
    with pytest.raises(ValueError, match="leaves one part empty"):
        held_out_mask(ids[:1], 0.5)
