"""Exact COCO AP of an exit assignment from per-image matching records, against a plain pycocotools COCOeval."""

import numpy as np
import pytest

from eco_ray.metrics.detection import STAT_NAMES, ImageMatches, accumulate, assignment_ap, coco_eval, match_images
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
