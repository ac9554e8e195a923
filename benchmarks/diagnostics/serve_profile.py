"""Where a Segmenter replica's time goes: one batch of the serving hot path (Engine.respond), in process, no
HTTP, split into its parts, gated vs. forced full depth, same images, interleaved, on this machine.

    python benchmarks/diagnostics/serve_profile.py --parent models:/eco-parent/latest \
        --gate models:/eco-gate@production --data-root runs/data [--batch 8] [--repeats 10] [--json]

Parts: input (decode + resize + normalise), backbone, encoder layers, heads (FPN + masked-attention decoder,
called once per distinct exit in the batch), post-processing (panoptic inference), encoding (segments,
bbox, PNG id map). Each part is timed by wrapping the engine's own methods, so the path is the real one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


class Timers:
    def __init__(self):
        self.ms = defaultdict(float)
        self.calls = defaultdict(int)

    def wrap(self, obj, name: str, label: str):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.ms[label] += (time.perf_counter() - t0) * 1e3
                self.calls[label] += 1

        setattr(obj, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parent", default="models:/eco-parent/latest")
    p.add_argument("--gate", default="models:/eco-gate@production")
    p.add_argument("--data-root", default="runs/data")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a replica uses 1)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import torch

    import eco_ray.serve.engine as engine_mod
    from eco_ray.serve.engine import RequestControl, decode_image, load_engine
    from eco_ray.tracking import default_tracking_uri

    torch.set_num_threads(args.threads)
    engine, _ = load_engine(args.parent, args.gate, args.tracking_uri or default_tracking_uri("runs"))
    files = sorted((Path(args.data_root) / "val").glob("*.png"))[: args.batch * args.repeats]
    bodies = [f.read_bytes() for f in files]
    deepest = engine.exits[-1]

    t = Timers()
    t.wrap(engine.parent, "backbone_features", "backbone")
    t.wrap(engine.parent, "encoder_layer", "encoder layers")
    t.wrap(engine.parent, "heads", "heads (FPN + decoder)")
    t.wrap(engine_mod, "to_panoptic", "post-processing")
    t.wrap(engine_mod, "encode_panoptic", "encoding (PNG id map)")
    modes = {"gated": RequestControl(), "full_depth": RequestControl(exit=deepest)}
    per_mode = {m: defaultdict(list) for m in modes}
    exits_used = {m: [] for m in modes}
    for r in range(args.repeats):
        batch = bodies[r * args.batch:(r + 1) * args.batch]
        for mode, budget in modes.items():  # interleaved: drift hits both modes alike
            t.ms.clear()
            t.calls.clear()
            t0 = time.perf_counter()
            images = [decode_image(b, "image/png", engine_mod.Limits()) for b in batch]
            decode_ms = (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            res = engine.respond(images, [budget] * len(images), [{"mask_format": "png"}] * len(images))
            total = (time.perf_counter() - t1) * 1e3 + decode_ms
            parts = dict(t.ms)
            parts["input (decode)"] = decode_ms
            parts["other (resize, gate, glue)"] = total - sum(parts.values())
            parts["total"] = total
            for k, v in parts.items():
                per_mode[mode][k].append(v)
            per_mode[mode]["heads calls"].append(t.calls["heads (FPN + decoder)"])
            exits_used[mode] += [x["exit"] for x in res]
    out = {"benchmark": "serve_profile", "machine": f"{platform.machine()} {platform.processor()}".strip(),
           "threads": args.threads, "batch": args.batch, "repeats": args.repeats,
           "parent": engine.versions.get("parent"), "gate": engine.versions.get("gate"),
           "encoder_gflops_per_exit": engine.gflops,
           "median_ms_per_batch": {m: {k: statistics.median(v) for k, v in d.items()} for m, d in per_mode.items()},
           "exits_used": {m: {int(k): int(c) for k, c in zip(*np.unique(v, return_counts=True))}
                          for m, v in exits_used.items()}}
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return
    g, f = out["median_ms_per_batch"]["gated"], out["median_ms_per_batch"]["full_depth"]
    print(f"serving hot path, batch {args.batch}, {args.threads} thread(s), {out['machine']}; median ms per batch "
          f"over {args.repeats} batches")
    print(f"{'part':>28} {'gated':>8} {'full':>8}")
    for k in f:
        print(f"{k:>28} {g.get(k, 0):>8.1f} {f[k]:>8.1f}")
    print(f"exits used: gated {out['exits_used']['gated']}, full {out['exits_used']['full_depth']}")


if __name__ == "__main__":
    main()
