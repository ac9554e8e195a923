"""Panoptic statistics: hand-built cases (crowd, void, thresholds) and agreement with torchmetrics."""

import numpy as np
import pytest
import torch
from torchmetrics.detection import PanopticQuality

from eco_ray.metrics import (
    CategorySet,
    PanopticInputError,
    PanopticStats,
    aggregate,
    image_stats,
    per_image_pq,
    stats_from_arrow,
    stats_to_arrow,
)

CATS = CategorySet([
    {"id": 1, "name": "a", "isthing": 1},
    {"id": 2, "name": "b", "isthing": 1},
    {"id": 3, "name": "ground", "isthing": 0},
    {"id": 4, "name": "sky", "isthing": 0},
])
A, B, GROUND, SKY = 0, 1, 2, 3  # contiguous indices


def seg(i, cat, crowd=0):
    return {"id": i, "category_id": cat, "iscrowd": crowd}


def test_perfect_prediction_scores_one():
    gt = np.zeros((8, 8), int)
    gt[:4] = 1
    gt[4:] = 2
    gt[1:3, 1:3] = 3
    segs = [seg(1, 3), seg(2, 4), seg(3, 1)]
    st = image_stats(gt, segs, gt, segs, CATS)
    r = aggregate(st, CATS)
    assert r.pq == r.sq == r.rq == r.miou == 1.0
    assert r.pq_things == 1.0 and r.pq_stuff == 1.0
    assert st.tp.tolist() == [1, 0, 1, 1] and st.fp.sum() == 0 and st.fn.sum() == 0


def test_iou_must_exceed_half_strictly():
    gt = np.full((4, 4), 9)
    gt[0, :2] = 1  # 2 px of class a on stuff
    pred = np.full((4, 4), 8)
    pred[0, :4] = 5  # 4 px covering it and 2 px of stuff: IoU exactly 0.5 -> no match
    gsegs, psegs = [seg(9, 3), seg(1, 1)], [seg(8, 3), seg(5, 1)]
    st = image_stats(gt, gsegs, pred, psegs, CATS)
    assert st.tp[A] == 0 and st.fn[A] == 1 and st.fp[A] == 1
    gt[0, 3] = 0  # one of those stuff pixels becomes void: union = 4 + 2 - 2 - 1 = 3 -> IoU 2/3
    st = image_stats(gt, gsegs, pred, psegs, CATS)
    assert st.tp[A] == 1 and st.fp[A] == 0 and st.iou_sum[A] == pytest.approx(2 / 3)


def test_void_pixels_do_not_hurt_iou():
    gt = np.zeros((10, 10), int)
    gt[:, :5] = 1
    pred = np.full((10, 10), 7)  # prediction covers the void half too
    st = image_stats(gt, [seg(1, 3)], pred, [seg(7, 3)], CATS)
    assert st.tp[GROUND] == 1 and st.iou_sum[GROUND] == pytest.approx(1.0)
    assert st.sem_inter[GROUND] == 50 and st.sem_union[GROUND] == 50  # void ground truth ignored


def test_crowd_is_neither_fn_nor_fp_when_covered():
    gt = np.zeros((10, 10), int)
    gt[:, :] = 9  # stuff everywhere
    gt[0:4, 0:4] = 1  # a normal instance
    gt[6:10, 6:10] = 2  # a crowd region of the same class
    segs = [seg(9, 3), seg(1, 1), seg(2, 1, crowd=1)]
    pred = gt.copy()
    pred[pred == 2] = 5  # a prediction lying entirely on the crowd region
    pred[pred == 9] = 6
    psegs = [seg(6, 3), seg(1, 1), seg(5, 1)]
    st = image_stats(gt, segs, pred, psegs, CATS)
    assert st.tp[A] == 1 and st.fn[A] == 0 and st.fp[A] == 0  # crowd not FN, covering pred not FP
    # the same prediction with another class is not excused by a crowd region of class a
    st = image_stats(gt, segs, pred, [seg(6, 3), seg(1, 1), seg(5, 2)], CATS)
    assert st.fp[B] == 1
    # a prediction with exactly half (not more) of its pixels on the crowd region is a false positive
    pred2 = np.full((10, 10), 6)
    pred2[0:4, 0:4] = 1
    pred2[2:10, 8:10] = 5  # 16 px: 8 on the crowd region (rows 6-9), 8 on stuff
    st = image_stats(gt, segs, pred2, psegs, CATS)
    assert st.fp[A] == 1


def test_empty_prediction_and_unmatched_segments():
    gt = np.ones((6, 6), int) * 3
    gt[1:3, 1:3] = 1
    gt[3:5, 3:5] = 2
    segs = [seg(3, 4), seg(1, 1), seg(2, 2)]
    empty = np.zeros((6, 6), int)
    st = image_stats(gt, segs, empty, [], CATS)
    assert st.fn.tolist() == [1, 1, 0, 1] and st.tp.sum() == 0 and st.fp.sum() == 0
    r = aggregate(st, CATS)
    assert r.pq == 0.0 and np.isnan(r.per_class_pq[GROUND])
    assert per_image_pq(st) == 0.0


def test_per_image_pq_is_mean_over_present_categories():
    st = PanopticStats.zeros((2, 4))
    st.iou_sum[0, A], st.tp[0, A] = 0.8, 1  # class a: PQ 0.8
    st.fn[0, B] = 1  # class b: PQ 0
    assert per_image_pq(st).tolist() == pytest.approx([0.4, 1.0])  # the empty second image is neutral


def test_bad_input_is_rejected():
    gt = np.ones((4, 4), int)
    with pytest.raises(PanopticInputError, match="unknown category"):
        image_stats(gt, [seg(1, 99)], gt, [seg(1, 1)], CATS)
    with pytest.raises(PanopticInputError, match="no segment info"):
        image_stats(gt, [seg(1, 1)], gt * 2, [seg(1, 1)], CATS)
    with pytest.raises(PanopticInputError, match="one shape"):
        image_stats(gt, [seg(1, 1)], gt[:2], [seg(1, 1)], CATS)


def test_stats_round_trip_through_arrow():
    rng = np.random.default_rng(0)
    st = PanopticStats(rng.random((5, 3, 4)), *(rng.integers(0, 9, (5, 3, 4)) for _ in range(5)))
    ids, back = stats_from_arrow(stats_to_arrow([10, 11, 12, 13, 14], st))
    assert ids.tolist() == [10, 11, 12, 13, 14]
    for k, v in st.as_dict().items():
        np.testing.assert_array_equal(getattr(back, k), v)


# ------------------------------------------------------------------------------- torchmetrics agreement
def random_case(rng, h=24, w=24):
    """Ground truth with one segment per stuff class, several thing instances and some void; a prediction
    made from it by shifting, relabelling, dropping and adding segments.

    The prediction labels every pixel: torchmetrics departs from COCO's panopticapi where a *prediction*
    is void (it subtracts a ground-truth segment's void-predicted pixels from the union and does not count
    a mostly void-predicted segment as a false negative). COCO's rule for void predictions is checked by
    the hand-built tests above."""
    gt = np.where(np.arange(w)[None, :] < rng.integers(4, w - 4), 100, 101).repeat(h, 0)
    gt_cat = {100: 3, 101: 4}
    for k in range(rng.integers(0, 6)):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        hh, ww = rng.integers(2, 10), rng.integers(2, 10)
        gt[y:y + hh, x:x + ww] = k + 1
        gt_cat[k + 1] = int(rng.integers(1, 3))
    gt[rng.random((h, w)) < 0.03] = 0
    present = set(np.unique(gt).tolist()) - {0}
    gt_segs = [seg(i, gt_cat[i]) for i in sorted(present)]

    rolled = np.roll(gt, (rng.integers(-2, 3), rng.integers(-2, 3)), axis=(0, 1))
    pred = np.where(rolled == 0, 1100, rolled + 1000)
    pred[gt == 0] = rng.choice([1100, 1101])  # void in ground truth: predicted as some stuff segment
    pred_cat = {i + 1000: c for i, c in gt_cat.items()}
    pred_cat[1100] = 3
    for i in list(pred_cat):
        if i < 1100 and pred_cat[i] in (1, 2) and rng.random() < 0.25:
            pred_cat[i] = 3 - pred_cat[i]  # wrong thing class
    for k in range(rng.integers(0, 3)):  # spurious things
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        pred[y:y + 3, x:x + 4] = 2000 + k
        pred_cat[2000 + k] = int(rng.integers(1, 3))
    if rng.random() < 0.1:
        pred[:] = 1100  # a degenerate prediction: one stuff segment everywhere
    # torchmetrics merges all pixels of a stuff category into one segment: make our segments agree
    for stuff in (3, 4):
        ids = [i for i in set(np.unique(pred).tolist()) - {0} if pred_cat[i] == stuff]
        for i in ids[1:]:
            pred[pred == i] = ids[0]
    pred_present = set(np.unique(pred).tolist()) - {0}
    pred_segs = [seg(i, pred_cat[i]) for i in sorted(pred_present)]
    return gt, gt_segs, pred, pred_segs


def to_torchmetrics(id_map, segs):
    cat_of = {s["id"]: s["category_id"] for s in segs}
    out = np.zeros((*id_map.shape, 2), np.int64)
    for i, c in cat_of.items():
        out[id_map == i] = (c, i)
    return out  # void pixels are (0, 0): category 0 is neither thing nor stuff


@pytest.mark.parametrize("seed", range(8))
def test_aggregate_matches_torchmetrics(seed):
    rng = np.random.default_rng(seed)
    cases = [random_case(rng) for _ in range(12)]
    ours = PanopticStats.stack([image_stats(*c, CATS) for c in cases])
    r = aggregate(ours, CATS)

    tm = PanopticQuality(things={1, 2}, stuffs={3, 4}, allow_unknown_preds_category=True,
                         return_sq_and_rq=True, return_per_class=True)
    preds = torch.from_numpy(np.stack([to_torchmetrics(c[2], c[3]) for c in cases]))
    target = torch.from_numpy(np.stack([to_torchmetrics(c[0], c[1]) for c in cases]))
    tm.update(preds, target)
    per_class = tm.compute().numpy().reshape(-1, 3)  # (C, [pq, sq, rq])
    present = np.isfinite(r.per_class_pq)
    np.testing.assert_allclose(r.per_class_pq[present], per_class[present, 0], atol=1e-6)

    tm_all = PanopticQuality(things={1, 2}, stuffs={3, 4}, allow_unknown_preds_category=True, return_sq_and_rq=True)
    tm_all.update(preds, target)
    pq, sq, rq = tm_all.compute().tolist()
    assert r.pq == pytest.approx(pq, abs=1e-6)
    assert r.sq == pytest.approx(sq, abs=1e-6)
    assert r.rq == pytest.approx(rq, abs=1e-6)


def test_aggregation_is_additive_over_any_split():
    rng = np.random.default_rng(42)
    cases = [random_case(rng) for _ in range(10)]
    stats = PanopticStats.stack([image_stats(*c, CATS) for c in cases])
    # summing two halves first gives the same dataset PQ as summing all rows
    halves = PanopticStats.stack([stats[:5].sum(), stats[5:].sum()])
    assert aggregate(halves, CATS).summary() == pytest.approx(aggregate(stats, CATS).summary(), abs=1e-12)


def test_void_prediction_follows_coco_not_torchmetrics():
    """COCO: pixels a prediction leaves void still count in the union, and a missed segment is a FN."""
    gt = np.full((4, 5), 9)
    gt[0:2, :] = 1  # 10 px of class a
    pred = np.full((4, 5), 8)
    pred[0:2, :] = 0  # 6 of them predicted void ...
    pred[0, 0:4] = 5  # ... and 4 as class a: IoU 4 / (4 + 10 - 4) = 0.4 -> no match
    st = image_stats(gt, [seg(9, 3), seg(1, 1)], pred, [seg(8, 3), seg(5, 1)], CATS)
    assert st.tp[A] == 0 and st.fn[A] == 1 and st.fp[A] == 1


def _random_exit_stats(rng, n=60, exits=5, cats=4):
    tp = rng.integers(0, 3, (n, exits, cats))
    z = np.zeros_like(tp)
    return PanopticStats(iou_sum=tp * rng.uniform(0.5, 1.0, tp.shape), tp=tp, fp=rng.integers(0, 2, tp.shape),
                         fn=rng.integers(0, 2, tp.shape), sem_inter=z, sem_union=z)


def test_pq_contributions_average_to_the_dataset_pq_at_the_reference_exit():
    from eco_ray.metrics.panoptic import pq_contributions

    stats = _random_exit_stats(np.random.default_rng(1))
    q = pq_contributions(stats)
    assert q.shape == (60, 5)
    assert q[:, -1].mean() == pytest.approx(aggregate(stats[:, -1], CATS).pq, abs=1e-12)
    # other static exits: the first-order approximation of their dataset PQ
    for e in range(4):
        assert q[:, e].mean() == pytest.approx(aggregate(stats[:, e], CATS).pq, abs=0.01)


def test_pq_contributions_rank_a_single_image_change_like_the_dataset_pq():
    """Moving one image to the exit with the largest contribution raises the dataset PQ the most."""
    from eco_ray.metrics.panoptic import pq_contributions

    rng = np.random.default_rng(2)
    stats = _random_exit_stats(rng, n=200)
    q = pq_contributions(stats)
    for i in rng.choice(200, 10, replace=False):
        gains = []
        for e in range(5):
            choice = np.full(200, 4)
            choice[i] = e
            gains.append(aggregate(stats[np.arange(200), choice], CATS).pq)
        assert int(np.argmax(gains)) == int(np.argmax(q[i])) or max(gains) - gains[int(np.argmax(q[i]))] < 1e-4


def test_pq_contributions_keep_other_leading_axes_apart():
    from eco_ray.metrics.panoptic import pq_contributions

    rng = np.random.default_rng(3)
    a, b = _random_exit_stats(rng), _random_exit_stats(rng)
    both = PanopticStats(**{k: np.stack([getattr(a, k), getattr(b, k)], axis=1) for k in a.as_dict()})  # (N, V, E, C)
    q = pq_contributions(both)
    np.testing.assert_allclose(q[:, 0], pq_contributions(a))
    np.testing.assert_allclose(q[:, 1], pq_contributions(b))


def test_a_subsets_pq_counts_its_own_categories_and_no_stray_prediction():
    from eco_ray.metrics.panoptic import PanopticStats, ground_truth_pq, totals_summary

    # two exits of one subset, three categories; category 2 has no ground truth here, and exit 1 predicts it once
    iou = np.array([[1.6, 0.9, 0.0], [1.6, 0.9, 0.0]])
    tp, fp, fn = (np.array(x) for x in ([[2, 1, 0], [2, 1, 0]], [[0, 1, 0], [0, 1, 1]], [[0, 1, 0], [0, 1, 0]]))
    z = np.zeros_like(tp)
    totals = PanopticStats(iou, tp, fp, fn, z, z)
    per_cat = [1.6 / 2, 0.9 / 2]  # iou_sum / (tp + fp/2 + fn/2) of the two categories with ground truth
    np.testing.assert_allclose(ground_truth_pq(totals), [np.mean(per_cat)] * 2)
    # dataset PQ counts the stray prediction's category as a zero: the subset's PQ falls by a third at exit 1
    np.testing.assert_allclose(totals_summary(totals, np.ones(3, bool))["pq"], [np.mean(per_cat),
                                                                               np.sum(per_cat) / 3])
    assert ground_truth_pq(PanopticStats.zeros((2, 3))).tolist() == [0.0, 0.0]
