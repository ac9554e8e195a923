"""COCO instance JSON (polygons, uncompressed and compressed RLE, crowd) -> panoptic, read back."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from eco_ray.data import CocoPanopticDataset, DatasetError
from eco_ray.data.convert import convert_instances_to_panoptic, decode_segmentation

H, W = 40, 60


def _instances_file(tmp_path):
    big = np.zeros((H, W), np.uint8)
    big[5:30, 5:40] = 1
    big_rle = mask_utils.encode(np.asfortranarray(big))
    big_rle["counts"] = big_rle["counts"].decode()  # compressed RLE as JSON has it
    crowd = np.zeros((H, W), np.uint8)
    crowd[32:40, 0:60] = 1
    crowd_rle = {"size": [H, W], "counts": _uncompressed_counts(crowd)}  # list counts, as crowd annotations have
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": big_rle},
        # two-part polygon on top of the big one (a small object in front)
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0,
         "segmentation": [[10, 10, 20, 10, 20, 20, 10, 20], [45, 5, 55, 5, 55, 15, 45, 15]]},
        {"id": 3, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": crowd_rle},
        {"id": 4, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 30, 0, 30, 20, 0, 20]]},
    ]
    doc = {"images": [{"id": 1, "file_name": "img1.jpg", "width": W, "height": H},
                      {"id": 2, "file_name": "img2.jpg", "width": W, "height": H}],
           "annotations": anns,
           "categories": [{"id": 1, "name": "car", "supercategory": "vehicle"},
                          {"id": 2, "name": "person", "supercategory": "person"}]}
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(doc))
    (tmp_path / "val").mkdir()
    for im in doc["images"]:
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "val" / im["file_name"])
    sem = tmp_path / "semantic"
    sem.mkdir()
    s1 = np.full((H, W), 100, np.uint8)
    s1[:, 50:] = 0  # void on the right
    Image.fromarray(s1).save(sem / "img1.png")
    Image.fromarray(np.full((H, W), 101, np.uint8)).save(sem / "img2.png")
    return path, doc, sem


def _uncompressed_counts(mask):
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


def test_decode_all_formats_agree_with_pycocotools():
    m = np.zeros((H, W), np.uint8)
    m[3:9, 4:20] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    np.testing.assert_array_equal(decode_segmentation(rle, H, W), m.astype(bool))
    np.testing.assert_array_equal(decode_segmentation({"size": [H, W], "counts": _uncompressed_counts(m)}, H, W),
                                  m.astype(bool))
    poly = decode_segmentation([[4, 3, 20, 3, 20, 9, 4, 9]], H, W)
    assert abs(int(poly.sum()) - 16 * 6) <= 24  # rasterised polygon: same box up to the border pixels


def test_round_trip_through_the_reader(tmp_path):
    path, doc, sem = _instances_file(tmp_path)
    stuff = [{"id": 100, "name": "road"}, {"id": 101, "name": "sky"}]
    out = convert_instances_to_panoptic(path, tmp_path / "annotations/panoptic_val.json",
                                        tmp_path / "annotations/panoptic_val", sem, stuff)
    ds = CocoPanopticDataset.from_root(tmp_path, "val")
    assert len(ds) == 2 and len(ds.categories) == 4
    s = ds[0]
    by_cat = {}
    for seg in s.segments:
        by_cat.setdefault((seg["category_id"], seg["iscrowd"]), []).append(seg["id"])
    # the polygon person is on top; the car keeps what the person does not cover
    person = decode_segmentation(doc["annotations"][1]["segmentation"], H, W)
    car = decode_segmentation(doc["annotations"][0]["segmentation"], H, W)
    (person_id,) = by_cat[(2, 0)]
    (car_id,) = by_cat[(1, 0)]
    np.testing.assert_array_equal(s.id_map == person_id, person)
    np.testing.assert_array_equal(s.id_map == car_id, car & ~person)
    (crowd_id,) = by_cat[(2, 1)]
    assert (s.id_map == crowd_id).sum() == 8 * 60 - 0  # the crowd band, under nothing else
    (road_id,) = by_cat[(100, 0)]
    assert (s.id_map == 0).sum() > 0  # semantic void stays void
    assert set(np.unique(s.id_map).tolist()) == {0, person_id, car_id, crowd_id, road_id}
    assert out["annotations"][1]["segments_info"][0]["category_id"] == 1
    bbox = next(seg for seg in out["annotations"][0]["segments_info"] if seg["id"] == person_id)["bbox"]
    ys, xs = np.nonzero(person)
    assert bbox == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_min_visible_drops_hidden_instances(tmp_path):
    path, _, _ = _instances_file(tmp_path)
    doc = json.loads(path.read_text())
    # a large instance almost entirely covered by a smaller one placed in front
    a = np.zeros((H, W), np.uint8)
    a[0:10, 0:12] = 1
    doc["annotations"] = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 12, 0, 12, 10, 0, 10]]},
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "segmentation": [[0, 0, 11, 0, 11, 10, 0, 10]]},
    ]
    path.write_text(json.dumps(doc))
    out = convert_instances_to_panoptic(path, tmp_path / "p.json", tmp_path / "pngs", min_visible=0.5)
    cats = [seg["category_id"] for seg in out["annotations"][0]["segments_info"]]
    assert cats == [2]


def test_bad_instance_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        convert_instances_to_panoptic(tmp_path / "none.json", tmp_path / "p.json", tmp_path / "pngs")
    path, doc, _ = _instances_file(tmp_path)
    doc["annotations"][0]["category_id"] = 9
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="unknown category 9"):
        convert_instances_to_panoptic(path, tmp_path / "p.json", tmp_path / "pngs")
