"""Measured cost of every exit of an early-exit model: GFLOPs (counted) and latency (timed) on this machine.

GFLOPs are counted with torch's FlopCounterMode on the real forward, component by component
(backbone + input projections, each encoder layer, the heads: FPN + decoder + class and mask heads for the
segmenter, decoder + class and box heads for the detector), and reported in the
convention of fvcore, which the paper used: one multiply-accumulate = one FLOP. Counted: matrix
multiplications, linear layers, convolutions, attention. Not counted: the deformable sampling itself
(grid_sample), normalisations, activations and element-wise work, as in the paper.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from eco_ray.model.exits import EarlyExitModel
from eco_ray.model.io import task_of


def _gflops(fn) -> tuple[float, object]:
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops() / 2e9, result  # torch counts 2 per multiply-accumulate


@torch.no_grad()
def count_exit_gflops(model: EarlyExitModel, height: int, width: int | None = None) -> dict:
    """GFLOPs per image of each component at one input size, and per exit."""
    model.eval()
    x = torch.zeros(1, 3, height, width or height, device=next(model.parameters()).device)
    stem, (features, inputs) = _gflops(lambda: (f := model.backbone_features(x), model.encoder_inputs(f)))
    hidden, layers = inputs.embeds, []
    for i in range(model.config.encoder_layers):
        g, hidden = _gflops(lambda i=i, h=hidden: model.encoder_layer(i, h, inputs))
        layers.append(g)
    head, _ = _gflops(lambda: model.heads(features, hidden, inputs))
    exits = [{"exit": k, "encoder_gflops": sum(layers[:k]), "total_gflops": stem + sum(layers[:k]) + head}
             for k in model.exits]
    return {"backbone_gflops": stem, "encoder_layer_gflops": layers, "head_gflops": head, "exits": exits}


@torch.no_grad()
def time_exits(model: EarlyExitModel, image_size: int, batch_sizes: Sequence[int] = (1, 8),
               repeats: int = 20, warmup: int = 3) -> dict[int, dict[int, float]]:
    """Median wall time in ms of ``forward(x, exit=k)`` per batch size and exit, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result: dict[int, dict[int, float]] = {}
    for b in batch_sizes:
        x = torch.randn(b, 3, image_size, image_size, device=device)
        result[b] = {}
        for k in model.exits:
            for _ in range(warmup):
                model(x, exit=k)
            times = []
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                model(x, exit=k)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
            result[b][k] = statistics.median(times)
    return result


def exit_cost_table(model: EarlyExitModel, image_size: int | None = None, batch_sizes=(1, 8),
                    repeats: int = 20, measure_latency: bool = True, width: int | None = None) -> dict:
    """The cost JSON other tools read: ``{"model", "image_size", "exits": [{exit, encoder_gflops,
    total_gflops, latency_ms, ...}], ...}``; ``latency_ms`` is at batch 1. ``width`` (GFLOPs only) counts
    a non-square input of image_size x width."""
    size = image_size or model.config.image_size
    if width is not None and width != size:
        measure_latency = False
    flops = count_exit_gflops(model, size, width)
    latency = time_exits(model, size, batch_sizes, repeats) if measure_latency else {}
    exits = []
    for row in flops["exits"]:
        k = row["exit"]
        entry = {**row, "encoder_share": row["encoder_gflops"] / row["total_gflops"]}
        if latency:
            entry["latency_ms"] = latency[batch_sizes[0]][k]
            for b in batch_sizes:
                entry[f"latency_ms_batch{b}"] = latency[b][k]
        exits.append(entry)
    return {
        "model": model.config.name, "task": task_of(model.config),
        "head": "decoder + heads" if task_of(model.config) == "detection" else "FPN + decoder + heads",
        "image_size": size if width in (None, size) else [size, width], "exits": exits,
        "backbone_gflops": flops["backbone_gflops"], "head_gflops": flops["head_gflops"],
        "encoder_layer_gflops": flops["encoder_layer_gflops"],
        "gflops_convention": "fvcore (1 multiply-accumulate = 1 FLOP); deformable sampling not counted",
        "latency": {"batch_sizes": list(batch_sizes), "repeats": repeats, "statistic": "median",
                    "device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
                    "machine": platform.processor() or platform.machine()}
        if latency else None,
    }
