"""Weights on disk: safetensors plus a JSON config. Loading never unpickles anything."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn
from transformers import (
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
)

from eco_ray.errors import EcoRayError
from eco_ray.model.config import DetectionModelConfig, ModelConfig
from eco_ray.model.early_exit import EarlyExitMask2Former
from eco_ray.model.early_exit_detr import EarlyExitDeformableDetr
from eco_ray.model.exits import EarlyExitModel
from eco_ray.model.gates import build_gate

WEIGHTS = "model.safetensors"
CONFIG = "eco_config.json"

# per task: (our config, the transformers config and model, the early-exit wrapper); a parent's JSON config
# names its task (one written before the detector existed names none: panoptic)
_KINDS = {
    "panoptic": (ModelConfig, Mask2FormerConfig, Mask2FormerForUniversalSegmentation, EarlyExitMask2Former),
    "detection": (DetectionModelConfig, DeformableDetrConfig, DeformableDetrForObjectDetection,
                  EarlyExitDeformableDetr),
}


def task_of(config) -> str:
    return "detection" if isinstance(config, DetectionModelConfig) else "panoptic"


def _hf_model(model: EarlyExitModel) -> nn.Module:
    return model.detr if isinstance(model, EarlyExitDeformableDetr) else model.m2f


def _from_meta(meta: dict) -> EarlyExitModel:
    task = meta.get("task", "panoptic")
    if task not in _KINDS:
        raise ModelFileError(f"a parent of unknown task {task!r} (known: {', '.join(_KINDS)})")
    ours, hf_config, hf_model, wrapper = _KINDS[task]
    return wrapper(ours(**meta["model"]), hf_model(hf_config.from_dict(meta["hf_config"])))


class ModelFileError(EcoRayError):
    """A model directory that is missing, incomplete or does not match its config."""


def save_parent(model: EarlyExitModel, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``eco_config.json`` (the task, its model config plus ``extra``, e.g.
    categories)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS))
    # the transformers config is stored too: a parent started from a pretrained checkpoint may have an
    # architecture that ModelConfig's fields alone do not describe
    meta = {"type": "parent", "task": task_of(model.config), "model": asdict(model.config),
            "hf_config": _hf_model(model).config.to_dict(), **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2))
    return directory


def _check_task(meta: dict, task: str | None, directory) -> None:
    have = meta.get("task", "panoptic")
    if task is not None and have != task:
        raise ModelFileError(f"{directory} holds a {have} parent; this takes a {task} parent")


def load_parent(directory: str | Path, task: str | None = "panoptic") -> tuple[EarlyExitModel, dict]:
    """-> (model in eval mode, the whole JSON config). ``task``: the task the caller serves (None: any); a
    parent of another task is a ModelFileError that says so."""
    meta = _read_config(directory, "parent")
    _check_task(meta, task, directory)
    model = _from_meta(meta)
    _load_weights(model, directory)
    return model.eval(), meta


def parent_task(directory: str | Path) -> str:
    """The task of the parent in ``directory`` (``panoptic`` or ``detection``), from its config alone."""
    return _read_config(directory, "parent").get("task", "panoptic")


def read_parent_blob(directory: str | Path, task: str | None = "panoptic") -> dict:
    """A parent as plain bytes + config, to ship through Ray's object store to workers on other nodes
    (which need no shared file system or MLflow access for the model); ``task`` as for :func:`load_parent`."""
    meta = _read_config(directory, "parent")
    _check_task(meta, task, directory)
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise ModelFileError(f"weights not found: {path}")
    return {"meta": meta, "weights": path.read_bytes()}


def parent_from_blob(blob: dict) -> EarlyExitModel:
    """The inverse of :func:`read_parent_blob` (safetensors bytes: nothing is unpickled)."""
    import tempfile

    model = _from_meta(blob["meta"])
    with tempfile.TemporaryDirectory() as d:  # safetensors' load_model restores tensors save_model de-duplicated
        Path(d, WEIGHTS).write_bytes(blob["weights"])
        _load_weights(model, d)
    return model.eval()


def build_parent(config: ModelConfig | DetectionModelConfig) -> EarlyExitModel:
    """A new parent of the config's task: from ``config.pretrained`` (a local transformers directory) when set,
    else random init."""
    if config.pretrained:
        return parent_from_pretrained(config.pretrained, config)
    return _KINDS[task_of(config)][3](config)


def parent_from_pretrained(path: str | Path, config: ModelConfig | DetectionModelConfig) -> EarlyExitModel:
    """Start from a user's local transformers Mask2Former (or, for a detection config, Deformable DETR)
    directory (``save_pretrained`` layout).

    Architecture fields of ``config`` are taken from the checkpoint; ``exits`` and ``num_labels`` from
    ``config`` (a different number of labels re-initialises the class head). Nothing is downloaded."""
    path = Path(path)
    check_pretrained(path, task_of(config))
    if isinstance(config, DetectionModelConfig):
        return _detector_from_pretrained(path, config)
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


def check_pretrained(path: str | Path, task: str = "panoptic") -> None:
    """A local transformers directory that can start a parent of ``task``: a ModelFileError naming what is
    wrong otherwise (read from its config.json, before any weights load)."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path} is not a transformers model directory (no config.json); nothing is "
                             f"downloaded") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path / 'config.json'}: cannot read it ({e})") from None
    want = "deformable_detr" if task == "detection" else "mask2former"
    if hf.get("model_type") != want:
        raise ModelFileError(f"{path} holds a {hf.get('model_type')!r} model; a {task} parent starts from a "
                             f"{want!r} one")
    if task == "detection" and (hf.get("two_stage") or hf.get("num_feature_levels", 4) != 4):
        raise ModelFileError(f"{path}: a two-stage Deformable DETR or one without 4 feature levels cannot have "
                             f"early exits here (docs/model.md)")


def _detector_from_pretrained(path: Path, config: DetectionModelConfig) -> EarlyExitDeformableDetr:
    labels = {"num_labels": config.num_labels, "id2label": {i: str(i) for i in range(config.num_labels)},
              "label2id": {str(i): i for i in range(config.num_labels)}}
    try:
        detr = DeformableDetrForObjectDetection.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                                ignore_mismatched_sizes=True, **labels)
    except (ImportError, OSError, ValueError) as e:  # e.g. a timm backbone, and timm is not installed
        raise ModelFileError(f"{path}: cannot load it as a Deformable DETR ({str(e).splitlines()[0]})") from None
    hf = detr.config
    merged = DetectionModelConfig(**{**asdict(config), "hidden_dim": hf.d_model, "encoder_layers": hf.encoder_layers,
                                     "encoder_ffn": hf.encoder_ffn_dim, "num_heads": hf.encoder_attention_heads,
                                     "encoder_points": hf.encoder_n_points, "decoder_layers": hf.decoder_layers,
                                     "decoder_ffn": hf.decoder_ffn_dim, "decoder_points": hf.decoder_n_points,
                                     "num_queries": hf.num_queries, "with_box_refine": hf.with_box_refine,
                                     "pretrained": str(path)})
    return EarlyExitDeformableDetr(merged, detr)


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
