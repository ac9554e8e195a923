"""Exact COCO AP of an exit assignment from per-image matching records, against a plain pycocotools COCOeval."""

import json

import numpy as np
import pytest

from eco_ray.metrics.detection import (
    STAT_NAMES,
    DetectionRecords,
    ImageMatches,
    accumulate,
    assignment_ap,
    coco_eval,
    label_blocks,
    match_images,
)
from eco_ray.testing.coco_scene import random_detection_scene as _scene


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_assembled_ap_of_random_assignments_equals_a_plain_cocoeval(seed):
    gt, per_exit = _scene(seed)
    records = {k: match_images(gt, dets) for k, dets in enumerate(per_exit)}
    ids = [im["id"] for im in gt["images"]]
    rng = np.random.default_rng(100 + seed)
    for assignment in [{i: 0 for i in ids}, {i: len(per_exit) - 1 for i in ids}] + \
            [dict(zip(ids, rng.integers(0, len(per_exit), len(ids)).tolist())) for _ in range(4)]:
        chosen = [d for k, dets in enumerate(per_exit) for d in dets if assignment[d["image_id"]] == k]
        want = coco_eval(gt, chosen)
        got = assignment_ap(records, assignment)
        assert list(got) == list(STAT_NAMES)
        for name in STAT_NAMES:
            assert got[name] == pytest.approx(want[name], abs=1e-12), name
    # the assignments do differ: otherwise the test could not tell records apart
    assert coco_eval(gt, per_exit[0])["AP"] != coco_eval(gt, per_exit[-1])["AP"]


def test_a_subset_of_images_and_the_max_detection_cut():
    """A subset is evaluated as COCOeval with params.imgIds; more than 100 detections of one category in an
    image are cut to the 100 best, as evaluateImg does, and AR1/AR10 cut per image and category."""
    gt, per_exit = _scene(7, n_images=12)
    rng = np.random.default_rng(3)
    crowded = gt["images"][0]["id"]
    per_exit[0] += [{"image_id": crowded, "category_id": 1, "score": float(rng.random()),
                     "bbox": list(rng.uniform(0, 100, 4) + [0, 0, 5, 5])} for _ in range(150)]
    records = match_images(gt, per_exit[0])
    assert sum(records[crowded].category == 0) == 100
    subset = [im["id"] for im in gt["images"][:7]]
    got = accumulate({i: records[i] for i in subset})
    want = coco_eval(gt, per_exit[0], image_ids=subset)
    assert got == pytest.approx(want, abs=1e-12)


def test_images_without_truth_or_detections_and_bad_assignments():
    gt, per_exit = _scene(5, n_images=6)
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != gt["images"][0]["id"]]
    records = match_images(gt, [d for d in per_exit[0] if d["image_id"] != gt["images"][1]["id"]])
    assert records[gt["images"][1]["id"]].score.size == 0  # an image without detections still has a record
    assert accumulate(records) == pytest.approx(coco_eval(gt, [d for d in per_exit[0]
                                                               if d["image_id"] != gt["images"][1]["id"]]), abs=1e-12)
    with pytest.raises(ValueError, match="no matching records"):
        assignment_ap({0: records}, {gt["images"][0]["id"]: 3})
    with pytest.raises(ValueError, match="no images"):
        accumulate({})
    empty = match_images(gt, [])
    assert all(r.score.size == 0 for r in empty.values())
    assert accumulate(empty)["AP"] == 0.0 and isinstance(empty[gt["images"][2]["id"]], ImageMatches)


def test_zero_ids_and_files_without_area_or_iscrowd_score_as_coco_means_them():
    """COCOeval records a match as the truth's id, so a truth with id 0 would read as unmatched; files that
    leave out area and iscrowd (both optional in docs/data.md) still evaluate. The caller's document is left
    as it was."""
    gt = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
          "categories": [{"id": 5, "name": "a"}],
          "annotations": [{"id": 0, "image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40]},
                          {"id": 1, "image_id": 2, "category_id": 5, "bbox": [50, 50, 20, 30]}]}
    before = json.dumps(gt)
    perfect = [{"image_id": a["image_id"], "category_id": 5, "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    assert coco_eval(gt, perfect)["AP"] == pytest.approx(1.0)
    assert accumulate(match_images(gt, perfect))["AP"] == pytest.approx(1.0)
    assert json.dumps(gt) == before


def test_flat_records_of_two_views_assemble_any_assignment_and_round_trip_through_arrow():
    gt, per_exit = _scene(11, n_images=30, n_exits=3)
    view0 = {k: match_images(gt, dets) for k, dets in enumerate(per_exit)}
    view1 = {k: match_images(gt, dets[::-1]) for k, dets in enumerate(per_exit[1:] + per_exit[:1])}
    flat = DetectionRecords.from_matches([view0, view1])
    again = DetectionRecords.from_arrow(*flat.to_arrow())
    ids = flat.image_ids.tolist()
    rng = np.random.default_rng(4)
    for choice in [np.zeros(30, int), np.full(30, 2)] + [rng.integers(0, 3, 30) for _ in range(3)]:
        for view, records in ((0, view0), (1, view1)):
            want = assignment_ap(records, dict(zip(ids, choice.tolist())))
            assert flat.ap(choice, view) == pytest.approx(want, abs=1e-12)
            assert again.ap(choice, view) == pytest.approx(want, abs=1e-12)
    subset = np.arange(30) % 3 == 0
    assert flat.ap(np.ones(30, int), images=subset) == pytest.approx(
        accumulate({i: view0[1][i] for i, s in zip(ids, subset) if s}), abs=1e-12)
    with pytest.raises(ValueError, match="one exit index per image"):
        flat.ap(np.zeros(3, int))
    with pytest.raises(ValueError, match="exit indices must lie"):
        flat.ap(np.full(30, 3))


def _records(seed: int, n_images: int = 24, n_exits: int = 3, distinct: bool = False):
    gt, per_exit = _scene(seed, n_images=n_images, n_exits=n_exits)
    if distinct:  # no two detections share a score
        rng = np.random.default_rng(seed)
        for dets in per_exit:
            for d in dets:
                d["score"] = float(rng.random())
    view0 = {k: match_images(gt, dets) for k, dets in enumerate(per_exit)}
    view1 = {k: match_images(gt, dets) for k, dets in enumerate(per_exit[::-1])}
    return gt, per_exit, view0, view1, DetectionRecords.from_matches([view0, view1])


def test_many_assignments_at_once_equal_the_assembled_ap_ties_included():
    gt, per_exit, view0, view1, flat = _records(21)
    rng = np.random.default_rng(0)
    assign = rng.integers(0, 3, (7, len(flat)))
    assign[0], assign[1] = 0, 2
    for view in (0, 1):
        got = flat.ap_of(assign, view=view)
        want = [flat.ap(a, view)["AP"] for a in assign]
        assert got == pytest.approx(want, abs=1e-12)
    # counts of 0 leave images out, as a subset does
    keep = (np.arange(len(flat)) % 4 != 1).astype(float)
    assert flat.ap_of(assign[2], keep[None])[0] == pytest.approx(flat.ap(assign[2], images=keep > 0)["AP"], abs=1e-12)


def test_an_image_counted_twice_is_cocoeval_on_two_copies_of_it():
    gt, per_exit, view0, view1, flat = _records(22, distinct=True)
    rng = np.random.default_rng(1)
    ids = flat.image_ids.tolist()
    for _ in range(3):
        counts = rng.integers(0, 4, len(ids))
        choice = rng.integers(0, 3, len(ids))
        copies = {"images": [], "annotations": [], "categories": gt["categories"]}
        dets = []
        for n, i in enumerate(ids):
            for c in range(counts[n]):
                new_id = i + 100000 * c
                copies["images"].append({**next(im for im in gt["images"] if im["id"] == i), "id": new_id})
                copies["annotations"] += [{**a, "image_id": new_id} for a in gt["annotations"] if a["image_id"] == i]
                dets += [{**d, "image_id": new_id} for d in per_exit[choice[n]] if d["image_id"] == i]
        want = coco_eval(copies, dets)["AP"]
        assert flat.ap_of(choice, counts[None])[0] == pytest.approx(want, abs=1e-12)


def test_per_image_ap_and_contributions_are_what_their_definitions_say():
    gt, per_exit, view0, view1, flat = _records(23, n_images=14)
    ids = flat.image_ids.tolist()
    own = flat.per_image_ap()
    for n, i in enumerate(ids):
        for v, view in enumerate((view0, view1)):
            for k in range(3):
                assert own[n, v, k] == pytest.approx(max(0.0, accumulate({i: view[k][i]})["AP"]), abs=1e-12)
    dap = flat.contributions(block=5)  # 14 images: blocks of 5, 5 and 4
    assert [b.tolist() for b in label_blocks(14, 5)] == [list(range(5)), list(range(5, 10)), list(range(10, 14))]
    assert [len(b) for b in label_blocks(300, 256)] == [150, 150] and label_blocks(0, 5) == []
    assert np.all(dap[:, :, -1] == 0)
    for n, i in enumerate(ids):
        start = 0 if n < 5 else 5 if n < 10 else 10
        members = ids[start:start + (4 if start == 10 else 5)]
        for v, view in enumerate((view0, view1)):
            base = accumulate({j: view[2][j] for j in members})["AP"]
            for k in range(2):
                moved = accumulate({j: view[k if j == i else 2][j] for j in members})["AP"]
                assert dap[n, v, k] == pytest.approx((moved - base) * len(members), abs=1e-9)
    assert np.abs(dap[:, :, :2]).max() > 0  # the exits do differ


def test_records_split_by_image_and_exit_and_join_again():
    gt, per_exit, view0, view1, flat = _records(24, n_images=12)
    mask = np.arange(12) % 3 != 0
    part, rest = flat.take(mask), flat.take(~mask)
    choice = np.random.default_rng(2).integers(0, 3, 12)
    assert part.ap(choice[mask])["AP"] == pytest.approx(flat.ap(choice, images=mask)["AP"], abs=1e-12)
    joined = DetectionRecords.concat([rest, part])
    assert joined.image_ids.tolist() == flat.image_ids.tolist()
    assert joined.ap(choice, 1) == pytest.approx(flat.ap(choice, 1), abs=1e-12)
    two = flat.with_exits([0, 2])
    assert two.exits == [0, 2]
    assert two.ap(np.where(choice == 2, 1, 0))["AP"] == pytest.approx(flat.ap(np.where(choice == 2, 2, 0))["AP"],
                                                                       abs=1e-12)
    with pytest.raises(ValueError, match="overlap"):
        DetectionRecords.concat([flat, part])
    with pytest.raises(ValueError, match="boolean mask of 12 images"):
        flat.take(np.flatnonzero(mask))
    # no image counted: no ground truth, so no AP (-1, as COCOeval's summary); mismatched counts are refused
    assert flat.ap_of(choice, np.zeros((1, 12)))[0] == -1.0
    with pytest.raises(ValueError, match="counts must have"):
        flat.ap_of(np.tile(choice, (3, 1)), np.ones((1, 12)))
