"""`eco-ray evaluate`: prediction folders scored against ground truth, checked against panopticapi's algorithm
(``pq_compute_single_core`` and ``PQStat.pq_average``, re-derived here line by line) on perturbed predictions."""

import json
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from eco_ray.data import CocoPanopticDataset, DatasetError, id2rgb, rgb2id
from eco_ray.data.coco_panoptic import segments_from_id_map
from eco_ray.data.predictions import score_predictions
from eco_ray.data.synth import SynthConfig, ensure_dataset

OFFSET = 256 * 256 * 256
VOID = 0


@pytest.fixture(scope="module")
def gt_root(tmp_path_factory):
    """Generated ground truth with void (unlabelled) pixels in every image and one crowd segment in every other
    one (COCO has at most one per category and image)."""
    root = tmp_path_factory.mktemp("gt")
    ensure_dataset(root, SynthConfig(size=48, seed=3), {"val": 24}, workers=1)
    path = root / "annotations" / "panoptic_val.json"
    doc = json.loads(path.read_text())
    things = {c["id"] for c in doc["categories"] if c["isthing"]}
    rng = np.random.default_rng(0)
    for n, ann in enumerate(doc["annotations"]):
        png = root / "annotations" / "panoptic_val" / ann["file_name"]
        id_map = rgb2id(np.asarray(Image.open(png))).astype(np.int64)
        y, x = rng.integers(0, 30, 2)
        id_map[y:y + 18, x:x + 18] = VOID
        Image.fromarray(id2rgb(id_map)).save(png)
        info = {s["id"]: s for s in ann["segments_info"]}
        crowd = next((s["id"] for s in ann["segments_info"] if s["category_id"] in things), None) if n % 2 == 0 \
            else None
        ann["segments_info"] = segments_from_id_map(id_map, {i: s["category_id"] for i, s in info.items()},
                                                    {crowd: 1} if crowd else None)
    path.write_text(json.dumps(doc))
    return root


def _perturb(id_map, segments, categories, rng):
    """Drop, merge, relabel, shift and add segments: every way a prediction goes wrong."""
    pred = id_map.copy()
    segs = {s["id"]: {"id": s["id"], "category_id": s["category_id"]} for s in segments}
    ids = list(segs)
    rng.shuffle(ids)
    if len(ids) > 1 and rng.random() < 0.5:
        pred[pred == ids[0]] = 0  # dropped: predicted void
    if len(ids) > 3 and rng.random() < 0.5:
        pred[pred == ids[2]] = ids[1]  # merged into its neighbour
    if len(ids) > 4:
        segs[ids[3]]["category_id"] = int(rng.choice(categories))  # relabelled
    pred = np.roll(pred, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
    if rng.random() < 0.7:
        y, x = rng.integers(0, 36, 2)
        new = max(segs) + 1
        pred[y:y + int(rng.integers(4, 14)), x:x + int(rng.integers(4, 14))] = new
        segs[new] = {"id": new, "category_id": int(rng.choice(categories))}
    present = set(np.unique(pred).tolist()) - {0}
    return pred, [s for i, s in segs.items() if i in present]


def _write_predictions(gt, folder, seed=0, perfect=False):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cats = [c.id for c in gt.categories.categories]
    annotations, items = [], []
    for n, image_id in enumerate(gt.image_ids):
        id_map, segments = gt.ground_truth(n)
        pred, segs = (id_map, [{"id": s["id"], "category_id": s["category_id"]} for s in segments]) if perfect \
            else _perturb(id_map, segments, cats, rng)
        name = f"{image_id}.png"
        Image.fromarray(id2rgb(pred)).save(folder / name)
        annotations.append({"image_id": image_id, "file_name": name, "segments_info": segs})
        items.append((id_map, segments, pred, segs))
    path = folder.with_suffix(".json")
    path.write_text(json.dumps({"annotations": annotations}))
    return path, items


def _panopticapi(items, categories):
    """panopticapi's pq_compute_single_core + pq_average, on in-memory maps (ground-truth areas from the JSON)."""
    stat = defaultdict(lambda: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
    for gt_map, gt_info, pred_map, pred_info in items:
        gt_segms = {s["id"]: dict(s) for s in gt_info}
        pred_segms = {s["id"]: dict(s) for s in pred_info}
        labels, cnt = np.unique(pred_map, return_counts=True)
        for label, c in zip(labels, cnt):
            if label == VOID:
                continue
            pred_segms[int(label)]["area"] = int(c)
        pan = gt_map.astype(np.uint64) * OFFSET + pred_map.astype(np.uint64)
        gt_pred = {}
        for label, inter in zip(*np.unique(pan, return_counts=True)):
            gt_pred[(int(label // OFFSET), int(label % OFFSET))] = int(inter)
        gt_matched, pred_matched = set(), set()
        for (g, p), inter in gt_pred.items():
            if g not in gt_segms or p not in pred_segms:
                continue
            if gt_segms[g].get("iscrowd", 0) == 1:
                continue
            if gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
                continue
            union = pred_segms[p]["area"] + gt_segms[g]["area"] - inter - gt_pred.get((VOID, p), 0)
            iou = inter / union
            if iou > 0.5:
                stat[gt_segms[g]["category_id"]]["tp"] += 1
                stat[gt_segms[g]["category_id"]]["iou"] += iou
                gt_matched.add(g)
                pred_matched.add(p)
        crowd = {}
        for g, info in gt_segms.items():
            if g in gt_matched:
                continue
            if info.get("iscrowd", 0) == 1:
                crowd[info["category_id"]] = g
                continue
            stat[info["category_id"]]["fn"] += 1
        for p, info in pred_segms.items():
            if p in pred_matched:
                continue
            inter = gt_pred.get((VOID, p), 0)
            if info["category_id"] in crowd:
                inter += gt_pred.get((crowd[info["category_id"]], p), 0)
            if inter / info["area"] > 0.5:
                continue
            stat[info["category_id"]]["fp"] += 1
    out, per_class = {}, {}
    for suffix, keep in (("", lambda c: True), ("_things", lambda c: c.isthing), ("_stuff", lambda c: not c.isthing)):
        pq = sq = rq = 0.0
        n = 0
        for c in categories.categories:
            if not keep(c):
                continue
            s = stat[c.id]
            if s["tp"] + s["fp"] + s["fn"] == 0:
                continue
            n += 1
            pq_c = s["iou"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
            sq_c = s["iou"] / s["tp"] if s["tp"] else 0
            rq_c = s["tp"] / (s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"])
            per_class[c.id] = (pq_c, sq_c, rq_c)
            pq += pq_c
            sq += sq_c
            rq += rq_c
        out.update({"pq" + suffix: pq / n if n else 0, "sq" + suffix: sq / n if n else 0,
                    "rq" + suffix: rq / n if n else 0})
    return out, per_class


def _miou(items, categories):
    inter, union = defaultdict(int), defaultdict(int)
    for gt_map, gt_info, pred_map, pred_info in items:
        gt_cat = {s["id"]: s["category_id"] for s in gt_info}
        pred_cat = {s["id"]: s["category_id"] for s in pred_info}
        gt_sem = np.vectorize(lambda i: gt_cat.get(i, 0))(gt_map)
        pred_sem = np.vectorize(lambda i: pred_cat.get(i, 0))(pred_map)
        valid = gt_sem != 0
        for c in categories.categories:
            inter[c.id] += int(((gt_sem == c.id) & (pred_sem == c.id) & valid).sum())
            union[c.id] += int((((gt_sem == c.id) | (pred_sem == c.id)) & valid).sum())
    ious = [inter[c] / union[c] for c in union if union[c]]
    return sum(ious) / len(ious)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_agree_with_panopticapis_algorithm_on_perturbed_predictions(gt_root, tmp_path, seed):
    gt = CocoPanopticDataset.from_root(gt_root, "val")
    pred_json, items = _write_predictions(gt, tmp_path / "pred", seed=seed)
    score = score_predictions(gt, pred_json).to_json()
    ref, ref_per_class = _panopticapi(items, gt.categories)
    assert 0.2 < ref["pq"] < 0.9  # the perturbations leave a mix of matches and misses
    for key, value in ref.items():
        assert score[key] == pytest.approx(value, abs=1e-9), key
    for row in score["per_class"]:
        assert (row["pq"] is None) == (row["id"] not in ref_per_class)
        if row["pq"] is not None:
            assert (row["pq"], row["sq"], row["rq"]) == pytest.approx(ref_per_class[row["id"]], abs=1e-9)
    assert score["miou"] == pytest.approx(_miou(items, gt.categories), abs=1e-9)


def test_the_ground_truth_scores_one(gt_root, tmp_path):
    gt = CocoPanopticDataset.from_root(gt_root, "val")
    pred_json, _ = _write_predictions(gt, tmp_path / "pred", perfect=True)
    score = score_predictions(gt, pred_json).to_json()
    assert (score["pq"], score["sq"], score["rq"], score["miou"]) == (1.0, 1.0, 1.0, 1.0)


def _cli(capsys, *args):
    from eco_ray.cli import main

    code = main(["evaluate", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_command_prints_and_refuses_bad_predictions_in_one_line(gt_root, tmp_path, capsys):
    gt = CocoPanopticDataset.from_root(gt_root, "val")
    pred_json, _ = _write_predictions(gt, tmp_path / "pred")
    code, out, _ = _cli(capsys, "--gt", gt_root, "--pred", pred_json, "--json")
    assert code == 0 and json.loads(out)["pq"] == pytest.approx(score_predictions(gt, pred_json).to_json()["pq"])
    code, out, _ = _cli(capsys, "--gt", gt_root, "--pred", pred_json, "--per-class")
    assert code == 0 and "things" in out and "gem-warm" in out and "mIoU" in out

    good = json.loads(pred_json.read_text())

    def refused(doc, message, pngs=None):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(doc))
        code, _, err = _cli(capsys, "--gt", gt_root, "--pred", bad, "--pred-pngs", pngs or tmp_path / "pred")
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err

    refused({"annotations": good["annotations"][1:]}, "no prediction for 1 of 24 images")
    refused({"annotations": [*good["annotations"], {**good["annotations"][0], "image_id": 10**6}]},
            "not in the ground truth")
    one = json.loads(json.dumps(good))
    one["annotations"][0]["segments_info"][0]["category_id"] = 999
    refused(one, "unknown category 999")
    one = json.loads(json.dumps(good))
    one["annotations"][0]["segments_info"].append({"id": 77777, "category_id": 1})
    refused(one, "do not occur in the PNG")
    first = tmp_path / "pred" / good["annotations"][0]["file_name"]
    Image.fromarray(id2rgb(rgb2id(np.asarray(Image.open(first)))[:40])).save(first)
    refused(good, "the ground truth of image")
    refused([], "a JSON object with the lists annotations")
    first.write_bytes(first.read_bytes()[:50])
    refused(good, "cannot decode image")
    code, _, err = _cli(capsys, "--gt", gt_root, "--pred", tmp_path / "nothing.json")
    assert code == 2 and "prediction file not found" in err
    for field, value, message in (("id", None, "segment id must be an integer"),
                                  ("id", 1.7, "segment id must be an integer"),
                                  ("category_id", 1.5, "category_id must be an integer"),
                                  ("category_id", [1], "category_id must be an integer")):
        one = json.loads(json.dumps(good))
        one["annotations"][0]["segments_info"][0][field] = value
        refused(one, message)
    one = json.loads(json.dumps(good))
    one["annotations"][0]["file_name"] = 3
    refused(one, "file_name must be a non-empty string")
    for extra, message in ((["--exit", "2"], "--exit go with --parent"), (["--threshold", "0.1"], "go with --parent"),
                           (["--batch-size", "0"], "go with --parent")):
        code, _, err = _cli(capsys, "--gt", gt_root, "--pred", pred_json, *extra)
        assert code == 2 and message in err, err


def test_the_ground_truth_reader_names_mistyped_fields(gt_root, tmp_path):
    import shutil

    root = tmp_path / "gt"
    shutil.copytree(gt_root, root)
    path = root / "annotations" / "panoptic_val.json"
    good = json.loads(path.read_text())
    cases = ((lambda d: d["annotations"][0]["segments_info"][0].update(id=None), "segment id must be an integer"),
             (lambda d: d["annotations"][0]["segments_info"][0].update(category_id=1.5), "must be an integer"),
             (lambda d: d["annotations"][0].update(file_name=None), "file_name must be a non-empty string"),
             (lambda d: d["images"].append(dict(d["images"][0])), "appears twice"),
             (lambda d: d["annotations"].append(dict(d["annotations"][0])), "a second annotation for image"),
             (lambda d: d["categories"].append(["x"]), "a category is an object"))
    for mutate, message in cases:
        doc = json.loads(json.dumps(good))
        mutate(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(DatasetError, match=message):
            CocoPanopticDataset.from_root(root, "val")


def test_predictions_written_through_the_engine_are_at_each_images_size(gt_root, tmp_path):
    """A parent whose input (64 px) is not the images' size (48 px): predictions are written at 48 px and score
    as the same maps scored directly."""
    import torch

    from eco_ray.evaluate import write_predictions
    from eco_ray.metrics import PanopticStats, aggregate, image_stats
    from eco_ray.model.config import load_model_config
    from eco_ray.model.early_exit import EarlyExitMask2Former
    from eco_ray.serve.engine import RequestControl, parent_engine, resize_ids

    gt = CocoPanopticDataset.from_root(gt_root, "val")
    torch.manual_seed(0)
    parent = EarlyExitMask2Former(load_model_config("tiny", [f"num_labels={len(gt.categories)}"]))
    assert parent.config.image_size != gt[0].image.shape[0]
    engine = parent_engine(parent, {"categories": gt.categories.to_coco()}, threshold=0.05)
    doc = write_predictions(engine, gt, tmp_path / "pred.json", RequestControl(exit=2), batch_size=5)
    assert {a["eco_exit"] for a in doc["annotations"]} == {2}
    png = np.asarray(Image.open(tmp_path / "pred" / doc["annotations"][0]["file_name"]))
    assert png.shape[:2] == gt[0].image.shape[:2]
    direct = []
    for n in range(len(gt)):
        ((id_map, segs), _, _), = engine.predict([gt[n].image], [RequestControl(exit=2)])
        direct.append(image_stats(*gt.ground_truth(n), resize_ids(id_map, gt[n].image.shape[:2]), segs, gt.categories))
    expected = aggregate(PanopticStats.stack(direct), gt.categories).pq
    assert score_predictions(gt, tmp_path / "pred.json").to_json()["pq"] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(Exception, match="give exit"):
        engine.allowed_exits(RequestControl())
