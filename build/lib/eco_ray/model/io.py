"""Weights on disk: safetensors plus a JSON config. Loading never unpickles anything."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

from eco_ray.errors import EcoRayError
from eco_ray.model.config import ModelConfig
from eco_ray.model.early_exit import EarlyExitMask2Former
from eco_ray.model.gates import build_gate

WEIGHTS = "model.safetensors"
CONFIG = "eco_config.json"


class ModelFileError(EcoRayError):
    """A model directory that is missing, incomplete or does not match its config."""


def save_parent(model: EarlyExitMask2Former, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``eco_config.json`` (the ModelConfig plus ``extra``, e.g. categories)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS))
    # the transformers config is stored too: a parent started from a pretrained checkpoint may have an
    # architecture that ModelConfig's fields alone do not describe
    meta = {"type": "parent", "model": asdict(model.config), "hf_config": model.m2f.config.to_dict(), **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2))
    return directory


def load_parent(directory: str | Path) -> tuple[EarlyExitMask2Former, dict]:
    """-> (model in eval mode, the whole JSON config)."""
    meta = _read_config(directory, "parent")
    m2f = Mask2FormerForUniversalSegmentation(Mask2FormerConfig.from_dict(meta["hf_config"]))
    model = EarlyExitMask2Former(ModelConfig(**meta["model"]), m2f)
    _load_weights(model, directory)
    return model.eval(), meta


def read_parent_blob(directory: str | Path) -> dict:
    """A parent as plain bytes + config, to ship through Ray's object store to workers on other nodes
    (which need no shared file system or MLflow access for the model)."""
    meta = _read_config(directory, "parent")
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise ModelFileError(f"weights not found: {path}")
    return {"meta": meta, "weights": path.read_bytes()}


def parent_from_blob(blob: dict) -> EarlyExitMask2Former:
    """The inverse of :func:`read_parent_blob` (safetensors bytes: nothing is unpickled)."""
    import tempfile

    meta = blob["meta"]
    m2f = Mask2FormerForUniversalSegmentation(Mask2FormerConfig.from_dict(meta["hf_config"]))
    model = EarlyExitMask2Former(ModelConfig(**meta["model"]), m2f)
    with tempfile.TemporaryDirectory() as d:  # safetensors' load_model restores tensors save_model de-duplicated
        Path(d, WEIGHTS).write_bytes(blob["weights"])
        _load_weights(model, d)
    return model.eval()


def build_parent(config: ModelConfig) -> EarlyExitMask2Former:
    """A new parent: from ``config.pretrained`` (a local transformers directory) when set, else random init."""
    return parent_from_pretrained(config.pretrained, config) if config.pretrained else EarlyExitMask2Former(config)


def parent_from_pretrained(path: str | Path, config: ModelConfig) -> EarlyExitMask2Former:
    """Start from a user's local transformers Mask2Former directory (``save_pretrained`` layout).

    Architecture fields of ``config`` are taken from the checkpoint; ``exits`` and ``num_labels`` from
    ``config`` (a different number of labels re-initialises the class head). Nothing is downloaded."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFileError(f"{path} is not a transformers model directory (no config.json)")
    m2f = Mask2FormerForUniversalSegmentation.from_pretrained(
        str(path), local_files_only=True, use_safetensors=True, num_labels=config.num_labels,
        id2label={i: str(i) for i in range(config.num_labels)}, label2id={str(i): i for i in range(config.num_labels)},
        ignore_mismatched_sizes=True)
    hf = m2f.config
    merged = ModelConfig(**{**asdict(config), "hidden_dim": hf.hidden_dim, "encoder_layers": hf.encoder_layers,
                            "encoder_ffn": hf.encoder_feedforward_dim, "num_heads": hf.num_attention_heads,
                            "decoder_layers": hf.decoder_layers, "decoder_ffn": hf.dim_feedforward,
                            "num_queries": hf.num_queries, "train_num_points": hf.train_num_points,
                            "backbone": hf.backbone_config.model_type if hf.backbone_config.model_type in
                            ("resnet", "swin") else config.backbone, "pretrained": str(path)})
    return EarlyExitMask2Former(merged, m2f)


def save_gate(gate: nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(gate, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps({"type": "gate", "gate": gate.spec(), **(extra or {})}, indent=2))
    return directory


def load_gate(directory: str | Path) -> tuple[nn.Module, dict]:
    meta = _read_config(directory, "gate")
    gate = build_gate(meta["gate"])
    _load_weights(gate, directory)
    return gate.eval(), meta


def _read_config(directory: str | Path, kind: str) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise ModelFileError(f"no {CONFIG} in {directory}: not an eco-ray {kind} directory")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if meta.get("type") != kind:
        raise ModelFileError(f"{path} describes a {meta.get('type')!r}, expected a {kind!r}")
    return meta


def _load_weights(module: nn.Module, directory: str | Path) -> None:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise ModelFileError(f"weights not found: {path}")
    try:
        load_model(module, str(path), strict=True)
    except (RuntimeError, OSError) as e:
        raise ModelFileError(f"{path} does not match its config: {str(e).splitlines()[0]}") from None
