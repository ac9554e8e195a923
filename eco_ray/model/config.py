"""Model configuration: a typed dataclass, named presets in YAML, and the transformers config it builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from eco_ray.config import ConfigError, load_config
from eco_ray.resources import resolve_resource, resource_names, resource_path

if TYPE_CHECKING:  # transformers (and torch with it) loads only where a model is built, not to read a config
    from transformers import DeformableDetrConfig, Mask2FormerConfig

BACKBONES = ("resnet", "swin")
GATE_INPUTS = ("stride32", "levels")
# detectron2 Mask2Former's value (lower values keep more, mostly wrong or loose, segments; docs/results.md).
# Derive and serve take it as a setting, and both must use the same value for the table's PQ to hold for what
# is served.
OVERLAP_THRESHOLD = 0.8
TASKS = ("panoptic", "detection")
# the shipped presets of each task (eco_ray/resources/<folder>/<name>.yaml)
_PRESETS = {"panoptic": "models", "detection": "detectors"}


def _check_encoder(cfg) -> None:
    """The encoder settings both models share."""
    if cfg.hidden_dim % 32:
        raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm groups), got {cfg.hidden_dim}")
    if cfg.hidden_dim % cfg.num_heads:
        raise ValueError(f"hidden_dim {cfg.hidden_dim} is not divisible by num_heads {cfg.num_heads}")
    if not cfg.exits or sorted(set(cfg.exits)) != list(cfg.exits):
        raise ValueError(f"exits must be a non-empty increasing list, got {cfg.exits}")
    if cfg.exits[0] < 0 or cfg.exits[-1] > cfg.encoder_layers:
        raise ValueError(f"exits must lie in 0..encoder_layers={cfg.encoder_layers}, got {cfg.exits}")


@dataclass
class ModelConfig:
    """An early-exit Mask2Former. Sizes follow transformers' Mask2FormerConfig names where they exist."""

    name: str = "small"
    backbone: str = "resnet"  # resnet | swin
    backbone_embed: int = 32  # ResNet stem width / Swin embed_dim
    backbone_hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # ResNet only
    backbone_depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    swin_num_heads: list[int] = field(default_factory=lambda: [2, 4, 8, 16])  # Swin only
    swin_window: int = 4  # Swin only
    hidden_dim: int = 64  # pixel-decoder feature size = mask feature size = decoder width (multiple of 32)
    encoder_layers: int = 6  # deformable-attention encoder layers
    encoder_ffn: int = 256
    num_heads: int = 4
    decoder_layers: int = 4  # as transformers counts them: decoder_layers - 1 masked-attention layers run
    decoder_ffn: int = 256
    num_queries: int = 20
    train_num_points: int = 1024  # sampled points per mask in the loss
    class_weight: float = 2.0  # loss weights, as transformers names them (its defaults)
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    image_size: int = 128  # side of the square training / cost-measurement input
    num_labels: int = 9  # categories of the dataset (set from the dataset when training)
    exits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])  # encoder depths where the model may exit
    pretrained: str | None = None  # a local transformers Mask2Former directory to start from
    # what the gate sees, all computed before any encoder layer (free): stride32 = the paper's pooled stride-32
    # projected tokens (hidden_dim values); levels = the pooled stride-32, 16 and 8 projections (3 x hidden_dim)
    gate_input: str = "stride32"
    # the stride-16 and stride-32 maps made by pooling the stride-8 map (ResNet stages 1-2 only) instead of by
    # stages 3-4: a receptive field capped at stage 2's, so that context must travel through the encoder
    pooled_coarse_levels: bool = False

    @property
    def gate_dim(self) -> int:
        """The length of the gate input's feature vector."""
        return self.hidden_dim * (1 if self.gate_input == "stride32" else 3)

    def validate(self) -> None:
        if self.gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {self.gate_input!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        _check_encoder(self)
        if self.pooled_coarse_levels and (self.backbone != "resnet" or len(self.backbone_hidden_sizes) != 4):
            raise ValueError("pooled_coarse_levels needs the 4-stage ResNet backbone")
        if self.decoder_layers < 2:
            raise ValueError("decoder_layers must be >= 2 (transformers runs decoder_layers - 1 layers)")
        if self.backbone == "resnet" and len(self.backbone_hidden_sizes) != len(self.backbone_depths):
            raise ValueError("backbone_hidden_sizes and backbone_depths must have one entry per stage")
        if self.num_labels < 1 or self.num_queries < 1 or self.image_size < 32:
            raise ValueError("num_labels and num_queries must be >= 1 and image_size >= 32")

    def to_hf(self) -> Mask2FormerConfig:
        from transformers import Mask2FormerConfig, ResNetConfig, SwinConfig

        stages = [f"stage{i + 1}" for i in range(len(self.backbone_depths))]
        if self.backbone == "resnet":
            backbone = ResNetConfig(embedding_size=self.backbone_embed, hidden_sizes=list(self.backbone_hidden_sizes),
                                    depths=list(self.backbone_depths), layer_type="basic", out_features=stages)
        else:
            backbone = SwinConfig(image_size=self.image_size, embed_dim=self.backbone_embed,
                                  depths=list(self.backbone_depths), num_heads=list(self.swin_num_heads),
                                  window_size=self.swin_window, out_features=stages)
        return Mask2FormerConfig(
            backbone_config=backbone, feature_size=self.hidden_dim, mask_feature_size=self.hidden_dim,
            hidden_dim=self.hidden_dim, encoder_feedforward_dim=self.encoder_ffn, encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers, num_attention_heads=self.num_heads, dim_feedforward=self.decoder_ffn,
            num_queries=self.num_queries, train_num_points=self.train_num_points, dropout=0.0,
            class_weight=self.class_weight, mask_weight=self.mask_weight, dice_weight=self.dice_weight,
            num_labels=self.num_labels, id2label={i: str(i) for i in range(self.num_labels)},
            label2id={str(i): i for i in range(self.num_labels)}, use_auxiliary_loss=True,
            output_auxiliary_logits=False,
        )


@dataclass
class DetectionModelConfig:
    """An early-exit Deformable DETR (transformers' DeformableDetrForObjectDetection). Sizes follow
    DeformableDetrConfig's names where they exist; the fields shared with ModelConfig mean the same.

    Single-stage (``two_stage`` off), on purpose: the decoder's queries and reference points are learned
    parameters, so everything after the encoder is the same function at every exit, and an exit changes only
    what the decoder attends to. With two_stage the queries themselves are the top proposals of the encoder
    output, so their number, order and boxes move with the exit, and a gate's input would no longer be the
    only exit-independent part of the pass."""

    name: str = "small"
    backbone_embed: int = 32  # ResNet stem width
    backbone_hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    backbone_depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    hidden_dim: int = 64  # d_model: the projected feature size = encoder and decoder width (multiple of 32)
    encoder_layers: int = 6
    encoder_ffn: int = 256
    num_heads: int = 4
    encoder_points: int = 4  # sampled keys per level and head (DeformableDetrConfig.encoder_n_points)
    decoder_layers: int = 3
    decoder_ffn: int = 256
    decoder_points: int = 4
    num_queries: int = 50
    with_box_refine: bool = False
    class_cost: int = 1  # the Hungarian matcher's and the loss's weights, as transformers names (and types) them
    bbox_cost: int = 5
    giou_cost: int = 2
    bbox_loss_coefficient: int = 5
    giou_loss_coefficient: int = 2
    focal_alpha: float = 0.25
    image_size: int = 128
    num_labels: int = 6  # thing categories of the dataset (set from the dataset when training)
    exits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])
    pretrained: str | None = None  # a local transformers Deformable DETR directory to start from
    # true: every backbone parameter trains and its norms are BatchNorm, for a backbone learnt from scratch;
    # false: the library's recipe for a pretrained ResNet (frozen batch norm, stem and first stage frozen),
    # which would leave a randomly initialised stem fixed; unset: true from scratch, false from `pretrained`
    train_backbone: bool | None = None
    # what the gate sees, computed before any encoder layer: stride32 = the pooled stride-32 projected tokens
    # (level 2 of Deformable DETR's four, which run stride 8 first); levels = every level pooled (4 x hidden_dim)
    gate_input: str = "stride32"

    @property
    def gate_dim(self) -> int:
        """The length of the gate input's feature vector."""
        return self.hidden_dim * (1 if self.gate_input == "stride32" else 4)

    def validate(self) -> None:
        if self.gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {self.gate_input!r}")
        _check_encoder(self)
        if len(self.backbone_hidden_sizes) != 4 or len(self.backbone_depths) != 4:
            raise ValueError("the detector's ResNet has 4 stages (it reads stages 2-4: strides 8, 16, 32)")
        if self.decoder_layers < 1:
            raise ValueError("decoder_layers must be >= 1")
        if self.num_labels < 1 or self.num_queries < 1:
            raise ValueError("num_labels and num_queries must be >= 1")
        if self.image_size < 128:  # the stride-64 level's GroupNorm needs more than one value per group
            raise ValueError(f"image_size must be >= 128 (the stride-64 level is 2x2 there), got {self.image_size}")

    def to_hf(self) -> DeformableDetrConfig:
        from transformers import DeformableDetrConfig, ResNetConfig

        backbone = ResNetConfig(embedding_size=self.backbone_embed, hidden_sizes=list(self.backbone_hidden_sizes),
                                depths=list(self.backbone_depths), layer_type="basic",
                                out_features=["stage2", "stage3", "stage4"])
        return DeformableDetrConfig(
            backbone_config=backbone, d_model=self.hidden_dim, encoder_layers=self.encoder_layers,
            encoder_ffn_dim=self.encoder_ffn, encoder_attention_heads=self.num_heads,
            encoder_n_points=self.encoder_points, decoder_layers=self.decoder_layers,
            decoder_ffn_dim=self.decoder_ffn, decoder_attention_heads=self.num_heads,
            decoder_n_points=self.decoder_points, num_queries=self.num_queries, num_feature_levels=4,
            two_stage=False, with_box_refine=self.with_box_refine, auxiliary_loss=True, dropout=0.0,
            class_cost=self.class_cost, bbox_cost=self.bbox_cost, giou_cost=self.giou_cost,
            bbox_loss_coefficient=self.bbox_loss_coefficient, giou_loss_coefficient=self.giou_loss_coefficient,
            focal_alpha=self.focal_alpha, num_labels=self.num_labels,
            id2label={i: str(i) for i in range(self.num_labels)}, label2id={str(i): i for i in range(self.num_labels)},
        )


def preset_names(task: str = "panoptic") -> list[str]:
    return resource_names(_PRESETS[task])


def preset_path(name: str, task: str = "panoptic") -> Path:
    return resource_path(_PRESETS[task], name)


def load_model_config(name_or_path: str | Path, overrides=(), task: str = "panoptic"
                      ) -> ModelConfig | DetectionModelConfig:
    """A preset name of the task (``tiny``, ``small``, ...) or a YAML path, plus ``key=value`` overrides."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
    try:
        path = resolve_resource(_PRESETS[task], name_or_path)
    except ConfigError:
        what = "model config" if task == "panoptic" else f"{task} model config"
        raise ConfigError(f"unknown {what} {str(name_or_path)!r}: not a file and not one of "
                          f"{preset_names(task)}") from None
    return load_config(ModelConfig if task == "panoptic" else DetectionModelConfig, path, overrides)
