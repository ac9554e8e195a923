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
    assert out.panoptic["annotations"][1]["segments_info"][0]["category_id"] == 1
    bbox = next(seg for seg in out.panoptic["annotations"][0]["segments_info"] if seg["id"] == person_id)["bbox"]
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
    cats = [seg["category_id"] for seg in out.panoptic["annotations"][0]["segments_info"]]
    assert cats == [2]


def test_bad_instance_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        convert_instances_to_panoptic(tmp_path / "none.json", tmp_path / "p.json", tmp_path / "pngs")
    path, doc, _ = _instances_file(tmp_path)
    doc["annotations"][0]["category_id"] = 9
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="unknown category 9"):
        convert_instances_to_panoptic(path, tmp_path / "p.json", tmp_path / "pngs")


# ------------------------------------------------------------------ what labelling tools export, and mistakes
def _doc(anns, images=None, categories=None):
    return {"images": images or [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
            "annotations": anns,
            "categories": categories or [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}]}


def _write(tmp_path, doc, name="instances.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _box(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _cli(capsys, *args):
    from eco_ray.cli import main

    code = main(["data", "convert", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _images_folder(tmp_path, doc, sizes=None):
    folder = tmp_path / "src_images"
    for im in doc["images"]:
        w, h = (sizes or {}).get(im["file_name"], (im["width"], im["height"]))
        path = folder / im["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)
    return folder


def test_a_background_category_becomes_void_and_the_reader_accepts_the_result(tmp_path, capsys):
    doc = _doc([{"id": 1, "image_id": 1, "category_id": 0, "segmentation": [_box(0, 0, W, H)]},
                {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [_box(5, 5, 20, 20)]},
                {"id": 3, "image_id": 1, "category_id": 3, "segmentation": [_box(30, 5, 50, 20)]}],
               categories=[{"id": 0, "name": "_background_"}, {"id": 1, "name": "car"},
                           {"id": 3, "name": "__background__"}])
    src = _write(tmp_path, doc)
    images = _images_folder(tmp_path, doc)
    code, out, _ = _cli(capsys, "--instances", src, "--out", tmp_path / "ds", "--split", "val", "--images", images)
    assert code == 0 and "_background_" in out and "category (id 0 / background), left out: 2" in out
    ds = CocoPanopticDataset.from_root(tmp_path / "ds", "val")
    assert [c.id for c in ds.categories.categories] == [1] and ds.validate() == []
    assert [s["category_id"] for s in ds[0].segments] == [1]


def test_a_flat_polygon_list_is_one_polygon_and_whole_float_ids_become_ints(tmp_path):
    nested = convert_instances_to_panoptic(
        _write(tmp_path, _doc([{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_box(5, 5, 20, 20)]}])),
        tmp_path / "n.json", tmp_path / "n")
    flat = convert_instances_to_panoptic(
        _write(tmp_path, _doc([{"id": 1.0, "image_id": 1.0, "category_id": 1.0, "segmentation": _box(5, 5, 20, 20)}],
                              images=[{"id": 1.0, "file_name": "a.png", "width": W, "height": H}],
                              categories=[{"id": 1.0, "name": "car"}, {"id": 2, "name": "person"}]), "f.json"),
        tmp_path / "f.json", tmp_path / "f")
    assert flat.panoptic["annotations"] == nested.panoptic["annotations"]
    assert flat.panoptic["images"][0]["id"] == 1 and type(flat.panoptic["images"][0]["id"]) is int
    assert all(type(c["id"]) is int for c in flat.panoptic["categories"])
    text = (tmp_path / "f.json").read_text()
    assert "1.0" not in text
    with pytest.raises(DatasetError, match=r"category_id must be a whole number, got 1.5"):
        convert_instances_to_panoptic(_write(tmp_path, _doc([{"id": 1, "image_id": 1, "category_id": 1.5,
                                                              "segmentation": _box(5, 5, 20, 20)}])),
                                      tmp_path / "x.json", tmp_path / "x")


@pytest.mark.parametrize("content, message", [
    ("{}", "missing top-level key 'images'"),
    ("[]", "a JSON object with the lists images, annotations, categories; this one is a list"),
    ('{"images": [], "annotations": {}, "categories": []}', "not a list: top-level key 'annotations'"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}',
     "needs id, file_name, height and width"),
    ('{"images": [], "annotations": [{"id": 7, "image_id": 1}], "categories": [{"id": 1, "name": "a"}]}',
     "annotation 7: missing 'category_id'"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}',
     "category id 1 appears twice"),
    ("not json", "not valid JSON"),
])
def test_malformed_instance_files_get_one_line_naming_the_file(tmp_path, capsys, content, message):
    src = tmp_path / "instances.json"
    src.write_text(content)
    code, out, err = _cli(capsys, "--instances", src, "--out-json", tmp_path / "ds.json", "--out-pngs", tmp_path / "ds")
    assert code == 2 and message in err and str(src) in err and "Traceback" not in err, err
    assert err.count("\n") == 1


def test_bad_segmentations_name_the_annotation(tmp_path):
    for seg, message in ([[[1, 2], [3, 4]]], "a polygon is a list of numbers"), ([1, 2, 3, 4, 5], "odd number"), \
            ({"size": [H + 1, W], "counts": "abc"}, "RLE of size"), ("x", "a segmentation is polygons"):
        src = _write(tmp_path, _doc([{"id": 9, "image_id": 1, "category_id": 1, "segmentation": seg}]))
        with pytest.raises(DatasetError, match=message) as e:
            convert_instances_to_panoptic(src, tmp_path / "p.json", tmp_path / "p")
        assert "annotation 9" in str(e.value)


def test_a_truncated_semantic_png_and_missing_stuff_file_are_one_line(tmp_path, capsys):
    src = _write(tmp_path, _doc([{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _box(5, 5, 20, 20)}]))
    sem = tmp_path / "sem"
    sem.mkdir()
    Image.fromarray(np.full((H, W), 100, np.uint8)).save(sem / "a.png")
    (sem / "a.png").write_bytes((sem / "a.png").read_bytes()[:60])
    stuff = _write(tmp_path, [{"id": 100, "name": "road"}], "stuff.json")
    code, _, err = _cli(capsys, "--instances", src, "--out-json", tmp_path / "ds.json", "--out-pngs", tmp_path / "ds", "--semantic", sem,
                        "--stuff-categories", stuff)
    assert code == 2 and str(sem / "a.png") in err and "cannot decode" in err and "Traceback" not in err
    code, _, err = _cli(capsys, "--instances", src, "--out-json", tmp_path / "ds.json", "--out-pngs", tmp_path / "ds", "--semantic", sem,
                        "--stuff-categories", tmp_path / "none.json")
    assert code == 2 and "stuff categories file not found" in err and "none.json" in err


def test_annotations_of_unlisted_images_are_counted_or_refused(tmp_path, capsys):
    doc = _doc([{"id": i, "image_id": 5, "category_id": 1, "segmentation": _box(5, 5, 20, 20)} for i in range(3)])
    src = _write(tmp_path, doc)
    code, out, _ = _cli(capsys, "--instances", src, "--out-json", tmp_path / "ds.json", "--out-pngs", tmp_path / "ds")
    assert code == 0 and "annotations of an image id the file does not list, left out: 3" in out
    assert "images without any annotation (kept: void, or stuff only): 1" in out
    code, _, err = _cli(capsys, "--instances", src, "--out-json", tmp_path / "ds2.json", "--out-pngs", tmp_path / "ds2", "--strict")
    assert code == 2 and "image id 5 is not among the file's images" in err


def test_image_files_are_checked_against_the_json_sizes(tmp_path, capsys):
    # the JSON says 40 rows, the file has 50: segments below row 40 would be lost with the JSON's size
    anns = [{"id": i, "image_id": 1, "category_id": 1, "segmentation": _box(2, 4 * i, 10, 4 * i + 3)}
            for i in range(12)]
    doc = _doc(anns)
    src = _write(tmp_path, doc)
    images = _images_folder(tmp_path, doc, sizes={"a.png": (W, 50)})
    code, _, err = _cli(capsys, "--instances", src, "--out", tmp_path / "strict", "--images", images, "--strict")
    assert code == 2 and "the JSON says 60x40" in err and "60x50" in err
    code, out, _ = _cli(capsys, "--instances", src, "--out", tmp_path / "ds", "--images", images, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["segments"] == 12 and summary["counts"]["size_mismatches"] == 1
    ds = CocoPanopticDataset.from_root(tmp_path / "ds", "val")
    assert ds.validate() == [] and ds[0].id_map.shape == (50, W) and len(ds[0].segments) == 12
    (images / "a.png").unlink()
    code, out, _ = _cli(capsys, "--instances", src, "--out", tmp_path / "gone", "--images", images)
    assert code == 0 and "images whose file is missing or unreadable, left out: 1" in out and ": 0 images" in out


def test_image_folders_in_file_names_are_placed_in_the_layout(tmp_path, capsys):
    images = [{"id": 1, "file_name": "JPEGImages/x.png", "width": W, "height": H},
              {"id": 2, "file_name": "other/x.png", "width": W, "height": H}]  # the same stem in two folders
    doc = _doc([{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _box(5, 5, 20, 20)},
                {"id": 2, "image_id": 2, "category_id": 2, "segmentation": _box(5, 5, 30, 30)}], images=images)
    src = _write(tmp_path, doc)
    folder = _images_folder(tmp_path, doc)
    for mode in ("copy", "symlink"):
        root = tmp_path / mode
        code, out, _ = _cli(capsys, "--instances", src, "--out", root, "--images", folder, "--image-mode", mode)
        assert code == 0 and f"2 images {'copied' if mode == 'copy' else 'linked'}" in out
        ds = CocoPanopticDataset.from_root(root, "val")
        assert ds.validate() == [] and [s["category_id"] for i in range(2) for s in ds[i].segments] == [1, 2]
        assert (root / "val/JPEGImages/x.png").is_symlink() == (mode == "symlink")
    src = _write(tmp_path, _doc([], images=[{"id": 1, "file_name": "../x.png", "width": W, "height": H}]))
    code, _, err = _cli(capsys, "--instances", src, "--out-json", tmp_path / "bad.json", "--out-pngs", tmp_path / "bad")
    assert code == 2 and "must be a path relative to the image folder" in err


def test_clipping_overlaps_and_crowds_are_counted(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_box(-10, -10, 30, 30)]},  # clipped
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [_box(5, 5, 15, 15)]},  # in front of 1
            {"id": 3, "image_id": 1, "category_id": 2, "segmentation": [_box(40, 5, 50, 15), [1, 1, 2, 2]]},
            {"id": 4, "image_id": 1, "category_id": 1, "segmentation": []},  # empty
            {"id": 5, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": [_box(0, 32, W, H)]}]
    report = convert_instances_to_panoptic(_write(tmp_path, _doc(anns)), tmp_path / "p.json", tmp_path / "p")
    c = report.to_json()["counts"]
    assert (c["clipped_annotations"], c["occluded_instances"], c["degenerate_polygons"], c["empty_annotations"],
            c["crowd_segments"], c["hidden_instances"]) == (1, 1, 1, 1, 1, 0)
    assert report.segments == 4


def test_the_reader_types_isthing_strictly_and_names_malformed_fields(tmp_path):
    path, _, sem = _instances_file(tmp_path)
    convert_instances_to_panoptic(path, tmp_path / "annotations/panoptic_val.json",
                                  tmp_path / "annotations/panoptic_val", sem,
                                  [{"id": 100, "name": "road"}, {"id": 101, "name": "sky"}])
    ann_file = tmp_path / "annotations/panoptic_val.json"
    good = json.loads(ann_file.read_text())
    for mutate, message in ((lambda d: d["categories"][0].update(isthing="0"), "isthing must be 0, 1, true or false"),
                            (lambda d: d["categories"][0].update(id="1"), "id must be an integer"),
                            (lambda d: d["images"][0].pop("file_name"), "image #0: missing 'file_name'"),
                            (lambda d: d["annotations"][0].pop("segments_info"), "missing 'segments_info'"),
                            (lambda d: d["annotations"][0]["segments_info"][0].update(iscrowd="no"),
                             "it must be 0 or 1")):
        doc = json.loads(json.dumps(good))
        mutate(doc)
        ann_file.write_text(json.dumps(doc))
        with pytest.raises(DatasetError, match=message):
            CocoPanopticDataset.from_root(tmp_path, "val")


def test_report_shows_generator_fields_only_for_generated_data(tmp_path, capsys):
    from eco_ray.cli import main

    path, _, sem = _instances_file(tmp_path)
    convert_instances_to_panoptic(path, tmp_path / "annotations/panoptic_val.json",
                                  tmp_path / "annotations/panoptic_val", sem,
                                  [{"id": 100, "name": "road"}, {"id": 101, "name": "sky"}])
    assert main(["data", "report", "--root", str(tmp_path), "--splits", "val"]) == 0
    out = capsys.readouterr().out
    assert "[val] 2 images" in out and "kinds" not in out and "objects per image" not in out and "PQ 1.0000" in out


def test_what_would_corrupt_a_dataset_is_refused(tmp_path, capsys):
    # two images whose id PNGs would share a name
    doc = _doc([], images=[{"id": 1, "file_name": "a.jpg", "width": W, "height": H},
                           {"id": 2, "file_name": "a.png", "width": W, "height": H}])
    with pytest.raises(DatasetError, match="would share the id PNG 'a.png'"):
        convert_instances_to_panoptic(_write(tmp_path, doc), tmp_path / "p.json", tmp_path / "p")
    # RLE runs that do not cover the image (pycocotools would fill the rest from uninitialised memory)
    short = {"size": [H, W], "counts": [10, 20]}
    text = mask_utils.encode(np.asfortranarray(np.ones((H, W // 2), np.uint8)))["counts"].decode()  # wrong size
    for seg, message in ((short, "cover 30 pixels"), ({"size": [H, W], "counts": text}, "cover 1200 pixels"),
                         ({"size": [H, W], "counts": [H * W + 5, -5]}, "negative run lengths"),
                         ({"size": 7, "counts": "x"}, "RLE of size 7")):
        src = _write(tmp_path, _doc([{"id": 4, "image_id": 1, "category_id": 1, "segmentation": seg}]))
        code, _, err = _cli(capsys, "--instances", src, "--out-json", tmp_path / "r.json", "--out-pngs", tmp_path / "r")
        assert code == 2 and message in err and "annotation 4" in err and err.count("\n") == 1, err
    # inputs that are not what they should be
    code, _, err = _cli(capsys, "--instances", tmp_path, "--out-json", tmp_path / "r.json", "--out-pngs", tmp_path / "r")
    assert code == 2 and "is a directory" in err
    src = _write(tmp_path, _doc([]))
    code, _, err = _cli(capsys, "--instances", src, "--out", tmp_path / "o", "--images", tmp_path / "nowhere")
    assert code == 2 and "image folder not found" in err
    code, _, err = _cli(capsys, "--instances", src, "--out", tmp_path / "o")
    assert code == 2 and "give --images" in err
    (tmp_path / "afile").write_text("x")
    code, _, err = _cli(capsys, "--instances", src, "--out-json", tmp_path / "r.json", "--out-pngs", tmp_path / "afile")
    assert code == 2 and "is not an id-PNG folder this command wrote" in err and (tmp_path / "afile").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_text("x")  # a folder of the user's is never replaced
    code, _, err = _cli(capsys, "--instances", src, "--out-json", tmp_path / "r.json", "--out-pngs", tmp_path / "mine")
    assert code == 2 and (tmp_path / "mine" / "holiday.jpg").is_file()


def test_compressed_rle_runs_are_read_as_pycocotools_writes_them():
    from eco_ray.data.convert import rle_counts_from_string

    rng = np.random.default_rng(0)
    for _ in range(20):
        m = (rng.random((H, W)) < rng.random()).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m))
        assert rle_counts_from_string(rle["counts"].decode()) == _uncompressed_counts(m)


def test_a_failed_rerun_leaves_the_previous_output_as_it_was(tmp_path, capsys):
    good = _doc([{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _box(5, 5, 20, 20)}])
    images = _images_folder(tmp_path, good)
    args = ["--out", tmp_path / "ds", "--images", images]
    assert _cli(capsys, "--instances", _write(tmp_path, good), *args)[0] == 0
    before = (tmp_path / "ds/annotations/panoptic_val.json").read_text()
    bad = _doc([{"id": 1, "image_id": 1, "category_id": 2, "segmentation": _box(0, 0, 30, 30)},
                {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[1, 2, 3]]}])
    code, _, err = _cli(capsys, "--instances", _write(tmp_path, bad, "bad.json"), *args)
    assert code == 2 and "odd number" in err
    assert (tmp_path / "ds/annotations/panoptic_val.json").read_text() == before
    assert CocoPanopticDataset.from_root(tmp_path / "ds", "val").validate() == []
    assert not list((tmp_path / "ds/annotations").glob("*.partial"))


def test_crowds_merge_per_category_and_hidden_ones_are_counted(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": [_box(0, 0, 10, 10)]},
            {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": [_box(30, 0, 40, 10)]},
            {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": [_box(5, 20, 15, 30)]},
            {"id": 4, "image_id": 1, "category_id": 1, "segmentation": [_box(0, 15, 20, 35)]},  # covers crowd 3
            {"id": 5, "image_id": 1, "category_id": 1, "segmentation": [_box(-50, -50, -10, -10)]}]  # outside
    report = convert_instances_to_panoptic(_write(tmp_path, _doc(anns)), tmp_path / "p.json", tmp_path / "p")
    segs = report.panoptic["annotations"][0]["segments_info"]
    assert [(s["category_id"], s["iscrowd"]) for s in segs] == [(1, 0), (2, 1)]
    c = report.to_json()["counts"]
    assert (c["crowd_segments"], c["hidden_crowds"], c["empty_annotations"], c["clipped_annotations"]) == (1, 1, 1, 0)


def test_semantic_pngs_follow_the_file_names_folders(tmp_path):
    images = [{"id": 1, "file_name": "A/x.jpg", "width": W, "height": H},
              {"id": 2, "file_name": "B/x.jpg", "width": W, "height": H},
              {"id": 3, "file_name": "C/y.jpg", "width": W, "height": H}]
    src = _write(tmp_path, _doc([], images=images))
    sem = tmp_path / "sem"
    (sem / "A").mkdir(parents=True)
    Image.fromarray(np.full((H, W), 100, np.uint8)).save(sem / "A/x.png")
    Image.fromarray(np.full((H, W), 101, np.uint8)).save(sem / "y.png")  # a unique stem: found at the top
    Image.fromarray(np.full((H, W), 101, np.uint8)).save(sem / "x.png")  # shared by A/x and B/x: never used
    stuff = [{"id": 100, "name": "road"}, {"id": 101, "name": "sky"}]
    with pytest.raises(DatasetError, match=r"B/x.png .*which another image shares"):
        convert_instances_to_panoptic(src, tmp_path / "p.json", tmp_path / "p", sem, stuff)
    Image.fromarray(np.full((H, W), 100, np.uint8)).save(sem / "B.png")
    (sem / "B").mkdir()
    Image.fromarray(np.full((H, W), 100, np.uint8)).save(sem / "B/x.png")
    report = convert_instances_to_panoptic(src, tmp_path / "p.json", tmp_path / "p", sem, stuff)
    assert [[s["category_id"] for s in a["segments_info"]] for a in report.panoptic["annotations"]] == \
        [[100], [100], [101]]


def test_a_copy_rerun_replaces_the_links_of_a_symlink_run(tmp_path, capsys):
    doc = _doc([], images=[{"id": 1, "file_name": "a.png", "width": W, "height": H}])
    src, images = _write(tmp_path, doc), _images_folder(tmp_path, doc)
    for mode in ("symlink", "copy"):
        assert _cli(capsys, "--instances", src, "--out", tmp_path / "ds", "--images", images,
                    "--image-mode", mode)[0] == 0
        assert (tmp_path / "ds/val/a.png").is_symlink() == (mode == "symlink")
    assert (images / "a.png").is_file()  # the source is never touched
