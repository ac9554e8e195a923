"""Deformable DETR with early exits in its deformable-attention encoder: ECO-M2F for object detection.

Built from the modules of transformers' ``DeformableDetrForObjectDetection`` (ResNet backbone with frozen
batch norm, input projections, sine position + level embeddings, encoder layers, decoder, class and box
heads, loss); this file only changes the order in which they are called:

    backbone -> input projections (4 levels) -> encoder layers 1..k -> decoder -> class + box heads

The library's ``DeformableDetrEncoder`` runs all its layers in one loop, so the layers are called one by
one here (``encoder_layer``). Its feature levels run high resolution first: strides 8, 16 and 32 from the
backbone, then a stride-64 level made from the stride-32 map by a 3x3 stride-2 convolution. The paper's gate
input (the pooled stride-32 projected tokens, before any encoder layer) is therefore level 2 here, where the
segmenter (whose pixel decoder runs stride 32 first) reads level 0. Single-stage only: the reason is in
``DetectionModelConfig``. The three entry points are ``EarlyExitModel``'s (``exits.py``); at the deepest exit
the model reproduces the library model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DeformableDetrForObjectDetection
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrFrozenBatchNorm2d,
    inverse_sigmoid,
)

from eco_ray.model.config import DetectionModelConfig
from eco_ray.model.exits import EarlyExitModel, EncoderInputs

STRIDE32_LEVEL = 2  # index of the stride-32 map among Deformable DETR's levels (stride 8, 16, 32, 64)


def _trainable(backbone: nn.Module) -> None:
    """The library's frozen batch norms back to BatchNorm2d (same statistics and affine values, so the same
    function in eval mode) and every parameter trainable."""
    for name, child in list(backbone.named_children()):
        if isinstance(child, DeformableDetrFrozenBatchNorm2d):
            norm = nn.BatchNorm2d(child.weight.shape[0], eps=1e-5)
            with torch.no_grad():
                norm.weight.copy_(child.weight)
                norm.bias.copy_(child.bias)
                norm.running_mean.copy_(child.running_mean)
                norm.running_var.copy_(child.running_var)
            setattr(backbone, name, norm)
        else:
            _trainable(child)
    for p in backbone.parameters():
        p.requires_grad_(True)


def _stem_frozen(backbone: nn.Module) -> None:
    """Deformable DETR's recipe for a pretrained ResNet: the stem and the first stage do not train, stages 2-4
    do (the library's rule looks for timm's and older names, and from_pretrained turns every gradient back
    on, so it is applied here by the names of transformers' ResNet)."""
    for name, p in backbone.named_parameters():
        p.requires_grad_(any(f"stages.{i}." in name for i in (1, 2, 3)))


@dataclass
class DetectionExitOutput:
    """Predictions of one exit. Lists run over decoder layers; the last entry is the final prediction."""

    class_logits: list[Tensor]  # each (B, Q, num_labels): sigmoid (focal) logits, no "no object" class
    boxes: list[Tensor]  # each (B, Q, 4): (cx, cy, w, h), relative to the image, in [0, 1]
    gate_features: Tensor  # (B, gate_dim)
    exit_per_image: Tensor  # (B,) long

    @property
    def logits(self) -> Tensor:  # the names transformers' post-processing reads
        return self.class_logits[-1]

    @property
    def pred_boxes(self) -> Tensor:
        return self.boxes[-1]


class EarlyExitDeformableDetr(EarlyExitModel):
    output_type = DetectionExitOutput

    def __init__(self, config: DetectionModelConfig, detr: DeformableDetrForObjectDetection | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.detr = detr if detr is not None else DeformableDetrForObjectDetection(config.to_hf())
        hf = self.detr.config
        if hf.two_stage:
            raise ValueError("two-stage Deformable DETR is not supported: its queries are the encoder's top "
                             "proposals, so they change with the exit (see DetectionModelConfig)")
        if hf.num_feature_levels != 4:
            raise ValueError(f"the detector needs 4 feature levels, the model has {hf.num_feature_levels}")
        if len(self.detr.model.encoder.layers) != config.encoder_layers:
            raise ValueError(f"model has {len(self.detr.model.encoder.layers)} encoder layers, config says "
                             f"{config.encoder_layers}")
        if config.train_backbone if config.train_backbone is not None else config.pretrained is None:
            _trainable(self.detr.model.backbone.model)
        else:
            _stem_frozen(self.detr.model.backbone.model)

    # library modules, by what they are
    @property
    def backbone(self) -> nn.Module:
        return self.detr.model.backbone

    @property
    def body(self) -> nn.Module:  # DeformableDetrModel: projections, embeddings, encoder, decoder
        return self.detr.model

    # ------------------------------------------------------------------------------------------ stages
    def backbone_features(self, pixel_values: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(feature map, pixel mask) per backbone level, strides 8, 16, 32; every pixel is real here (the
        inputs are resized, not padded)."""
        b, _, h, w = pixel_values.shape
        pixel_mask = torch.ones((b, h, w), dtype=torch.long, device=pixel_values.device)
        return self.backbone(pixel_values, pixel_mask)

    def encoder_inputs(self, features: list[tuple[Tensor, Tensor]]) -> EncoderInputs:
        """DeformableDetrModel.forward's preparation of the encoder input, for an all-real pixel mask."""
        body = self.body
        dtype = features[0][0].dtype
        sources, masks, pos = [], [], []
        for level, (source, mask) in enumerate(features):
            sources.append(body.input_proj[level](source))
            masks.append(mask)
            pos.append(body.position_embedding(shape=source.shape, device=source.device, dtype=dtype, mask=mask))
        for level in range(len(sources), body.config.num_feature_levels):  # the stride-64 level(s)
            source = body.input_proj[level](features[-1][0] if level == len(features) else sources[-1])
            mask = torch.ones(source.shape[:1] + source.shape[2:], dtype=torch.bool, device=source.device)
            sources.append(source)
            masks.append(mask)
            pos.append(body.position_embedding(shape=source.shape, device=source.device, dtype=dtype, mask=mask))
        spatial_shapes = [(s.shape[2], s.shape[3]) for s in sources]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in sources], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + body.level_embed[i].view(1, 1, -1)
                              for i, p in enumerate(pos)], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=flat.device)
        level_start_index = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([body.get_valid_ratio(m, dtype=flat.dtype) for m in masks], 1)
        reference_points = body.encoder.get_reference_points(tuple(spatial_shapes), valid_ratios, device=flat.device)
        gate_features = sources[STRIDE32_LEVEL].mean(dim=(2, 3)) if self.config.gate_input == "stride32" else \
            torch.cat([s.mean(dim=(2, 3)) for s in sources], 1)
        return EncoderInputs(flat, pos_flat, mask_flat, reference_points, valid_ratios, spatial_shapes,
                             level_start_index, gate_features)

    def encoder_layer(self, index: int, hidden: Tensor, inputs: EncoderInputs) -> Tensor:
        layer = self.body.encoder.layers[index]
        return layer(hidden, inputs.mask, spatial_position_embeddings=inputs.pos,
                     reference_points=inputs.reference_points, spatial_shapes=inputs.spatial_shapes_tensor,
                     spatial_shapes_list=inputs.spatial_shapes, level_start_index=inputs.level_start_index)

    def heads(self, features, hidden: Tensor, inputs: EncoderInputs) -> tuple[list[Tensor], list[Tensor]]:
        """The single-stage decoder (learned queries and reference points) and the class and box heads of
        every decoder layer, as DeformableDetrForObjectDetection.forward computes them."""
        body = self.body
        batch, d = hidden.shape[0], hidden.shape[2]
        queries = body.query_position_embeddings.weight
        if not torch.is_grad_enabled():  # a view of a parameter made under no_grad still "requires grad" with no
            queries = queries.detach()  # grad_fn, which FlopCounterMode's module tracker refuses
        query_embed, target = torch.split(queries, d, dim=1)
        query_embed = query_embed.unsqueeze(0).expand(batch, -1, -1)
        target = target.unsqueeze(0).expand(batch, -1, -1)
        reference_points = body.reference_points(query_embed).sigmoid()
        decoded = body.decoder(inputs_embeds=target, object_queries_position_embeddings=query_embed,
                               encoder_hidden_states=hidden, encoder_attention_mask=inputs.mask,
                               reference_points=reference_points, spatial_shapes=inputs.spatial_shapes_tensor,
                               spatial_shapes_list=inputs.spatial_shapes, level_start_index=inputs.level_start_index,
                               valid_ratios=inputs.valid_ratios)
        states, references = decoded.intermediate_hidden_states, decoded.intermediate_reference_points
        classes, boxes = [], []
        for level in range(states.shape[1]):
            reference = inverse_sigmoid(reference_points if level == 0 else references[:, level - 1])
            delta = self.detr.bbox_embed[level](states[:, level])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            classes.append(self.detr.class_embed[level](states[:, level]))
            boxes.append(coord.sigmoid())
        return classes, boxes

    # ---------------------------------------------------------------------------------------------- loss
    def loss(self, output: DetectionExitOutput, labels: list[dict[str, Tensor]]) -> Tensor:
        """The library's Deformable DETR loss (Hungarian matching, focal classification, L1 + GIoU boxes,
        deep supervision). ``labels``: per image ``{"class_labels": (N,) long, "boxes": (N, 4) cxcywh in
        [0, 1]}``."""
        loss, _, _ = self.detr.loss_function(output.logits, labels, output.logits.device, output.pred_boxes,
                                              self.detr.config, torch.stack(output.class_logits),
                                              torch.stack(output.boxes))
        return loss
