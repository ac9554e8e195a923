"""COCO instance annotations: written by the generator for the same scenes, converted from panoptic, read back."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from eco_ray.data import CocoPanopticDataset, DatasetError
from eco_ray.data.collate import collate_detection
from eco_ray.data.coco_instances import CocoInstancesDataset, instances_from_panoptic, instances_path
from eco_ray.data.synth import SynthConfig, write_dataset
from eco_ray.metrics.detection import coco_eval


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, SynthConfig(size=64, seed=3), {"train": 6, "val": 5}, workers=1)
    return out


def test_the_generator_writes_instances_of_the_same_scenes(root):
    pan = CocoPanopticDataset.from_root(root, "val")
    det = CocoInstancesDataset.from_root(root, "val")
    assert det.image_ids == pan.image_ids and [c["id"] for c in det.categories] == [1, 2, 3, 4, 5, 6]
    total = 0
    for i in range(len(pan)):
        id_map, segments = pan.ground_truth(i)
        things = [s for s in segments if s["category_id"] <= 6]
        anns = det.annotations(i)
        assert [a["category_id"] for a in anns] == [s["category_id"] for s in things]
        for a, s in zip(anns, things):
            assert np.array_equal(mask_utils.decode(a["segmentation"]).astype(bool), id_map == s["id"])
            assert a["bbox"] == [float(v) for v in s["bbox"]] and a["area"] == s["area"]
        total += len(anns)
    assert total > 0
    # the converter makes the same document from the panoptic files as the generator did from its id maps
    converted = instances_from_panoptic(pan)
    written = json.loads(instances_path(root, "val").read_text())
    assert converted["annotations"] == written["annotations"] and converted["categories"] == written["categories"]


def test_samples_targets_and_the_ground_truth_scores_itself_at_ap_one(root):
    det = CocoInstancesDataset.from_root(root, "train")
    sample = det[0]
    assert sample.image.shape == (64, 64, 3) and sample.boxes.shape == (len(det.annotations(0)), 4)
    batch = collate_detection([sample, sample], det.labels, 128, flip=[False, True])
    assert batch["pixel_values"].shape == (2, 3, 128, 128) and batch["sizes"] == [(64, 64)] * 2
    plain, mirrored = batch["labels"]
    assert plain["boxes"].shape == (int((sample.iscrowd == 0).sum()), 4)
    assert (plain["boxes"] >= 0).all() and (plain["boxes"] <= 1).all()
    assert set(plain["class_labels"].tolist()) <= set(range(6))
    torch.testing.assert_close(mirrored["boxes"][:, 0], 1 - plain["boxes"][:, 0])
    torch.testing.assert_close(batch["pixel_values"][1], batch["pixel_values"][0].flip(-1))
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in det.document["annotations"] if not a["iscrowd"]]
    assert coco_eval(det.document, perfect)["AP50"] == pytest.approx(1.0)


def _write(tmp_path, doc):
    (tmp_path / "val2017").mkdir(exist_ok=True)
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return tmp_path


GOOD = {"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
                         "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}],
        "categories": [{"id": 3, "name": "cat", "supercategory": "animal"}]}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("annotations"), "missing top-level key 'annotations'"),
    (lambda d: d["annotations"][0].update(category_id=9), "unknown category 9"),
    (lambda d: d["annotations"][0].update(image_id=5), "unknown image id 5"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox must be 4 finite numbers"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "negative width or height"),
    (lambda d: d["annotations"][0].update(iscrowd=2), "iscrowd must be 0 or 1"),
    (lambda d: d["annotations"].append(dict(d["annotations"][0])), "annotation id 1 appears twice"),
    (lambda d: d["images"][0].pop("width"), "missing 'width'"),
])
def test_a_malformed_instances_file_gets_a_clear_error(tmp_path, change, message):
    doc = json.loads(json.dumps(GOOD))
    change(doc)
    with pytest.raises(DatasetError, match=message):
        CocoInstancesDataset.from_root(_write(tmp_path, doc), "val2017")


def test_the_coco_2017_layout_reads_and_bad_files_are_named(tmp_path):
    root = _write(tmp_path, GOOD)
    det = CocoInstancesDataset.from_root(root, "val2017")
    assert det.category_ids == [3] and det.labels(np.array([3])).tolist() == [0]
    with pytest.raises(DatasetError, match="file not found: .*a.jpg"):
        det[0]
    (root / "val2017" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cannot decode image"):
        det[0]
    _write(tmp_path, "{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoInstancesDataset.from_root(root, "val2017")


def test_the_cli_converts_a_panoptic_split(root, tmp_path):
    out = tmp_path / "inst.json"
    run = subprocess.run([sys.executable, "-m", "eco_ray.cli", "data", "instances", "--root", str(root),
                          "--split", "train", "--out", str(out), "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["images"] == 6 and json.loads(out.read_text())["annotations"] == \
        json.loads(instances_path(root, "train").read_text())["annotations"]
    bad = subprocess.run([sys.executable, "-m", "eco_ray.cli", "data", "instances", "--root", str(tmp_path / "none"),
                          "--split", "val"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "not found" in bad.stderr


def test_a_dataset_written_before_instance_files_gains_them_when_reused(tmp_path):
    from eco_ray.data.synth import ensure_dataset

    cfg, splits = SynthConfig(size=64, seed=1), {"train": 2, "val": 2}
    ensure_dataset(tmp_path, cfg, splits, workers=1)
    before = instances_path(tmp_path, "val").read_text()
    instances_path(tmp_path, "val").unlink()
    _, reused = ensure_dataset(tmp_path, cfg, splits, workers=1)
    assert reused and json.loads(instances_path(tmp_path, "val").read_text())["annotations"] == \
        json.loads(before)["annotations"]
