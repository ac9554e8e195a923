"""The method at a larger scale on one GPU, in one go, without Ray, MLflow or Optuna:

    generate data -> Step A (the plain training loop, bf16 autocast) -> Step B (the same Parquet table)
    -> diagnose -> Step C (gate fits and their exact evaluation) -> report.json

It imports only torch, transformers, numpy, pyarrow, pillow and the project's pure modules, so that it runs
on a GPU machine that has none of the cluster stack (and no network to install it). The same script runs on
a CPU at a toy size (the test suite does). Every figure in its report is measured in the run that wrote it.

    PYTHONPATH=. python benchmarks/gpu/run.py --out OUT                       # GPU defaults (about 10 min)
    PYTHONPATH=. python benchmarks/gpu/run.py --out OUT --preset toy          # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

PRESETS = {
    # a ResNet-18-like backbone at 384 px: a stride-32 grid of 12 x 12 tokens, which two encoder layers with
    # 4 sampling points per level do not cover
    "gpu": {"size": 384, "train": 6000, "val": 1000, "derive_train": 2000, "model": "small",
            "model_overrides": {"backbone_hidden_sizes": [64, 128, 256, 512], "backbone_depths": [2, 2, 2, 2],
                                "backbone_embed": 64, "hidden_dim": 128, "encoder_ffn": 512, "num_heads": 8,
                                "decoder_ffn": 512, "num_queries": 50, "decoder_layers": 4, "train_num_points": 4096},
            "batch": 32, "train_minutes": 6.0, "steps": 100000, "lr": 1e-3, "eval_batch": 32, "workers": 12},
    "toy": {"size": 64, "train": 48, "val": 16, "derive_train": 32, "model": "tiny", "model_overrides": {},
            "batch": 4, "train_minutes": 5.0, "steps": 4, "lr": 1e-3, "eval_batch": 8, "workers": 2},
}


def model_config(preset: str, overrides: dict):
    """A shipped model preset plus overrides, read with PyYAML (OmegaConf may be missing on a GPU machine)."""
    import yaml

    from eco_ray.model.config import ModelConfig, preset_path

    cfg = ModelConfig(**{**yaml.safe_load(preset_path(preset).read_text()), **overrides})
    cfg.validate()
    return cfg


def log(msg: str) -> None:
    print(f"[gpu-run] {msg}", flush=True)


def machine() -> dict:
    out = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def loader(dataset, batch: int, size: int, seed: int, workers: int):
    """Endless shuffled training batches with the project's own train transform, loaded by worker processes."""
    from eco_ray.data.collate import collate_panoptic
    from eco_ray.data.transforms import build_transform

    transform = build_transform(size, train=True)

    class _Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            # torch seeds each loader worker from the loader's generator: a new, reproducible draw per epoch
            return transform(dataset[i], np.random.default_rng([torch.initial_seed() % 2**32, i]))

    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        dl = torch.utils.data.DataLoader(_Samples(), batch_size=batch, shuffle=True, drop_last=True, generator=g,
                                         num_workers=workers, persistent_workers=False,
                                         collate_fn=lambda s: collate_panoptic(s, dataset.categories))
        yield from dl
        epoch += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where data, the parent, the table and report.json go")
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto")
    p.add_argument("--train-minutes", type=float, help="Step A's time budget (the preset's by default)")
    p.add_argument("--steps", type=int, help="Step A's step cap (the preset's by default)")
    p.add_argument("--exits", default="0,1,2,3,4,5,6", help="exits of the parent (default 0..6)")
    p.add_argument("--kind-mix", default="clean:0.5,relational:0.5", help="the generator's kind mix")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = dict(PRESETS[args.preset])
    cfg["train_minutes"] = args.train_minutes or cfg["train_minutes"]
    cfg["steps"] = args.steps or cfg["steps"]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    bf16 = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- data
    from eco_ray.data import CocoPanopticDataset
    from eco_ray.data.synth import SynthConfig, write_dataset

    t = time.perf_counter()
    mix = {k: float(v) for k, v in (item.split(":") for item in args.kind_mix.split(","))}
    synth = SynthConfig(size=cfg["size"], seed=args.seed, kind_mix=mix)
    if not (out / "data" / "annotations" / "panoptic_val.json").is_file():
        write_dataset(out / "data", synth, {"train": cfg["train"], "val": cfg["val"]}, workers=cfg["workers"],
                      instances=False)
    train_ds, val_ds = (CocoPanopticDataset.from_root(out / "data", s) for s in ("train", "val"))
    timings["data_s"] = time.perf_counter() - t
    log(f"data: {len(train_ds)} train / {len(val_ds)} val images at {cfg['size']} px in {timings['data_s']:.0f} s")

    # ---------------------------------------------------------------------------------------- Step A
    from eco_ray.model.early_exit import EarlyExitMask2Former
    from eco_ray.model.io import save_parent
    from eco_ray.train.loop import ExitSchedule, lr_factor, make_optimizer, train_step

    exits = [int(k) for k in args.exits.split(",")]
    model_cfg = model_config(cfg["model"], {**cfg["model_overrides"], "image_size": cfg["size"],
                                            "num_labels": len(train_ds.categories), "exits": exits})
    torch.manual_seed(args.seed)
    model = EarlyExitMask2Former(model_cfg).to(device)
    schedule = ExitSchedule(model.exits, "deepest_plus_one", "depth_plus_one" if exits[0] == 0 else "depth",
                            args.seed)
    optimizer = make_optimizer(model, cfg["lr"], 0.05)
    batches = loader(train_ds, cfg["batch"], cfg["size"], args.seed, cfg["workers"] if device.type == "cuda" else 0)
    t = time.perf_counter()
    deadline = t + 60 * cfg["train_minutes"]
    warmup, planned = 200, cfg["steps"]
    step, losses = 0, []
    while step < cfg["steps"] and time.perf_counter() < deadline:
        for group in optimizer.param_groups:  # cosine over the steps the budget allows so far
            group["lr"] = cfg["lr"] * lr_factor(step, min(warmup, max(1, planned // 10)), planned)
        model.train()
        m = train_step(model, model, optimizer, next(batches), schedule.exits_for_step(step), schedule, 1.0, device,
                       autocast=bf16)
        losses.append(m["loss"])
        step += 1
        if step == 20 and cfg["steps"] > 1000:  # re-plan the schedule's length from the measured step time
            rate = step / (time.perf_counter() - t)
            planned = int(rate * 60 * cfg["train_minutes"])
            log(f"Step A: {rate:.2f} steps/s: planning {planned} steps")
        if step % 200 == 0:
            log(f"Step A: step {step}/{planned}, loss {np.mean(losses[-50:]):.3f}")
    timings["train_s"] = time.perf_counter() - t
    model.eval()
    save_parent(model.cpu(), out / "parent", extra={"categories": train_ds.categories.to_coco(), "steps": step})
    model.to(device)
    log(f"Step A: {step} steps in {timings['train_s']:.0f} s")

    # ---------------------------------------------------------------------------------------- Step B
    from eco_ray.derive.table import DerivedDataset, DerivedSplit, write_manifest, write_split
    from eco_ray.evaluate import evaluate_exits
    from eco_ray.metrics.panoptic import PanopticStats
    from eco_ray.model.cost import exit_cost_table

    t = time.perf_counter()
    derived = out / "derived"
    derived.mkdir(exist_ok=True)
    summary_splits = {}
    for split, ds, n in (("train", train_ds, cfg["derive_train"]), ("val", val_ds, len(val_ds))):
        idx = list(range(min(n, len(ds))))
        views = [evaluate_exits(model, ds, indices=idx, batch_size=cfg["eval_batch"], flip=f, autocast=bf16)
                 for f in (False, True)]
        stats = PanopticStats(**{k: np.stack([getattr(v.stats, k) for v in views], 1) for k in views[0].stats.as_dict()})
        table = DerivedSplit(split, views[0].image_ids.astype(np.int64), views[0].exits, ["plain", "flip"], stats,
                             views[0].gate_features, np.asarray([m.get("eco_kind", "") for m in views[0].meta], object),
                             np.asarray([int(m.get("eco_num_objects", -1)) for m in views[0].meta], np.int64))
        write_split(derived, table)
        summary_splits[split] = {"images": len(table)}
    costs = exit_cost_table(model, repeats=10)
    write_manifest(derived, {"key": f"gpu-run-{args.seed}", "parent": {"uri": str(out / "parent")},
                             "data": {"root": str(out / "data")}, "exits": model.exits, "views": ["plain", "flip"],
                             "categories": train_ds.categories.to_coco(), "gate_input": model_cfg.gate_input,
                             "costs": costs, "splits": summary_splits, "config": {"sufficient_tolerance": 0.02}})
    timings["derive_s"] = time.perf_counter() - t
    log(f"Step B: {sum(s['images'] for s in summary_splits.values())} images x 2 views x {len(model.exits)} exits in "
        f"{timings['derive_s']:.0f} s")

    # ------------------------------------------------------------------------------- diagnose, Step C
    from eco_ray.diagnose import diagnose
    from eco_ray.gate.config import GateConfig
    from eco_ray.gate.evaluate import fit_and_evaluate

    t = time.perf_counter()
    ds = DerivedDataset.open(derived)
    d = diagnose(ds.split("val"), ds.categories, ds.costs("gflops"), probe_split=ds.split("train"))
    gates = {}
    for kind in ("classify", "quality"):
        fit = fit_and_evaluate(ds, GateConfig(kind=kind), [0.02, 0.1, 0.3], holdout=0.25)
        gates[kind] = [{"beta": e.beta, "val": e.gate.to_json(), "held_out": e.holdout_gate.to_json()}
                       for e in fit.evaluations]
    static = [p.to_json() for p in fit.static]
    timings["gates_s"] = time.perf_counter() - t
    report = {"machine": machine(), "preset": args.preset, "config": {**cfg, "exits": exits, "kind_mix": mix,
                                                                       "synth": asdict(synth), "device": str(device),
                                                                       "bf16": bf16},
              "parent": {"steps": step, "final_loss": float(np.mean(losses[-50:])) if losses else math.nan,
                         "parameters": sum(p.numel() for p in model.parameters())},
              "costs": costs, "static": static, "diagnose": d.to_json(), "gates": gates,
              "timings": {**{k: round(v, 1) for k, v in timings.items()},
                          "total_s": round(time.perf_counter() - t_all, 1)}}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    best = d.cross_view_oracle_lead
    per_exit = " ".join(f"{p['exit']}:{p['pq']:.3f}" for p in static)
    log(f"static PQ per exit: {per_exit}")
    log(f"verdict {d.verdict}: cross-view oracle lead {best.lead:+.4f} [{best.lead_ci95[0]:+.4f}, "
        f"{best.lead_ci95[1]:+.4f}]; wrote {out / 'report.json'} in {report['timings']['total_s']:.0f} s")


if __name__ == "__main__":
    main()
