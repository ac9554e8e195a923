"""Model configuration: a typed dataclass, named presets in YAML, and the transformers config it builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import Mask2FormerConfig, ResNetConfig, SwinConfig

from eco_ray.config import ConfigError, load_config
from eco_ray.resources import resolve_resource, resource_names, resource_path

BACKBONES = ("resnet", "swin")
GATE_INPUTS = ("stride32", "levels")


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

    def validate(self) -> None:
        if self.gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {self.gate_input!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.hidden_dim % 32:
            raise ValueError(f"hidden_dim must be a multiple of 32 (GroupNorm groups), got {self.hidden_dim}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        if not self.exits or sorted(set(self.exits)) != list(self.exits):
            raise ValueError(f"exits must be a non-empty increasing list, got {self.exits}")
        if self.exits[0] < 1 or self.exits[-1] > self.encoder_layers:
            raise ValueError(f"exits must lie in 1..encoder_layers={self.encoder_layers}, got {self.exits}")
        if self.decoder_layers < 2:
            raise ValueError("decoder_layers must be >= 2 (transformers runs decoder_layers - 1 layers)")
        if self.backbone == "resnet" and len(self.backbone_hidden_sizes) != len(self.backbone_depths):
            raise ValueError("backbone_hidden_sizes and backbone_depths must have one entry per stage")
        if self.num_labels < 1 or self.num_queries < 1 or self.image_size < 32:
            raise ValueError("num_labels and num_queries must be >= 1 and image_size >= 32")

    def to_hf(self) -> Mask2FormerConfig:
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


def preset_names() -> list[str]:
    return resource_names("models")


def preset_path(name: str) -> Path:
    return resource_path("models", name)


def load_model_config(name_or_path: str | Path, overrides=()) -> ModelConfig:
    """A preset name (``tiny``, ``small``, ``swin-t``) or a YAML path, plus ``key=value`` overrides."""
    try:
        path = resolve_resource("models", name_or_path)
    except ConfigError:
        raise ConfigError(f"unknown model config {str(name_or_path)!r}: not a file and not one of "
                          f"{preset_names()}") from None
    return load_config(ModelConfig, path, overrides)
