"""Mask2Former with early exits in its deformable-attention encoder (ECO-M2F).

Built from the modules of transformers' ``Mask2FormerForUniversalSegmentation`` (backbone, pixel
decoder with its encoder layers and FPN convolutions, masked-attention transformer module, class
predictor, loss); this file only changes the order in which they are called:

    backbone -> input projections -> encoder layers 1..k -> FPN + mask projection -> decoder -> heads

"Exiting at k" runs encoder layers 1..k and then the SAME FPN part and the SAME decoder as the full
model; exit 0 runs no encoder layer at all (the heads on the projected backbone features). The three entry
points (one exit per batch, every exit from one pass, each image at its own exit) are ``EarlyExitModel``'s
(``exits.py``); at the deepest exit the model reproduces the library model exactly.

Every call also returns the gate input: the stride-32 tokens after the encoder's input projection,
before any encoder layer and without positional embedding, average-pooled to one vector per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import Mask2FormerForUniversalSegmentation

from eco_ray.model.backbone import PooledCoarseLevels
from eco_ray.model.config import ModelConfig
from eco_ray.model.exits import EarlyExitModel, EncoderInputs


@dataclass
class ExitOutput:
    """Predictions of one exit. Lists run over decoder layers; the last entry is the final prediction."""

    class_logits: list[Tensor]  # each (B, Q, num_labels + 1)
    mask_logits: list[Tensor]  # each (B, Q, H/4, W/4)
    gate_features: Tensor  # (B, hidden_dim)
    exit_per_image: Tensor  # (B,) long, the encoder depth each row was computed at

    @property
    def class_queries_logits(self) -> Tensor:  # the names transformers' post-processing reads
        return self.class_logits[-1]

    @property
    def masks_queries_logits(self) -> Tensor:
        return self.mask_logits[-1]


class EarlyExitMask2Former(EarlyExitModel):
    output_type = ExitOutput

    def __init__(self, config: ModelConfig, m2f: Mask2FormerForUniversalSegmentation | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.m2f = m2f if m2f is not None else Mask2FormerForUniversalSegmentation(config.to_hf())
        if config.pooled_coarse_levels:
            self.m2f.model.pixel_level_module.encoder = PooledCoarseLevels(self.m2f.model.pixel_level_module.encoder)
        if len(self.pixel_decoder.encoder.layers) != config.encoder_layers:
            raise ValueError(f"model has {len(self.pixel_decoder.encoder.layers)} encoder layers, config says "
                             f"{config.encoder_layers}")

    # library modules, by what they are
    @property
    def backbone(self) -> nn.Module:
        return self.m2f.model.pixel_level_module.encoder

    @property
    def pixel_decoder(self) -> nn.Module:
        return self.m2f.model.pixel_level_module.decoder

    # ------------------------------------------------------------------------------------------ stages
    def backbone_features(self, pixel_values: Tensor) -> list[Tensor]:
        return list(self.backbone(pixel_values).feature_maps)

    def encoder_inputs(self, features: Sequence[Tensor]) -> EncoderInputs:
        """The pixel decoder's input preparation: 1x1 projections of the three coarsest maps, flattened,
        with sine position + level embeddings (as in transformers' Mask2FormerPixelDecoder.forward)."""
        pd = self.pixel_decoder
        levels = list(features[::-1][: pd.num_feature_levels])  # stride 32, 16, 8
        embeds = [pd.input_projections[i](x) for i, x in enumerate(levels)]
        pos = [pd.position_embedding(x.shape, x.device, x.dtype) for x in levels]
        batch = embeds[0].shape[0]
        spatial_shapes = [(e.shape[2], e.shape[3]) for e in embeds]
        flat = torch.cat([e.flatten(2).transpose(1, 2) for e in embeds], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + pd.level_embed[i].view(1, 1, -1)
                              for i, p in enumerate(pos)], 1)
        masks = [torch.zeros((batch, h, w), dtype=torch.bool, device=flat.device) for h, w in spatial_shapes]
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=flat.device)
        level_start_index = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([pd.get_valid_ratio(m, dtype=flat.dtype) for m in masks], 1)
        reference_points = pd.encoder.get_reference_points(spatial_shapes, valid_ratios, device=flat.device)
        # pooled projected tokens, no position embedding: stride 32 only (the paper) or every level
        gate_features = embeds[0].mean(dim=(2, 3)) if self.config.gate_input == "stride32" else \
            torch.cat([e.mean(dim=(2, 3)) for e in embeds], 1)
        return EncoderInputs(flat, pos_flat, mask_flat, reference_points, valid_ratios, spatial_shapes,
                              level_start_index, gate_features)

    def encoder_layer(self, index: int, hidden: Tensor, inputs: EncoderInputs) -> Tensor:
        layer = self.pixel_decoder.encoder.layers[index]
        return layer(hidden, inputs.mask, position_embeddings=inputs.pos, reference_points=inputs.reference_points,
                     spatial_shapes_list=inputs.spatial_shapes, level_start_index=inputs.level_start_index)[0]

    def heads(self, features: Sequence[Tensor], hidden: Tensor, inputs: EncoderInputs
              ) -> tuple[list[Tensor], list[Tensor]]:
        """The pixel decoder's FPN part and mask projection, then the masked-attention decoder and the
        class predictor, on the encoder state ``hidden`` of any depth."""
        pd = self.pixel_decoder
        batch, spatial_shapes = hidden.shape[0], inputs.spatial_shapes
        sizes = [h * w for h, w in spatial_shapes]
        outputs = [x.transpose(1, 2).reshape(batch, -1, h, w)
                   for x, (h, w) in zip(torch.split(hidden, sizes, dim=1), spatial_shapes)]
        for idx, feature in enumerate(list(features[: pd.num_fpn_levels])[::-1]):
            lateral = pd.lateral_convolutions[idx](feature)
            up = nn.functional.interpolate(outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(pd.output_convolutions[idx](lateral + up))
        mask_features = pd.mask_projection(outputs[-1])
        decoded = self.m2f.model.transformer_module(outputs[: pd.num_feature_levels], mask_features,
                                                    output_hidden_states=True)
        class_logits = [self.m2f.class_predictor(h.transpose(0, 1)) for h in decoded.intermediate_hidden_states]
        return class_logits, list(decoded.masks_queries_logits)

    # ---------------------------------------------------------------------------------------------- loss
    def loss(self, output: ExitOutput, mask_labels: list[Tensor], class_labels: list[Tensor]) -> Tensor:
        """The library's Mask2Former loss (Hungarian matching, CE + mask BCE + dice, deep supervision)."""
        aux = self.m2f.get_auxiliary_logits(tuple(output.class_logits), tuple(output.mask_logits))
        loss_dict = self.m2f.get_loss_dict(output.mask_logits[-1], output.class_logits[-1], mask_labels, class_labels,
                                           aux)
        return self.m2f.get_loss(loss_dict)
