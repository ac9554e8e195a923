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
