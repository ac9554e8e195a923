"""The exit machinery shared by every early-exit model: where the encoder stops, never what comes after it.

A model (the segmenter in ``early_exit.py``, the detector in ``early_exit_detr.py``) provides four stages:

    backbone_features(x) -> encoder_inputs(features) -> encoder_layer(i, ...) x k -> heads(features, hidden, inputs)

and this base class runs them in the three orders the pipeline needs:

- ``forward(x, exit=k)``: one exit for the whole batch (``k`` = deepest by default);
- ``forward_exits(x, exits)``: every listed exit from ONE pass: backbone and encoder run once, the encoder
  state is tapped at each exit, only the heads run per exit (Step B);
- ``forward_per_image(x, exit_per_image)`` / ``forward_gated(x, decide)``: each image at its own depth
  (serving a gate's decisions): an image stops taking part in the encoder as soon as it reaches its exit,
  and the heads run once on the whole batch.

The encoder layers are called one by one from here, never by slicing the library's shared layer list, so a
live replica's model is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class EncoderInputs:
    """What every deformable-attention encoder layer reads, as transformers' pixel decoders prepare it."""

    embeds: Tensor  # (B, L, d) flattened multi-scale tokens after input projection
    pos: Tensor  # (B, L, d) positional + level embeddings
    mask: Tensor  # (B, L) the padding mask in the convention of the model's layers (no padding here)
    reference_points: Tensor
    valid_ratios: Tensor
    spatial_shapes: list[tuple[int, int]]
    level_start_index: Tensor
    gate_features: Tensor  # (B, gate_dim): the gate's input, computed before any encoder layer

    @property
    def spatial_shapes_tensor(self) -> Tensor:
        return torch.as_tensor(self.spatial_shapes, dtype=torch.long, device=self.embeds.device)

    def rows(self, index: Tensor) -> EncoderInputs:
        return EncoderInputs(self.embeds[index], self.pos[index], self.mask[index], self.reference_points[index],
                             self.valid_ratios[index], self.spatial_shapes, self.level_start_index,
                             self.gate_features[index])


class EarlyExitModel(nn.Module):
    """Subclasses set ``config`` (with ``exits`` and ``encoder_layers``), ``output_type`` (a dataclass built as
    ``output_type(*heads(...), gate_features, exit_per_image)``) and the four stages."""

    output_type: type

    @property
    def exits(self) -> list[int]:
        return list(self.config.exits)

    def backbone_features(self, pixel_values: Tensor) -> list:
        raise NotImplementedError

    def encoder_inputs(self, features) -> EncoderInputs:
        raise NotImplementedError

    def encoder_layer(self, index: int, hidden: Tensor, inputs: EncoderInputs) -> Tensor:
        raise NotImplementedError

    def heads(self, features, hidden: Tensor, inputs: EncoderInputs) -> tuple:
        """Everything after the encoder, on the encoder state ``hidden`` of any depth; the same modules at
        every exit."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------- entry points
    def _check_exits(self, exits: Sequence[int]) -> None:
        bad = sorted(set(int(k) for k in exits) - set(self.exits))
        if bad:
            raise ValueError(f"exits {bad} are not exits of this model; its exits are {self.exits}")

    def forward(self, pixel_values: Tensor, exit: int | None = None, exits: Sequence[int] | None = None):
        """One exit (default: the deepest), or with ``exits=[...]`` the dict of ``forward_exits``: the one
        entry point that DistributedDataParallel wraps."""
        if exits is not None:
            return self.forward_exits(pixel_values, exits)
        k = self.exits[-1] if exit is None else int(exit)
        return self.forward_exits(pixel_values, [k])[k]

    def forward_exits(self, pixel_values: Tensor, exits: Sequence[int] | None = None) -> dict:
        exits = sorted(set(int(k) for k in (self.exits if exits is None else exits)))
        self._check_exits(exits)
        features = self.backbone_features(pixel_values)
        inputs = self.encoder_inputs(features)
        hidden = inputs.embeds
        out = {}
        for depth in range(exits[-1] + 1):  # depth 0: no encoder layer (the heads on the projected tokens)
            if depth > 0:
                hidden = self.encoder_layer(depth - 1, hidden, inputs)
            if depth in exits:
                rows = torch.full((hidden.shape[0],), depth, dtype=torch.long, device=hidden.device)
                out[depth] = self.output_type(*self.heads(features, hidden, inputs), inputs.gate_features, rows)
        return out

    def forward_per_image(self, pixel_values: Tensor, exit_per_image: Tensor | Sequence[int]):
        return self.forward_gated(pixel_values, lambda _: exit_per_image)

    def forward_gated(self, pixel_values: Tensor, decide):
        """``decide(gate_features) -> exit per image``, then each image leaves the encoder at its exit; the
        backbone and the input projection run once for both (serving's hot path)."""
        features = self.backbone_features(pixel_values)
        inputs = self.encoder_inputs(features)
        exit_per_image = torch.as_tensor(decide(inputs.gate_features), dtype=torch.long, device=pixel_values.device)
        if exit_per_image.shape != (pixel_values.shape[0],):
            raise ValueError(f"exit_per_image must have one entry per image ({pixel_values.shape[0]}), "
                             f"got shape {tuple(exit_per_image.shape)}")
        self._check_exits(exit_per_image.tolist())
        return self._per_image(features, inputs, exit_per_image)

    def _per_image(self, features, inputs: EncoderInputs, exit_per_image: Tensor):
        """Rows leave the encoder at their own depth (the batch shrinks as they do); the encoder state each
        row left with is kept, and the heads (which do not depend on depth) then run ONCE on the whole batch: a
        mixed batch costs one head call, like a full-depth batch, not one per exit."""
        active = torch.arange(exit_per_image.shape[0], device=exit_per_image.device)  # rows still in the encoder
        hidden, sub = inputs.embeds, inputs
        final = torch.empty_like(inputs.embeds)
        for depth in range(int(exit_per_image.max()) + 1):
            if depth > 0:
                hidden = self.encoder_layer(depth - 1, hidden, sub)
            leaving = exit_per_image[active] == depth
            if not leaving.any():
                continue
            final[active[leaving]] = hidden[leaving]
            keep = ~leaving
            active, hidden, sub = active[keep], hidden[keep], sub.rows(keep)
            if active.numel() == 0:
                break
        return self.output_type(*self.heads(features, final, inputs), inputs.gate_features, exit_per_image)
