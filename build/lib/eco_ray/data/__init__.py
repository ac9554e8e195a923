"""Data: COCO-panoptic reader, transforms, Mask2Former collate, instance->panoptic converter, generator."""

from eco_ray.data.coco_panoptic import (
    CocoPanopticDataset,
    DatasetError,
    PanopticSample,
    SplitPaths,
    id2rgb,
    rgb2id,
)
from eco_ray.data.collate import collate_panoptic, pixel_values
from eco_ray.data.transforms import build_transform

__all__ = ["CocoPanopticDataset", "DatasetError", "PanopticSample", "SplitPaths", "id2rgb", "rgb2id",
           "collate_panoptic", "pixel_values", "build_transform"]
