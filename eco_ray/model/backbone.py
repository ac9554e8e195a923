"""Backbone variants beside the transformers ones that Mask2Former builds from its config."""

from __future__ import annotations

from types import SimpleNamespace

from torch import Tensor, nn


class PooledCoarseLevels(nn.Module):
    """A ResNet backbone cut after stage 2: the stride-16 and stride-32 maps are 1x1 convolutions of the
    2x2 and 4x4 average-pooled stride-8 map. Its receptive field ends at stage 2's (51 px for the ``small``
    preset, against 195 px at stride 32 with all four stages), so context beyond it can reach a token only
    through the deformable encoder: the regime of large images, where the coarse grid has many tokens, at the
    cost of small ones. The maps keep the channel counts of the full backbone, so the pixel decoder is
    unchanged."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        sizes = resnet.config.hidden_sizes
        self.embedder = resnet.embedder
        self.stages = nn.ModuleList(list(resnet.encoder.stages)[:2])
        self.to_stride16 = nn.Conv2d(sizes[1], sizes[2], 1)
        self.to_stride32 = nn.Conv2d(sizes[1], sizes[3], 1)

    def forward(self, pixel_values: Tensor) -> SimpleNamespace:
        f4 = self.stages[0](self.embedder(pixel_values))
        f8 = self.stages[1](f4)
        return SimpleNamespace(feature_maps=(f4, f8, self.to_stride16(nn.functional.avg_pool2d(f8, 2)),
                                             self.to_stride32(nn.functional.avg_pool2d(f8, 4))))
