"""Object detection with the early-exit Deformable DETR (COCO instance files, COCO AP)."""

from __future__ import annotations

from eco_ray.tasks._base import Task


class DetectionTask(Task):
    name = "detection"
    metric = "ap"
    metric_label = "AP"
    validation_series = (("ap", "AP"), ("ap50", "AP50"), ("ap75", "AP75"))
    model_name = "Deformable DETR"
    parent_name = "eco-det-parent"
    annotation_kind = "instances"
    route = "detect"
    response_items = "detections"
    gate_name = "eco-det-gate"

    def open_dataset(self, root, split):
        from eco_ray.data.coco_instances import CocoInstancesDataset

        return CocoInstancesDataset.from_root(root, split)

    def categories(self, dataset) -> list[dict]:
        return [dict(c) for c in dataset.categories]

    def make_batch(self, dataset, indices, image_size, rng, train):
        """Each image resized to the square input with its boxes; training flips half of them."""
        from eco_ray.data.collate import collate_detection

        flip = (rng.random(len(indices)) < 0.5).tolist() if train else None
        return collate_detection([dataset[i] for i in indices], dataset.labels, image_size, flip=flip)

    def losses(self, core, outputs, batch, device):
        labels = [{k: v.to(device) for k, v in target.items()} for target in batch["labels"]]
        return {k: core.loss(out, labels) for k, out in outputs.items()}

    def validate(self, core, dataset, num_images, batch_size=16):
        """COCO box AP and AP50 at every exit."""
        from eco_ray.evaluate import evaluate_detector_exits
        from eco_ray.metrics.detection import accumulate

        ev = evaluate_detector_exits(core, dataset, indices=range(min(num_images, len(dataset))),
                                     batch_size=batch_size)
        out = {}
        for k in ev.exits:
            stats = accumulate(ev.records[k])
            out.update({f"val_ap_exit{k}": stats["AP"], f"val_ap50_exit{k}": stats["AP50"],
                        f"val_ap75_exit{k}": stats["AP75"]})
        return out

    def derive_part(self, model, dataset, indices, views, settings, autocast):
        from eco_ray.evaluate import evaluate_detector_exits
        from eco_ray.metrics.detection import DetectionRecords
        from eco_ray.tasks._base import image_attributes

        per_view = [evaluate_detector_exits(model, dataset, indices=indices, batch_size=settings.batch_size,
                                            flip=(v == "flip"), autocast=autocast) for v in views]
        plain = per_view[0]
        return {"image_ids": plain.image_ids, "exits": plain.exits,
                "records": DetectionRecords.from_matches([ev.records for ev in per_view]),
                "gate_features": plain.gate_features, **image_attributes(plain.meta)}

    def assemble_split(self, split, parts, views, settings, map_blocks=None):
        from eco_ray.derive._detection import assemble

        return assemble(split, parts, list(views), settings.label_block, map_blocks)

    def split_summary(self, split, categories, tolerance):
        from eco_ray.derive._detection import split_summary

        return split_summary(split, tolerance)

    def category_set(self, categories):
        """Every class is a thing (COCO instance files carry no ``isthing``)."""
        from eco_ray.metrics.panoptic import CategorySet

        return CategorySet([{**c, "isthing": 1} for c in categories])

    def response_options(self, params):
        """``min_score`` (default 0: every one of the 100 best detections, as COCO AP scores them) and
        ``image_id`` (an integer copied into each detection, so the responses concatenate into a COCO results
        file)."""
        import math

        from eco_ray.serve.engine import InputError

        options = {"min_score": 0.0, "image_id": None}
        raw = params.get("min_score")
        if raw not in (None, ""):
            try:
                options["min_score"] = float(raw)
            except ValueError:
                raise InputError(422, f"min_score={raw!r} is not a number") from None
            if not (math.isfinite(options["min_score"]) and 0 <= options["min_score"] <= 1):
                raise InputError(422, f"min_score is a score in [0, 1], got {raw!r}")
        raw = params.get("image_id")
        if raw not in (None, ""):
            try:
                options["image_id"] = int(raw)
            except ValueError:
                raise InputError(422, f"image_id={raw!r} is not an integer") from None
        return options

    def predictions(self, output, engine, sizes):
        """COCO detections per image in its own pixels (boxes are relative: no resize), best first."""
        from eco_ray.model.postprocess import to_detections

        return to_detections(output, engine.categories.ids, sizes)

    def response(self, prediction, size, engine, options):
        """COCO's result format (``category_id``, ``bbox`` [x, y, w, h], ``score``; ``image_id`` when the request
        gave one), with the category's name."""
        names = {c.id: c.name for c in engine.categories.categories}
        image_id = {} if options.get("image_id") is None else {"image_id": options["image_id"]}
        floor = options.get("min_score", 0.0)
        detections = [{**image_id, "category_id": d["category_id"], "category": names[d["category_id"]],
                       "bbox": [round(v, 2) for v in d["bbox"]], "score": round(d["score"], 4)}
                      for d in prediction if d["score"] >= floor]
        return {"height": int(size[0]), "width": int(size[1]), "detections": detections}
