"""Benchmark: every exit from ONE multi-exit pass vs. one separate forward per exit, same batch, one run.

    python benchmarks/multi_exit.py [--model small] [--batch 8] [--repeats 10] [--json]

Prints the median wall time of both on this machine, their ratio, and the counted-GFLOPs ratio.
Target (issue 3): the one pass costs at most 0.5x the separate forwards on the `small` config.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from eco_ray.model.config import load_model_config
from eco_ray.model.cost import count_exit_gflops
from eco_ray.model.early_exit import EarlyExitMask2Former


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def run(model_name: str, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = EarlyExitMask2Former(load_model_config(model_name)).eval()
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size)
    # interleave the two so that machine noise hits both alike
    one_pass, separate = [], []
    for _ in range(repeats):
        one_pass.append(median_ms(lambda: model.forward_exits(x), 1, warmup=1 if not one_pass else 0))
        separate.append(median_ms(lambda: [model(x, exit=k) for k in model.exits], 1, warmup=1 if not separate else 0))
    flops = count_exit_gflops(model, size)
    layers, stem, head = flops["encoder_layer_gflops"], flops["backbone_gflops"], flops["head_gflops"]
    g_one = stem + sum(layers[: model.exits[-1]]) + head * len(model.exits)
    g_sep = sum(stem + sum(layers[:k]) + head for k in model.exits)
    return {
        "benchmark": "multi_exit", "model": model_name, "image_size": size, "batch": batch, "repeats": repeats,
        "exits": model.exits, "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "threads": torch.get_num_threads(),
        "one_pass_ms": statistics.median(one_pass), "separate_ms": statistics.median(separate),
        "time_ratio": statistics.median(one_pass) / statistics.median(separate),
        "one_pass_gflops_per_image": g_one, "separate_gflops_per_image": g_sep, "gflops_ratio": g_one / g_sep,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = run(args.model, args.batch, args.repeats)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{r['model']} config, batch {r['batch']} of {r['image_size']}px, exits {r['exits']}, "
          f"{r['machine']}, {r['threads']} threads, median of {r['repeats']}")
    print(f"  one multi-exit pass      {r['one_pass_ms']:9.1f} ms   {r['one_pass_gflops_per_image']:.4f} GFLOPs/image")
    print(f"  {len(r['exits'])} separate forwards      {r['separate_ms']:9.1f} ms   "
          f"{r['separate_gflops_per_image']:.4f} GFLOPs/image")
    print(f"  ratio (one pass / separate): time {r['time_ratio']:.3f}, GFLOPs {r['gflops_ratio']:.3f}  (target <= 0.5)")


if __name__ == "__main__":
    main()
