"""The ``eco-ray`` command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from eco_ray.config import ConfigError, load_config
from eco_ray.pipeline import STAGES as PIPELINE_STAGES


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=float))


# ------------------------------------------------------------------------------------------------- data
def cmd_data_synth(args) -> int:
    from eco_ray.data.synth import SynthConfig, ensure_dataset

    overrides = list(args.set)
    if args.size is not None:
        overrides.append(f"size={args.size}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(SynthConfig, args.config, overrides)

    def progress(split, done, total):
        print(f"  {split}: {done}/{total} images", file=sys.stderr, flush=True)

    summary, reused = ensure_dataset(args.out, cfg, {"train": args.train, "val": args.val}, overwrite=args.overwrite,
                                     workers=args.workers, progress=progress)
    if reused:
        print(f"{args.out} already holds this dataset (same settings): reusing it")
        return 0
    if args.json:
        _print_json(summary)
    else:
        print(f"wrote {args.out} in {summary['seconds']} s ({summary['disk_bytes'] / 1e6:.1f} MB)")
        for split, s in summary["splits"].items():
            print(f"  {split}: {s['images']} images; kinds {s['kinds']}; objects per image {s['objects_per_image']}")
    return 0


def cmd_data_check(args) -> int:
    from eco_ray.data import CocoPanopticDataset

    ds = CocoPanopticDataset.from_root(args.root, args.split)
    problems = ds.validate()
    for p in problems:
        print(p)
    print(f"{len(ds)} images checked, {len(problems)} with problems")
    return 1 if problems else 0


def cmd_data_report(args) -> int:
    """Describe a dataset and prove the metrics pipeline on it: ground truth scored against itself."""
    from eco_ray.data import CocoPanopticDataset
    from eco_ray.data.synth import describe
    from eco_ray.metrics import PanopticStats, aggregate, image_stats

    report = {"root": str(args.root), "splits": {}}
    for split in args.splits.split(","):
        t0 = time.perf_counter()
        ds = CocoPanopticDataset.from_root(args.root, split)
        stats = []
        for i in range(len(ds)):
            s = ds[i]
            stats.append(image_stats(s.id_map, s.segments, s.id_map, s.segments, ds.categories))
        self_pq = aggregate(PanopticStats.stack(stats), ds.categories).summary() if stats else {}
        desc = describe([ds.image_meta(i) for i in range(len(ds))])
        desc["self_check"] = {k: self_pq[k] for k in ("pq", "pq_things", "pq_stuff", "miou")} if self_pq else {}
        desc["seconds"] = round(time.perf_counter() - t0, 2)
        report["splits"][split] = desc
    report["categories"] = [{"id": c.id, "name": c.name, "isthing": c.isthing} for c in ds.categories.categories]
    if args.json:
        _print_json(report)
        return 0
    print(f"dataset {args.root}")
    print("categories: " + ", ".join(f"{c['name']}({'thing' if c['isthing'] else 'stuff'})" for c in report["categories"]))
    for split, d in report["splits"].items():
        print(f"[{split}] {d['images']} images, kinds {d['kinds']}")
        print(f"  objects per image: {d['objects_per_image']}")
        if d["self_check"]:
            sc = d["self_check"]
            print(f"  ground truth vs itself: PQ {sc['pq']:.4f} (things {sc['pq_things']:.4f}, "
                  f"stuff {sc['pq_stuff']:.4f}), mIoU {sc['miou']:.4f}  [{d['seconds']} s]")
    return 0


def cmd_data_convert(args) -> int:
    from eco_ray.data.convert import convert_instances_to_panoptic

    stuff = json.loads(Path(args.stuff_categories).read_text()) if args.stuff_categories else []
    doc = convert_instances_to_panoptic(args.instances, args.out_json, args.out_pngs, args.semantic, stuff,
                                        min_visible=args.min_visible)
    n_seg = sum(len(a["segments_info"]) for a in doc["annotations"])
    print(f"wrote {args.out_json}: {len(doc['annotations'])} images, {n_seg} segments; id PNGs in {args.out_pngs}")
    return 0


# ------------------------------------------------------------------------------------------------- cost
def cmd_cost(args) -> int:
    import torch

    from eco_ray.model.config import load_model_config
    from eco_ray.model.cost import exit_cost_table
    from eco_ray.model.early_exit import EarlyExitMask2Former

    cfg = load_model_config(args.model, args.set)
    torch.manual_seed(0)
    model = EarlyExitMask2Former(cfg)
    size = args.image_size or [cfg.image_size]
    table = exit_cost_table(model, size[0], batch_sizes=tuple(args.batch_sizes), repeats=args.repeats,
                            measure_latency=not args.no_latency, width=size[-1])
    if args.json:
        _print_json(table)
        return 0
    h, w = size[0], size[-1]
    print(f"model {table['model']}, input {h}x{w}; GFLOPs per image, "
          f"{table['gflops_convention']}")
    print(f"backbone + input projections {table['backbone_gflops']:.4f}, one encoder layer "
          f"{table['encoder_layer_gflops'][0]:.4f}, FPN + decoder + heads {table['head_gflops']:.4f}")
    lat = table["latency"]
    cols = [f"batch {b} ms" for b in lat["batch_sizes"]] if lat else []
    print(f"{'exit':>4} {'encoder GFLOPs':>15} {'total GFLOPs':>13} {'encoder share':>14}" +
          "".join(f" {c:>12}" for c in cols))
    for e in table["exits"]:
        row = f"{e['exit']:>4} {e['encoder_gflops']:>15.4f} {e['total_gflops']:>13.4f} {e['encoder_share']:>14.1%}"
        if lat:
            row += "".join(f" {e[f'latency_ms_batch{b}']:>12.2f}" for b in lat["batch_sizes"])
        print(row)
    if lat:
        print(f"latency: median of {lat['repeats']} runs, {lat['device']}, {lat['threads']} threads")
    return 0


# ------------------------------------------------------------------------------------------------ train
def cmd_train(args) -> int:
    from eco_ray.train.config import load_train_config
    from eco_ray.train.ray_train import run_training

    if args.resume and (args.config or args.set or args.name):
        raise ConfigError("--resume continues a run with its saved config; do not combine it with --config, --set "
                          "or --name")
    cfg = None if args.resume else load_train_config(args.config, args.set)
    summary = run_training(cfg, name=args.name, resume=args.resume, address=args.address,
                           tracking_uri=args.tracking_uri, run_dir=args.run_dir)
    if args.json:
        _print_json(summary)
        return 0
    print(f"trained {summary['name']}: {summary['steps']} steps in {summary['seconds']:.0f} s")
    print("validation PQ per exit: " + ", ".join(
        f"{k}: {v:.3f}" for k, v in summary["val_pq_per_exit"].items() if v is not None))
    print(f"registered {summary['model_uri']} (MLflow run {summary['run_id']}, {summary['tracking_uri']})")
    return 0


# ----------------------------------------------------------------------------------------------- derive
def cmd_derive(args) -> int:
    from eco_ray.derive.run import DeriveConfig, run_derive

    overrides = list(args.set)
    for key, value in (("parent", args.parent), ("data_root", args.data_root), ("out", args.out),
                       ("run_dir", args.run_dir)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.split:
        overrides.append(f"splits=[{args.split}]")
    if args.max_images is not None:
        overrides.append(f"max_images={args.max_images}")
    cfg = load_config(DeriveConfig, args.config, overrides)
    m = run_derive(cfg, tracking_uri=args.tracking_uri, address=args.address, overwrite=args.overwrite)
    if args.json:
        _print_json(m)
        return 0
    print(f"derived dataset {m['path']} ({'reused' if m['reused'] else 'new'}; key {m['key']}, "
          f"MLflow run {m.get('mlflow_run_id')})")
    print(f"parent {m['parent']['uri']}" + (f" (version {m['parent']['version']})" if m['parent'].get('version') else ""))
    exits = m["exits"]
    for split, s in m["splits"].items():
        print(f"[{split}] {s['images']} images in {m['timings'].get(split, {}).get('seconds', '?')} s")
        print("  static PQ per exit:     " + ", ".join(f"{k}: {s['static'][str(k)]['pq']:.3f}" for k in exits))
        print("  things / stuff at exit {}: {:.3f} / {:.3f}".format(
            exits[-1], s["static"][str(exits[-1])]["pq_things"], s["static"][str(exits[-1])]["pq_stuff"]))
        nf = s["noise_floor"]
        if "mean_abs_diff" in nf:
            print(f"  label noise (plain vs flip, same exit): mean |dq| {nf['mean_abs_diff']:.3f}, "
                  f"{nf['share_above_tolerance']:.0%} of (image, exit) pairs move > {nf['tolerance']}")
        print(f"  shallowest sufficient exit (within {cfg.sufficient_tolerance} of exit {exits[-1]}): "
              f"{s['sufficient_exit_histogram']}")
    costs = m["costs"]["exits"]
    print("encoder GFLOPs per exit: " + ", ".join(f"{c['exit']}: {c['encoder_gflops']:.4f}" for c in costs))
    if "latency_ms" in costs[0]:
        print("latency ms (batch 1):   " + ", ".join(f"{c['exit']}: {c['latency_ms']:.2f}" for c in costs))
    return 0


# ------------------------------------------------------------------------------------------------- gate
def cmd_gate(args) -> int:
    from eco_ray.gate.fit import GateConfig
    from eco_ray.gate.run import run_gate

    overrides = list(args.set)
    for key, value in (("kind", args.kind), ("cost", args.cost)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.beta:
        overrides.append(f"beta={args.beta[0]}")
    cfg = load_config(GateConfig, args.config, overrides)
    summary = run_gate(args.derived, cfg, args.beta, tracking_uri=args.tracking_uri, run_dir=args.run_dir,
                       out=args.out, name=args.name)
    evaluations = summary["evaluations"]
    if args.json:
        _print_json(evaluations[0] if len(evaluations) == 1 else evaluations)
        return 0
    print(f"{cfg.kind} gate, cost {cfg.cost}: fit {summary['fit_seconds']:.2f} s, exact evaluation "
          f"{summary['eval_seconds']:.2f} s; saved in {summary['path']} (MLflow run {summary['run_id']})")
    head = f"{'':>22} {'PQ':>6} {'things':>7} {'stuff':>6} {'GFLOPs':>8} {'p95':>7} {'ms':>6}  exits"
    def row(label, r):
        return (f"{label:>22} {r['pq']:>6.3f} {r['pq_things']:>7.3f} {r['pq_stuff']:>6.3f} "
                f"{r['encoder_gflops_mean']:>8.4f} {r['encoder_gflops_p95']:>7.4f} "
                f"{r.get('latency_ms_mean', float('nan')):>6.2f}  {r['exit_histogram']}")
    print(head)
    for r in evaluations[0]["static"]:
        print(row(f"static exit {r['exit']}", r))
    for ev in evaluations:
        print(row(f"gate beta={ev['beta']:g}", ev["gate"]))
        print(row(f"oracle beta={ev['beta']:g}", ev["oracle"]))
    print(f"trade-off plot: {summary['plot']}")
    return 0


# ------------------------------------------------------------------------------------------------ sweep
def cmd_sweep(args) -> int:
    from eco_ray.sweep.run import SweepConfig, run_sweep

    if args.resume and (args.config or args.set or args.name or args.derived):
        raise ConfigError("--resume continues a sweep with its saved settings; do not combine it with --config, "
                          "--set, --name or --derived")
    cfg = None
    if not args.resume:
        overrides = list(args.set)
        for key, value in (("derived", args.derived), ("space", args.space), ("trials", args.trials),
                           ("concurrency", args.concurrency), ("sampler", args.sampler),
                           ("objective_cost", args.objective), ("max_gflops", args.max_gflops),
                           ("max_latency_ms", args.max_latency_ms), ("storage", args.storage), ("seed", args.seed),
                           ("holdout", args.holdout),
                           ("run_dir", args.run_dir)):
            if value is not None:
                overrides.append(f"{key}={value}")
        cfg = load_config(SweepConfig, args.config, overrides)
    summary = run_sweep(cfg, name=args.name, resume=args.resume, tracking_uri=args.tracking_uri,
                        address=args.address, run_dir=args.run_dir)
    if args.json:
        _print_json({k: v for k, v in summary.items() if k != "trials"})
        return 0
    rate = summary["trials_per_minute"]
    print(f"sweep {summary['name']}: {summary['complete']} complete ({summary['feasible']} within budget), "
          f"{summary['failed']} failed; {summary['trials_run_now']} run now in {summary['seconds']:.0f} s"
          + (f" ({rate:.0f} trials/min)" if rate else ""))
    key = summary["objective_cost"]
    sel, ev = summary["selection_split"], summary["eval_split"]
    where = (f"{sel['images']} held-out {sel['split']} images" if sel["held_out"] > 0 else
             f"the {sel['split']} split itself")
    print(f"Pareto front (PQ up, {key} down) on {where}, {len(summary['front'])} points; "
          f"then the same gate on {ev['split']} ({ev['images']} images):")
    for p in summary["front"]:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p["params"].items())
        print(f"  trial {p['number']:>4}: PQ {p['pq']:.4f}  {key} {p[key]:.4f} | {ev['split']}: PQ "
              f"{p.get('val_pq', float('nan')):.4f}  {key} {p.get('val_' + key, float('nan')):.4f}  [{params}]")
    for label, rows in ((where, summary["static"]), (ev["split"], summary["static_val"])):
        print(f"static depth on {label}: " + ", ".join(f"exit {p['exit']}: PQ {p['pq']:.4f} @ {p[key]:.4f}"
                                                       for p in rows if key in p))
    print(f"MLflow parent run {summary['run_id']}; plot {summary['plot']}")
    return 0


def cmd_select(args) -> int:
    from eco_ray.sweep.select import select

    budgets = [(k, v) for k, v in (("max_gflops", args.max_gflops), ("max_latency_ms", args.max_latency_ms),
                                   ("min_pq", args.min_pq)) if v is not None]
    if len(budgets) != 1:
        raise ConfigError("give exactly one of --max-gflops, --max-latency-ms, --min-pq")
    r = select(args.sweep, *budgets[0], run_dir=args.run_dir, tracking_uri=args.tracking_uri,
               registered_model=args.registered_model, alias=args.alias)
    if args.json:
        _print_json(r)
        return 0
    c = r["chosen"]
    print(f"selected trial {c['optuna_trial']} of sweep {r['sweep']} ({r['candidates']} candidates): {r['why']}")
    print(f"  PQ {c['pq']:.4f} (things {c.get('pq_things', float('nan')):.4f}, stuff {c.get('pq_stuff', float('nan')):.4f}),"
          f" {c['encoder_gflops_mean']:.4f} mean encoder GFLOPs, {c.get('latency_ms_mean', float('nan')):.2f} ms")
    if "val_pq" in c:
        print(f"  on the validation split (never selected on): PQ {c['val_pq']:.4f} (things "
              f"{c.get('val_pq_things', float('nan')):.4f}, stuff {c.get('val_pq_stuff', float('nan')):.4f}), "
              f"{c.get('val_encoder_gflops_mean', float('nan')):.4f} mean encoder GFLOPs")
    print(f"  params: {c['params']}")
    print(f"registered {r['registered_model']} version {r['version']}; alias {r['alias']!r} -> version {r['version']} "
          f"({r['model_uri']})")
    return 0


def cmd_models(args) -> int:
    from eco_ray.registry import default_tracking_uri
    from eco_ray.sweep.select import list_models

    rows = list_models(args.tracking_uri or default_tracking_uri(args.run_dir))
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no registered eco-parent or eco-gate models yet (eco-ray train registers parents, eco-ray select gates)")
        return 0
    for r in rows:
        aliases = ("@" + ",@".join(r["aliases"])) if r["aliases"] else ""
        metrics = ", ".join(f"{k}={v}" for k, v in r["metrics"].items())
        tags = ", ".join(f"{k}={v}" for k, v in r["tags"].items())
        print(f"{r['name']:>10} v{r['version']:<3} {aliases:<14} {metrics}" + (f"  [{tags}]" if tags else ""))
    return 0


# ------------------------------------------------------------------------------------------------ serve
def cmd_serve(args) -> int:
    from eco_ray.registry import default_tracking_uri
    from eco_ray.serve.run import start

    start(args.config, parent_uri=args.parent, gate_uri=args.gate,
          tracking_uri=args.tracking_uri or default_tracking_uri(args.run_dir), host=args.host, port=args.port,
          address=args.address)
    return 0


# --------------------------------------------------------------------------------------------- pipeline
def cmd_pipeline(args) -> int:
    from eco_ray.config import to_yaml
    from eco_ray.pipeline import Pipeline, format_summary, load_pipeline_config

    cfg = load_pipeline_config(args.config, args.set)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    pipeline = Pipeline(cfg, tracking_uri=args.tracking_uri, address=args.address, from_stage=args.from_stage,
                        keep_serving=args.keep_serving)
    with contextlib.redirect_stdout(sys.stderr):  # Ray forwards worker logs to stdout; keep it for the summary
        summary = pipeline.run()
    if args.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
    if args.keep_serving:
        from eco_ray.serve.run import serve_until_interrupted

        serve_until_interrupted(summary["serving"]["url"])
    return 0


def cmd_kuberay_render(args) -> int:
    from eco_ray.kuberay import RAYSERVICE, render_rayservice

    out = Path(args.rayservice or RAYSERVICE)
    text = render_rayservice(args.serve_config, out)
    if args.check:
        if out.read_text() != text:
            print(f"{out} is out of date with the Serve config: run `eco-ray kuberay render`", file=sys.stderr)
            return 1
        print(f"{out} matches the Serve config")
        return 0
    out.write_text(text)
    print(f"rendered serveConfigV2 of {out} from {args.serve_config or 'deploy/serve_config.yaml'}")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eco-ray",
        description="ECO-M2F early-exit Mask2Former on Ray: data, training, derived tables, gates, sweeps, serving.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate, check, describe and convert COCO-panoptic datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    s = dsub.add_parser("synth", help="generate the synthetic COCO-panoptic benchmark (COCO 2017 layout)",
                        description="Writes OUT/{train,val}/ images, OUT/annotations/panoptic_{train,val}.json and "
                                    "OUT/annotations/panoptic_{train,val}/ id PNGs. Deterministic for a seed.")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    s.add_argument("--val", type=int, default=300, help="validation images (default 300)")
    s.add_argument("--size", type=int, default=None, help="image side in pixels (default 128)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    s.add_argument("--config", help="YAML file with generator settings (see eco_ray/data/synth.py SynthConfig)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one generator setting, e.g. --set kind_mix.relational=0.5 (repeatable)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 4)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already in --out (the same settings are reused without it)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_data_synth)

    c = dsub.add_parser("check", help="load every sample of a split and list broken files")
    c.add_argument("--root", required=True, help="dataset root in the COCO 2017 layout")
    c.add_argument("--split", default="val")
    c.set_defaults(func=cmd_data_check)

    r = dsub.add_parser("report", help="describe a dataset and score its ground truth against itself (PQ must be 1)")
    r.add_argument("--root", required=True, help="dataset root in the COCO 2017 layout")
    r.add_argument("--splits", default="train,val", help="comma-separated splits (default train,val)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.set_defaults(func=cmd_data_report)

    v = dsub.add_parser("convert", help="COCO instance JSON (+ semantic PNGs for stuff) -> COCO panoptic")
    v.add_argument("--instances", required=True, help="COCO instances JSON (polygons and/or RLE)")
    v.add_argument("--out-json", required=True, help="panoptic JSON to write")
    v.add_argument("--out-pngs", required=True, help="directory for the id PNGs")
    v.add_argument("--semantic", help="directory of semantic PNGs (value = stuff category id; 0/255 void)")
    v.add_argument("--stuff-categories", help="JSON list of stuff categories [{id, name}] found in --semantic")
    v.add_argument("--min-visible", type=float, default=0.0,
                   help="drop instances with less than this fraction of their area visible (default 0)")
    v.set_defaults(func=cmd_data_convert)

    c = sub.add_parser("cost", help="GFLOPs and latency of every exit of a model config",
                       description="Counts GFLOPs per image (fvcore convention: 1 multiply-accumulate = 1 FLOP; "
                                   "the deformable sampling is not counted, as in the paper) and times forward() "
                                   "at each exit on this machine. Weights are random: cost does not depend on them.")
    c.add_argument("--model", default="small", help="preset (tiny, small, swin-t) or a model YAML (default small)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model setting")
    c.add_argument("--image-size", type=int, nargs="+", default=None, metavar="SIDE",
                   help="input side, or HEIGHT WIDTH (GFLOPs only) (default: the config's image_size)")
    c.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to time (default 1 8)")
    c.add_argument("--repeats", type=int, default=20, help="timed runs per exit and batch size (default 20)")
    c.add_argument("--no-latency", action="store_true", help="count GFLOPs only (fast; for large configs)")
    c.add_argument("--json", action="store_true", help="print the table as JSON (latency_ms = batch 1)")
    c.set_defaults(func=cmd_cost)

    t = sub.add_parser("train", help="Step A: train the early-exit parent on Ray Train, register it in MLflow",
                       description="Weighted stochastic depth: each step trains one sampled exit, the deepest "
                                   "exit plus one sampled shallower exit (exit_sampling=deepest_plus_one, the "
                                   "pipeline's choice) or all exits, each exit's loss weighted by alpha_k. "
                                   "Data-parallel over Ray Train workers; checkpoints every "
                                   "checkpoint_every steps; a killed worker recovers from the last checkpoint, a "
                                   "stopped run continues with --resume NAME. Settings: eco_ray/train/config.py.")
    t.add_argument("--config", help="YAML file with training settings (TrainConfig)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set steps=500 --set model.num_queries=16 (repeatable)")
    t.add_argument("--name", help="run name (default: train-<UTC time>); a new run never reuses an old name")
    t.add_argument("--resume", metavar="NAME", help="continue the stopped run NAME from its last checkpoint")
    t.add_argument("--run-dir", help="where runs live when resuming (default: runs)")
    t.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                          "sqlite under the run directory)")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("derive", help="Step B: per-image, per-exit statistics + gate inputs + exit costs (Ray)",
                       description="Runs the parent once per image and view with every exit tapped, distributed "
                                   "over Ray tasks, and writes a Parquet dataset (schema: eco_ray/derive/table.py): "
                                   "per image and exit the additive panoptic statistics, the pooled gate input, "
                                   "and the measured cost of every exit. The flipped view measures the label noise "
                                   "and averages it down. The same inputs are reused, not recomputed. Settings: "
                                   "DeriveConfig in eco_ray/derive/run.py.")
    d.add_argument("--parent", help="models:/eco-parent@alias, models:/eco-parent/VERSION, runs:/ID/parent or a "
                                    "directory (default models:/eco-parent/latest)")
    d.add_argument("--data-root", help="COCO-panoptic dataset root (default runs/data)")
    d.add_argument("--split", help="comma-separated splits (default train,val)")
    d.add_argument("--max-images", type=int, help="at most this many images per split (default all)")
    d.add_argument("--out", help="output directory (default runs/derived/<key>)")
    d.add_argument("--config", help="YAML file with DeriveConfig settings")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set views=[plain] --set chunk_size=32 (repeatable)")
    d.add_argument("--overwrite", action="store_true", help="recompute even if the output exists")
    d.add_argument("--run-dir", help="where runs and the default MLflow store live (default runs)")
    d.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    d.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under "
                                          "the run directory)")
    d.add_argument("--json", action="store_true", help="print the manifest as JSON")
    d.set_defaults(func=cmd_derive)

    g = sub.add_parser("gate", help="Step C: fit a gate on a derived dataset; exact evaluation vs. baselines",
                       description="Labels for any beta come from the stored statistics (u_k = q_k - beta * c_k, "
                                   "c_k relative to the deepest exit's cost, ties to the cheaper exit); the gate "
                                   "trains on the cached gate inputs in seconds. The evaluation on the validation "
                                   "split is exact (summed statistics) and always shows static depth at every "
                                   "exit and the per-image oracle. Settings: GateConfig in eco_ray/gate/fit.py.")
    g.add_argument("--derived", required=True, help="derived-dataset directory or the MLflow run id that logged it")
    g.add_argument("--beta", type=float, nargs="+", help="trade-off(s); a budget gate is fitted once for all "
                                                         "(default 0.05)")
    g.add_argument("--kind", choices=["classify", "budget"], help="classify: the paper's gate, one per beta; "
                                                                  "budget: per-exit quality regression, any beta")
    g.add_argument("--cost", choices=["gflops", "latency", "layers"], help="cost measure of the utility "
                                                                           "(default gflops: encoder GFLOPs)")
    g.add_argument("--config", help="YAML file with GateConfig settings")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set lr=0.003 --set epochs=500 (repeatable)")
    g.add_argument("--name", help="run name (default gate-<kind>-<cost>-<UTC time>)")
    g.add_argument("--out", help="where to write the gate(s) (default runs/gates/<name>)")
    g.add_argument("--run-dir", default="runs", help="where runs and the default MLflow store live (default runs)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under "
                                          "the run directory)")
    g.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    g.set_defaults(func=cmd_gate)

    w = sub.add_parser("sweep", help="Ray Tune + Optuna sweep of the trade-off (PQ up, GFLOPs down)",
                       description="Multi-objective sweep over a search space (search_spaces/*.yaml): each trial "
                                   "fits a gate on the derived table and evaluates it exactly (seconds). The Optuna "
                                   "study is named eco-ray-<sweep> and stored in runs/sweeps/<sweep>/optuna.db (or "
                                   "--storage, e.g. postgresql://...). Every trial is one MLflow child run of the "
                                   "sweep's run, which gets the Pareto front and its plot. Trials fit on the training "
                                   "split minus a held-out share (--holdout, default 0.25) and are scored, budgeted "
                                   "and selected on that share; the validation split only reports (val_* metrics), "
                                   "so its PQ is not inflated by picking the best of many trials on it. Settings: "
                                   "SweepConfig in eco_ray/sweep/run.py.")
    w.add_argument("--derived", help="derived-dataset directory (eco-ray derive)")
    w.add_argument("--space", help="search space YAML (default search_spaces/default.yaml)")
    w.add_argument("--trials", type=int, help="finished trials the sweep ends with (default 40)")
    w.add_argument("--concurrency", type=int, help="trials at a time (default 2)")
    w.add_argument("--sampler", choices=["tpe", "nsga2", "random"], help="Optuna sampler (default tpe), seeded")
    w.add_argument("--seed", type=int, help="sampler seed (default 0)")
    w.add_argument("--objective", choices=["gflops", "latency"], help="cost objective (default gflops)")
    w.add_argument("--max-gflops", type=float, help="budget on mean encoder GFLOPs: an Optuna constraint")
    w.add_argument("--max-latency-ms", type=float, help="budget on mean latency (ms): an Optuna constraint")
    w.add_argument("--holdout", type=float, help="share of the training images held out of every fit to score "
                                                 "and select trials on (default 0.25; 0 = score on the validation "
                                                 "split itself, optimistic)")
    w.add_argument("--storage", help="Optuna storage URL (default sqlite in the sweep directory)")
    w.add_argument("--name", help="sweep name (default sweep-<UTC time>); a new sweep never reuses a name")
    w.add_argument("--resume", metavar="NAME", help="continue the stopped sweep NAME (runs only missing trials)")
    w.add_argument("--config", help="YAML file with SweepConfig settings")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    w.add_argument("--run-dir", help="where runs live (default runs)")
    w.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    w.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under "
                                          "the run directory)")
    w.add_argument("--json", action="store_true", help="print the summary as JSON")
    w.set_defaults(func=cmd_sweep)

    sel = sub.add_parser("select", help="pick the best gate of a sweep under a budget; register it, move an alias",
                         description="Among the sweep's finished trials in MLflow: the highest PQ within "
                                     "--max-gflops / --max-latency-ms, or the cheapest reaching --min-pq. The gate "
                                     "is registered (default eco-gate) and the alias (default production) moved to "
                                     "it in one registry call. A budget no trial meets is an error that shows the "
                                     "cheapest available point.")
    sel.add_argument("--sweep", required=True, help="sweep name")
    sel.add_argument("--max-gflops", type=float, help="mean encoder GFLOPs per image at most")
    sel.add_argument("--max-latency-ms", type=float, help="mean latency per image (ms, batch 1) at most")
    sel.add_argument("--min-pq", type=float, help="validation PQ at least (then the cheapest)")
    sel.add_argument("--registered-model", default="eco-gate", help="registry name (default eco-gate)")
    sel.add_argument("--alias", default="production", help="alias to move (default production)")
    sel.add_argument("--run-dir", default="runs", help="where runs live (default runs)")
    sel.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's)")
    sel.add_argument("--json", action="store_true", help="print the selection as JSON")
    sel.set_defaults(func=cmd_select)

    mo = sub.add_parser("models", help="list registered parents and gates with aliases and key metrics")
    mo.add_argument("--run-dir", default="runs", help="where runs live (default runs)")
    mo.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under "
                                           "the run directory)")
    mo.add_argument("--json", action="store_true")
    mo.set_defaults(func=cmd_models)

    pl = sub.add_parser(
        "pipeline", help="the main job: data -> train -> derive -> sweep -> select -> serve, stages reused",
        description="Run every stage on this machine (a local Ray, MLflow on SQLite under --run-dir, Serve on "
                    "localhost): generate the dataset, train the parent (Step A), derive the per-exit table (Step B), "
                    "sweep gates with Ray Tune + Optuna (Step C), select the best gate under the budget and move its "
                    "alias, start the Serve app and send it real requests, then print PQ and encoder GFLOPs of the "
                    "static model vs. the selected ECO model. A stage whose inputs did not change since the last run "
                    "is reused (state in <run_dir>/pipeline/<name>/state.json); a stopped training or sweep "
                    "continues where it stopped.")
    pl.add_argument("--config", help="YAML with PipelineConfig settings (eco_ray/pipeline.py); "
                                     "see --print-config for every key and its default")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set train.steps=2000 --set budget=max_gflops --set limit=0.05")
    pl.add_argument("--from", dest="from_stage", choices=PIPELINE_STAGES,
                    help="rerun this stage and every later one even if their inputs did not change")
    pl.add_argument("--keep-serving", action="store_true", help="keep the Serve app up after the summary")
    pl.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    pl.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    pl.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under "
                                           "the run directory)")
    pl.add_argument("--json", action="store_true", help="print the summary as JSON")
    pl.set_defaults(func=cmd_pipeline)

    kr = sub.add_parser("kuberay", help="KubeRay manifests (deploy/kuberay)")
    krsub = kr.add_subparsers(dest="kuberay_command", required=True)
    rr = krsub.add_parser("render", help="write the RayService's serveConfigV2 from the Serve config",
                          description="Render spec.serveConfigV2 of deploy/kuberay/rayservice.yaml from "
                                      "deploy/serve_config.yaml (http_options.host becomes 0.0.0.0).")
    rr.add_argument("--serve-config", help="Serve config YAML (default deploy/serve_config.yaml)")
    rr.add_argument("--rayservice", help="RayService manifest to update (default deploy/kuberay/rayservice.yaml)")
    rr.add_argument("--check", action="store_true", help="only check that the manifest is up to date (exit 1 if not)")
    rr.set_defaults(func=cmd_kuberay_render)

    sv = sub.add_parser("serve", help="serve the selected gate + parent over HTTP with Ray Serve (local)",
                        description="Starts the Serve application of deploy/serve_config.yaml (autoscaling, limits, "
                                    "batching) on a local Ray against the embedded MLflow store and prints the URL. "
                                    "POST /v1/segment with an image; GET /v1/models, /healthz. Ctrl-C stops.")
    sv.add_argument("--config", help="Serve config YAML (default deploy/serve_config.yaml)")
    sv.add_argument("--parent", help="parent URI (default: the config's, models:/eco-parent/latest)")
    sv.add_argument("--gate", help="gate URI (default: the config's, models:/eco-gate@production)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--run-dir", default="runs", help="where runs live (default runs)")
    sv.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    sv.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under "
                                           "the run directory)")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from eco_ray.errors import EcoRayError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EcoRayError as e:
        print(f"eco-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
