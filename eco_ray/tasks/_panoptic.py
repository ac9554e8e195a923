"""Panoptic segmentation with the early-exit Mask2Former (COCO panoptic files, PQ)."""

from __future__ import annotations

from eco_ray.tasks._base import Task


class PanopticTask(Task):
    name = "panoptic"
    metric = "pq"
    metric_label = "PQ"
    validation_series = (("pq", "PQ"), ("pq_things", "PQ things"), ("pq_stuff", "PQ stuff"))
    model_name = "Mask2Former"
    parent_name = "eco-parent"
    annotation_kind = "panoptic"
    route = "segment"
    response_items = "segments"
    compact_query = "mask_format=rle&"  # masks as RLE, not PNG id maps
    gate_name = "eco-gate"

    def open_dataset(self, root, split):
        from eco_ray.data.coco_panoptic import CocoPanopticDataset

        return CocoPanopticDataset.from_root(root, split)

    def categories(self, dataset) -> list[dict]:
        return dataset.categories.to_coco()

    def make_batch(self, dataset, indices, image_size, rng, train):
        from eco_ray.data.collate import collate_panoptic
        from eco_ray.data.transforms import build_transform

        transform = build_transform(image_size, train=train)
        return collate_panoptic([transform(dataset[i], rng) for i in indices], dataset.categories)

    def losses(self, core, outputs, batch, device):
        masks = [m.to(device) for m in batch["mask_labels"]]
        classes = [c.to(device) for c in batch["class_labels"]]
        return {k: core.loss(out, masks, classes) for k, out in outputs.items()}

    def validate(self, core, dataset, num_images, batch_size=16):
        """PQ (all / things / stuff) and mIoU at every exit."""
        from eco_ray.evaluate import evaluate_exits
        from eco_ray.metrics.panoptic import aggregate

        ev = evaluate_exits(core, dataset, indices=range(min(num_images, len(dataset))), batch_size=batch_size)
        out = {}
        for e, k in enumerate(ev.exits):
            r = aggregate(ev.stats[:, e], dataset.categories)
            out.update({f"val_pq_exit{k}": r.pq, f"val_pq_things_exit{k}": r.pq_things,
                        f"val_pq_stuff_exit{k}": r.pq_stuff, f"val_miou_exit{k}": r.miou})
        return out

    def derive_part(self, model, dataset, indices, views, settings, autocast):
        import numpy as np

        from eco_ray.evaluate import evaluate_exits
        from eco_ray.metrics.panoptic import PanopticStats
        from eco_ray.metrics.sparse import SparseStats
        from eco_ray.tasks._base import image_attributes

        per_view = [evaluate_exits(model, dataset, indices=indices, batch_size=settings.batch_size,
                                   flip=(v == "flip"), threshold=settings.threshold,
                                   mask_threshold=settings.mask_threshold,
                                   overlap_threshold=settings.overlap_threshold, autocast=autocast) for v in views]
        stats = PanopticStats(**{k: np.stack([getattr(ev.stats, k) for ev in per_view], axis=1)
                                 for k in per_view[0].stats.as_dict()})
        plain = per_view[0]
        # sparse before it leaves the worker: the driver never holds the dense (image, view, exit, category) arrays
        return {"image_ids": plain.image_ids, "exits": plain.exits, "stats": SparseStats.from_dense(stats),
                "gate_features": plain.gate_features, **image_attributes(plain.meta)}

    def assemble_split(self, split, parts, views, settings, map_blocks=None):
        from eco_ray.derive.table import DerivedSplit, assemble_images
        from eco_ray.metrics.sparse import SparseStats

        order, images = assemble_images(parts)
        stats = SparseStats.concat([p["stats"] for p in parts]).take(order)
        return DerivedSplit(split, images["image_ids"], list(parts[0]["exits"]), list(views), stats,
                            images["gate_features"], images["kinds"], images["num_objects"])

    def split_summary(self, split, categories, tolerance):
        from eco_ray.derive.table import split_summary
        from eco_ray.metrics.panoptic import CategorySet

        return split_summary(split, CategorySet(categories), tolerance)

    def response_options(self, params):
        from eco_ray.serve.engine import MASK_FORMATS, InputError

        mask_format = params.get("mask_format", "png")
        if mask_format not in MASK_FORMATS:
            raise InputError(422, f"mask_format must be one of {list(MASK_FORMATS)}, got {mask_format!r}")
        return {"mask_format": mask_format}

    def predictions(self, output, engine, sizes):
        """(id map, segments) per image at the model's input size: a batch of full-size maps is large, so each
        is resized when its response is encoded."""
        from eco_ray.model.postprocess import to_panoptic

        size = engine.parent.config.image_size
        return to_panoptic(output, engine.categories, (size, size), engine.threshold, engine.mask_threshold,
                           engine.overlap_threshold)

    def response(self, prediction, size, engine, options):
        from eco_ray.serve.engine import encode_panoptic

        id_map, segments = prediction
        return encode_panoptic(id_map, segments, size, engine.categories, options.get("mask_format", "png"))
