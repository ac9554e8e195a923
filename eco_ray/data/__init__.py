"""Data: COCO-panoptic reader, transforms, Mask2Former collate, instance->panoptic converter, generator.

The names below load on first use (PEP 562), so that reading a config (``eco_ray.data.synth``'s SynthConfig)
does not import torch with the collate functions.
"""

import importlib

_WHERE = {
    "CocoPanopticDataset": "coco_panoptic", "DatasetError": "coco_panoptic", "PanopticSample": "coco_panoptic",
    "SplitPaths": "coco_panoptic", "id2rgb": "coco_panoptic", "rgb2id": "coco_panoptic",
    "collate_panoptic": "collate", "pixel_values": "collate", "build_transform": "transforms",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"eco_ray.data.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eco_ray.data' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
