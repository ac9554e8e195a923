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
