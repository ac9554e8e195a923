"""Generator, reader, transforms and collate on real files."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from eco_ray.data import CocoPanopticDataset, DatasetError, build_transform, collate_panoptic, id2rgb, rgb2id
from eco_ray.data.synth import CATEGORIES, GEMS, SynthConfig, generate_image, write_dataset
from eco_ray.metrics import PanopticStats, aggregate, image_stats


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 123456, 16777215]])
    np.testing.assert_array_equal(rgb2id(id2rgb(ids)), ids)


def test_generator_is_deterministic_and_seed_dependent():
    cfg = SynthConfig(size=64, seed=7)
    a, b = generate_image(cfg, "train", 5), generate_image(cfg, "train", 5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    other = generate_image(SynthConfig(size=64, seed=8), "train", 5)
    assert not np.array_equal(a[0], other[0])
    assert not np.array_equal(a[0], generate_image(cfg, "val", 5)[0])


def test_written_dataset_does_not_depend_on_worker_count(tmp_path):
    cfg = SynthConfig(size=48, seed=1)
    write_dataset(tmp_path / "w1", cfg, {"val": 10}, workers=1)
    write_dataset(tmp_path / "w2", cfg, {"val": 10}, workers=2)
    j1 = json.loads((tmp_path / "w1/annotations/panoptic_val.json").read_text())
    j2 = json.loads((tmp_path / "w2/annotations/panoptic_val.json").read_text())
    assert j1 == j2
    for im in j1["images"]:
        assert (tmp_path / "w1/val" / im["file_name"]).read_bytes() == (tmp_path / "w2/val" / im["file_name"]).read_bytes()


def test_synth_scores_exactly_one_against_itself(synth_root):
    for split in ("train", "val"):
        ds = CocoPanopticDataset.from_root(synth_root, split)
        assert len(ds) == {"train": 48, "val": 16}[split]
        stats = [image_stats(s.id_map, s.segments, s.id_map, s.segments, ds.categories) for s in map(ds.__getitem__, range(len(ds)))]
        r = aggregate(PanopticStats.stack(stats), ds.categories)
        assert r.pq == 1.0 and r.pq_things == 1.0 and r.pq_stuff == 1.0 and r.miou == 1.0


def test_synth_has_the_designed_spread():
    cfg = SynthConfig(size=64, seed=0)
    metas = [generate_image(cfg, "train", i) for i in range(150)]
    kinds = {m[3]["eco_kind"] for m in metas}
    assert kinds == {"clean", "outline", "relational"}  # camouflage: weight 0 by default
    counts = [m[3]["eco_num_objects"] for m in metas]
    assert min(counts) >= cfg.min_objects and max(counts) == cfg.max_objects
    gem_ids = {c["id"] for c in CATEGORIES if c["name"] in GEMS}
    for image, id_map, cat_of, meta in metas:
        thing_cats = {cat_of[i] for i in np.unique(id_map) if cat_of[i] <= 6}
        if meta["eco_kind"] == "relational":
            assert len(thing_cats) == 1 and thing_cats <= gem_ids  # one key: one gem class per image
        else:
            assert not thing_cats & gem_ids
        # clutter is drawn independently of kind: object count follows clutter alone
        assert meta["eco_num_objects"] <= round(1 + meta["eco_clutter"] * 7)


def test_outline_shapes_show_the_stuff_inside_their_contour():
    # kind is the first draw either way, so the same index gives the same stuff, shape and colour: the outline
    # image must equal the clean one outside the shape and on its contour, and show no flat fill inside
    one = dict(size=64, seed=1, noise=0.0, min_objects=1, max_objects=1)
    for i in range(6):
        clean_img, clean_ids, clean_cat, _ = generate_image(SynthConfig(kind_mix={"clean": 1}, **one), "val", i)
        img, ids, cat, meta = generate_image(SynthConfig(kind_mix={"outline": 1}, **one), "val", i)
        assert meta["eco_kind"] == "outline" and np.array_equal(ids, clean_ids) and cat == clean_cat
        thing = ids == min(k for k, c in cat.items() if c <= 4)
        assert np.array_equal(img[~thing], clean_img[~thing])
        fill = clean_img[thing][0]
        on_fill = (img[thing] == fill).all(-1)
        assert 0 < on_fill.sum() < 0.7 * thing.sum()  # the contour has the colour, the inside does not


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="kind_mix"):
        SynthConfig(kind_mix={"clean": 1, "bogus": 1}).validate()
    with pytest.raises(ValueError, match="min_objects"):
        SynthConfig(min_objects=5, max_objects=2).validate()


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def broken_root(synth_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synth_root, root)
    return root


def _first_names(root):
    doc = json.loads((root / "annotations/panoptic_val.json").read_text())
    return doc, doc["images"][0]["file_name"], doc["annotations"][0]["file_name"]


def test_missing_image_names_the_file(broken_root):
    _, image_name, _ = _first_names(broken_root)
    (broken_root / "val" / image_name).unlink()
    ds = CocoPanopticDataset.from_root(broken_root, "val")
    with pytest.raises(DatasetError, match=image_name):
        ds[0]
    assert len(ds.validate()) == 1


@pytest.mark.parametrize("content", [b"", b"not a png at all", None])
def test_empty_or_corrupt_image_names_the_file(broken_root, content):
    _, image_name, _ = _first_names(broken_root)
    path = broken_root / "val" / image_name
    data = path.read_bytes()
    path.write_bytes(content if content is not None else data[: len(data) // 2])  # None: truncated
    with pytest.raises(DatasetError, match=image_name):
        CocoPanopticDataset.from_root(broken_root, "val")[0]


def test_png_ids_not_matching_json(broken_root):
    doc, _, png_name = _first_names(broken_root)
    doc["annotations"][0]["segments_info"].pop(0)
    (broken_root / "annotations/panoptic_val.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=f"{png_name}.*not in the JSON"):
        CocoPanopticDataset.from_root(broken_root, "val")[0]


def test_unknown_category_and_missing_json(broken_root):
    doc, _, _ = _first_names(broken_root)
    doc["annotations"][0]["segments_info"][0]["category_id"] = 77
    (broken_root / "annotations/panoptic_val.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="unknown category 77"):
        CocoPanopticDataset.from_root(broken_root, "val")
    with pytest.raises(DatasetError, match="panoptic_nope.json"):
        CocoPanopticDataset.from_root(broken_root, "nope")


# ------------------------------------------------------------------------------- transforms + collate
def test_transforms_keep_segments_consistent(synth_root):
    ds = CocoPanopticDataset.from_root(synth_root, "train")
    rng = np.random.default_rng(0)
    tf = build_transform(40, train=True)
    for i in range(8):
        s = tf(ds[i], rng)
        assert s.image.shape == (40, 40, 3) and s.id_map.shape == (40, 40)
        present = set(np.unique(s.id_map).tolist()) - {0}
        assert present == {seg["id"] for seg in s.segments}


def test_flip_moves_image_and_ids_together(synth_root):
    from eco_ray.data.transforms import HorizontalFlip

    s = CocoPanopticDataset.from_root(synth_root, "val")[0]
    f = HorizontalFlip(p=1.0)(s, np.random.default_rng(0))
    np.testing.assert_array_equal(f.image[:, ::-1], s.image)
    np.testing.assert_array_equal(f.id_map[:, ::-1], s.id_map)


def test_collate_produces_mask2former_inputs(synth_root):
    ds = CocoPanopticDataset.from_root(synth_root, "val")
    samples = [ds[i] for i in range(3)]
    samples[0].segments[0]["iscrowd"] = 1  # crowd segments are not training targets
    batch = collate_panoptic(samples, ds.categories)
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    for s, masks, classes in zip(samples, batch["mask_labels"], batch["class_labels"]):
        keep = [seg for seg in s.segments if not seg["iscrowd"]]
        assert masks.shape == (len(keep), 64, 64) and classes.shape == (len(keep),)
        assert torch.equal(masks.sum(0) <= 1, torch.ones(64, 64, dtype=torch.bool))  # non-overlapping
        assert classes.tolist() == [ds.categories.index(seg["category_id"]) for seg in keep]


def test_collate_rejects_mixed_sizes(synth_root):
    ds = CocoPanopticDataset.from_root(synth_root, "val")
    small = build_transform(32, train=False)(ds[1], np.random.default_rng(0))
    with pytest.raises(ValueError, match="one size"):
        collate_panoptic([ds[0], small], ds.categories)


def test_reader_reads_non_square_images_and_resizes(tmp_path):
    """A dataset not made by our generator: 30x50 images written by hand."""
    (tmp_path / "val").mkdir()
    (tmp_path / "annotations/panoptic_val").mkdir(parents=True)
    ids = np.full((30, 50), 5)
    ids[10:20, 10:30] = 6
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "val/a.jpg")
    Image.fromarray(id2rgb(ids)).save(tmp_path / "annotations/panoptic_val/a.png")
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 50, "height": 30}],
           "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [
               {"id": 5, "category_id": 2, "iscrowd": 0}, {"id": 6, "category_id": 1, "iscrowd": 0}]}],
           "categories": [{"id": 1, "name": "x", "isthing": 1}, {"id": 2, "name": "y", "isthing": 0}]}
    (tmp_path / "annotations/panoptic_val.json").write_text(json.dumps(doc))
    s = CocoPanopticDataset.from_root(tmp_path, "val")[0]
    assert s.image.shape == (30, 50, 3)
    r = build_transform(24, train=False)(s, np.random.default_rng(0))
    assert r.id_map.shape == (24, 24) and set(np.unique(r.id_map)) == {5, 6}
