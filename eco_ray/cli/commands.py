"""One thin function per command: read the flags, build the RunContext once, call the library, print.
Heavy imports happen inside the functions, so ``--help`` and bad flags answer at once."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from eco_ray.config import ConfigError, load_config


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=float))


def _context(args):
    from eco_ray.context import RunContext

    return RunContext.create(getattr(args, "run_dir", None), getattr(args, "tracking_uri", None),
                             getattr(args, "address", None), getattr(args, "experiment", None))


def _flags(args, names: dict[str, str]) -> list[str]:
    """``key=value`` overrides from flags that were given (``names``: flag attribute -> config key)."""
    return [f"{key}={getattr(args, attr)}" for attr, key in names.items() if getattr(args, attr, None) is not None]


# ------------------------------------------------------------------------------------------------- data
def data_synth(args) -> int:
    from eco_ray.data.synth import SynthConfig, ensure_dataset

    cfg = load_config(SynthConfig, args.config, list(args.set) + _flags(args, {"size": "size", "seed": "seed"}))

    def progress(split, done, total):
        print(f"  {split}: {done}/{total} images", file=sys.stderr, flush=True)

    summary, reused = ensure_dataset(args.out, cfg, {"train": args.train, "val": args.val}, overwrite=args.overwrite,
                                     workers=args.workers, progress=progress)
    if reused:
        print(f"{args.out} already holds this dataset (same settings): reusing it")
        return 0
    if args.json:
        _print_json(summary)
        return 0
    print(f"wrote {args.out} in {summary['seconds']} s ({summary['disk_bytes'] / 1e6:.1f} MB)")
    for split, s in summary["splits"].items():
        print(f"  {split}: {s['images']} images; kinds {s['kinds']}; objects per image {s['objects_per_image']}")
    return 0


def data_synth_table(args) -> int:
    from eco_ray.derive.synthetic import write_synthetic_table
    from eco_ray.derive.table import MANIFEST

    if args.train < 2 or args.val < 1:
        raise ConfigError(f"need --train >= 2 and --val >= 1, got {args.train} and {args.val}")
    if (Path(args.out) / MANIFEST).exists():
        raise ConfigError(f"{args.out} holds a derived table already; remove it or pick another --out")
    t = time.perf_counter()
    root = write_synthetic_table(args.out, args.train, args.val, seed=args.seed)
    from eco_ray.derive.table import DerivedDataset

    manifest = DerivedDataset.open(root).manifest
    disk = sum(p.stat().st_size for p in Path(root).iterdir())
    summary = {"path": str(root), "train": args.train, "val": args.val, "disk_bytes": disk,
               "seconds": round(time.perf_counter() - t, 2),
               "static_val_pq": {k: round(v["pq"], 4) for k, v in manifest["splits"]["val"]["static"].items()}}
    if args.json:
        _print_json(summary)
        return 0
    print(f"wrote {root} in {summary['seconds']} s ({disk / 1e6:.1f} MB): {args.train} train, {args.val} val images; "
          f"static val PQ by exit {summary['static_val_pq']}")
    return 0


def data_check(args) -> int:
    from eco_ray.data import CocoPanopticDataset

    ds = CocoPanopticDataset.from_root(args.root, args.split)
    problems = ds.validate()
    for p in problems:
        print(p)
    print(f"{len(ds)} images checked, {len(problems)} with problems")
    return 1 if problems else 0


def data_instances(args) -> int:
    from eco_ray.data.coco_instances import write_instances_from_panoptic

    def progress(done, total):
        print(f"  {done}/{total} images", file=sys.stderr, flush=True)

    path, counts = write_instances_from_panoptic(args.root, args.split, args.out, progress)
    if args.json:
        _print_json({"path": str(path), **counts})
    else:
        print(f"wrote {path}: {counts['instances']} instances ({counts['crowd']} crowd) of {counts['categories']} "
              f"thing categories in {counts['images']} images")
    return 0


def data_report(args) -> int:
    """Describe a dataset and prove the metrics pipeline on it: ground truth scored against itself."""
    from eco_ray.cli.format import dataset_report
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
    else:
        print(dataset_report(report))
    return 0


def data_convert(args) -> int:
    from eco_ray.data import DatasetError, SplitPaths
    from eco_ray.data.coco_panoptic import load_json
    from eco_ray.data.convert import IMAGE_MODES, convert_instances_to_panoptic

    if args.out:
        if args.out_json or args.out_pngs:
            raise DatasetError("give either --out (with --split) or --out-json and --out-pngs, not both")
        if not args.images:
            raise DatasetError("--out writes the whole layout, images included: give --images DIR (the folder "
                               "file_name is relative to), or write only the annotations with --out-json and "
                               "--out-pngs")
        paths = SplitPaths.coco_layout(args.out, args.split)
        out_json, out_pngs, images_out = paths.annotations_json, paths.panoptic_pngs, paths.images
    elif args.out_json and args.out_pngs:
        out_json, out_pngs, images_out = args.out_json, args.out_pngs, None
    else:
        raise DatasetError("say where to write: --out ROOT [--split S], or --out-json FILE and --out-pngs DIR")
    stuff = load_json(args.stuff_categories, "stuff categories file") if args.stuff_categories else []
    report = convert_instances_to_panoptic(args.instances, out_json, out_pngs, args.semantic, stuff,
                                           min_visible=args.min_visible, images_dir=args.images,
                                           images_out=images_out if args.images else None,
                                           image_mode=args.image_mode, strict=args.strict)
    if args.json:
        _print_json({"out_json": str(out_json), "out_pngs": str(out_pngs), **report.to_json()})
        return 0
    print(f"wrote {out_json}: {report.images} images, {report.segments} segments; id PNGs in {out_pngs}"
          + (f"; {report.images_placed} images {IMAGE_MODES[args.image_mode]} into {images_out}"
             if report.images_placed else ""))
    if report.void_categories:
        print(f"  void (not a category): {', '.join(report.void_categories)}")
    for line in report.warnings():
        print(f"  {line}")
    return 0


# --------------------------------------------------------------------------------------------- evaluate
def evaluate(args) -> int:
    from eco_ray.cli.format import prediction_score
    from eco_ray.data import CocoPanopticDataset
    from eco_ray.data.predictions import default_png_folder, score_predictions

    model_only = {"--exit": args.exit, "--gate": args.gate, "--beta": args.beta, "--max-gflops": args.max_gflops,
                  "--out": args.out, "--threshold": args.threshold, "--batch-size": args.batch_size}
    if args.pred and any(v is not None for v in model_only.values()):
        raise ConfigError(f"{', '.join(k for k, v in model_only.items() if v is not None)} go with --parent: "
                          f"--pred scores predictions that exist")
    if args.parent and args.pred_pngs:
        raise ConfigError("--pred-pngs goes with --pred; with --parent the PNGs are written beside --out")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    gt = CocoPanopticDataset.from_root(args.gt, args.split)
    pred_json, pred_pngs, exits = args.pred, args.pred_pngs, None
    if args.parent:
        if (args.exit is None) == (args.gate is None):
            raise ConfigError("with --parent, give --exit K (static depth) or --gate URI")
        if args.exit is not None and (args.beta is not None or args.max_gflops is not None):
            raise ConfigError("--beta and --max-gflops choose among exits: they need --gate, not --exit")
        ctx = _context(args)
        pred_json = Path(args.out) if args.out else ctx.run_dir / "predictions" / f"{args.split}.json"
        pred_pngs = default_png_folder(pred_json)
        written = _predict(args, gt, pred_json, ctx.tracking_uri)
        exits = [a["eco_exit"] for a in written["annotations"]]
        gflops = [a["eco_encoder_gflops"] for a in written["annotations"]]
        print(f"wrote {len(exits)} predictions to {pred_json}", file=sys.stderr)
    score = score_predictions(gt, pred_json, pred_pngs, progress=_eta("scored"))
    result = score.to_json()
    if exits is not None:
        result["predictions"] = str(pred_json)
        result["encoder_gflops_mean"] = float(sum(gflops) / max(len(gflops), 1))
        result["exits"] = {str(k): exits.count(k) for k in sorted(set(exits))}
        result["targets_missed"] = sum(a["eco_target_met"] is False for a in written["annotations"])
    if args.json:
        _print_json(result)
    else:
        print(prediction_score(result, per_class=args.per_class))
    return 0


def _predict(args, gt, pred_json: Path, tracking_uri: str) -> dict:
    from eco_ray.evaluate import write_predictions
    from eco_ray.model.io import load_parent
    from eco_ray.serve.engine import InputError, RequestControl, load_engine, parent_engine
    from eco_ray.tracking import describe_model_uri, resolve_model_dir

    threshold = 0.5 if args.threshold is None else args.threshold
    try:
        control = RequestControl.parse({"exit": args.exit, "beta": args.beta, "max_gflops": args.max_gflops})
    except InputError as e:
        raise ConfigError(str(e)) from None
    if args.gate:
        try:
            engine, _ = load_engine(args.parent, args.gate, tracking_uri, threshold=threshold, task="panoptic")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        parent, pmeta = load_parent(resolve_model_dir(args.parent, tracking_uri))
        engine = parent_engine(parent, pmeta, {"parent": describe_model_uri(args.parent, tracking_uri)},
                               threshold=threshold)
    try:
        engine.allowed_exits(control)
    except InputError as e:
        raise ConfigError(str(e)) from None
    if list(engine.categories.ids) != list(gt.categories.ids):
        raise ConfigError(f"the parent predicts categories {list(engine.categories.ids)}, the dataset has "
                          f"{list(gt.categories.ids)}")
    try:
        return write_predictions(engine, gt, pred_json, control, batch_size=args.batch_size or 8,
                                 progress=_eta("predicted"))
    except OSError as e:
        raise ConfigError(f"cannot write the predictions ({e.filename or pred_json}: {e.strerror or e})") from None


def _eta(verb: str):
    """A progress callback printing about every 10% with an ETA, on stderr."""
    started = time.perf_counter()
    state = {"next": 0.1}

    def progress(done, total):
        if done < total and done / total >= state["next"]:
            state["next"] += 0.1
            left = (time.perf_counter() - started) / done * (total - done)
            print(f"  {verb} {done}/{total} images, ETA {left:.0f} s", file=sys.stderr, flush=True)

    return progress


# ------------------------------------------------------------------------------------------------- cost
def cost(args) -> int:
    import torch

    from eco_ray.cli.format import cost_table
    from eco_ray.model.config import load_model_config
    from eco_ray.model.cost import exit_cost_table
    from eco_ray.model.io import build_parent

    cfg = load_model_config(args.model, args.set, task=args.task)
    torch.manual_seed(0)
    model = build_parent(cfg)
    size = args.image_size or [cfg.image_size]
    table = exit_cost_table(model, size[0], batch_sizes=tuple(args.batch_sizes), repeats=args.repeats,
                            measure_latency=not args.no_latency, width=size[-1])
    if args.json:
        _print_json(table)
    else:
        print(cost_table(table, size[0], size[-1]))
    return 0


# ------------------------------------------------------------------------------------------------ train
def train(args) -> int:
    from eco_ray.cli.format import training
    from eco_ray.train.config import load_train_config
    from eco_ray.train.ray_train import resume_training, run_training

    ctx = _context(args)
    if args.resume:
        if args.config or args.set or args.name or args.data_root or args.task:
            raise ConfigError("--resume continues a run with its saved config and data; do not combine it with "
                              "--config, --set, --name, --data-root or --task")
        summary = resume_training(args.resume, ctx)
    else:
        cfg = load_train_config(args.config, ([f"task={args.task}"] if args.task else []) + list(args.set))
        summary = run_training(cfg, data_root=args.data_root or ctx.data_dir, ctx=ctx, name=args.name)
    if args.json:
        _print_json(summary)
    else:
        print(training(summary))
    return 0


# ----------------------------------------------------------------------------------------------- derive
def derive(args) -> int:
    from eco_ray.cli.format import derived
    from eco_ray.derive.config import MOVED_KEYS, DeriveConfig
    from eco_ray.derive.run import run_derive

    overrides = list(args.set) + _flags(args, {"max_images": "max_images"})
    if args.split:
        overrides.append(f"splits=[{args.split}]")
    cfg = load_config(DeriveConfig, args.config, overrides, renamed=MOVED_KEYS)
    ctx = _context(args)
    m = run_derive(cfg, parent=args.parent, data_root=args.data_root or ctx.data_dir, ctx=ctx, out=args.out,
                   overwrite=args.overwrite)
    if args.json:
        _print_json(m)
    else:
        print(derived(m, cfg.sufficient_tolerance))
    return 0


def diagnose(args) -> int:
    from eco_ray.cli.format import diagnosis
    from eco_ray.diagnose import diagnose_table

    if args.resamples < 10:
        raise ConfigError(f"--resamples must be at least 10, got {args.resamples}")
    exits = [int(k) for k in args.exits.split(",")] if args.exits else None
    d, plot = diagnose_table(args.derived, _context(args), split=args.split, probe_split=args.probe_split,
                             gate=args.gate, betas=args.betas, resamples=args.resamples, min_lead=args.min_lead,
                             out_dir=args.out, exits=exits)
    if args.json:
        _print_json(d.to_json())
    else:
        print(diagnosis(d, plot))
    return 0


# ------------------------------------------------------------------------------------------------- gate
def gate(args) -> int:
    from eco_ray.cli.format import gate as report
    from eco_ray.gate.config import GateConfig
    from eco_ray.gate.run import run_gate

    overrides = list(args.set) + _flags(args, {"kind": "kind", "cost": "cost"})
    if args.beta:
        overrides.append(f"beta={args.beta[0]}")
    cfg = load_config(GateConfig, args.config, overrides)
    run = run_gate(args.derived, cfg, args.beta, ctx=_context(args), out=args.out, name=args.name)
    if args.json:
        evaluations = run.evaluations
        _print_json(evaluations[0] if len(evaluations) == 1 else evaluations)
    else:
        print(report(run))
    return 0


# ------------------------------------------------------------------------------------------------ sweep
def sweep(args) -> int:
    from eco_ray.cli.format import sweep as report
    from eco_ray.sweep import resume_sweep, run_sweep
    from eco_ray.sweep.config import MOVED_KEYS, SweepConfig

    ctx = _context(args)
    if args.resume:
        if args.config or args.set or args.name or args.derived:
            raise ConfigError("--resume continues a sweep with its saved settings; do not combine it with --config, "
                              "--set, --name or --derived")
        summary = resume_sweep(args.resume, ctx, storage=args.storage)
    else:
        if not args.derived:
            raise ConfigError("give --derived (a derived-dataset directory from eco-ray derive), or --resume NAME")
        cfg = load_config(SweepConfig, args.config, list(args.set) + _flags(args, {
            "space": "space", "trials": "trials", "concurrency": "concurrency", "sampler": "sampler",
            "objective": "objective_cost", "max_gflops": "max_gflops", "max_latency_ms": "max_latency_ms",
            "storage": "storage", "seed": "seed", "holdout": "holdout"}), renamed=MOVED_KEYS)
        summary = run_sweep(cfg, derived=args.derived, ctx=ctx, name=args.name)
    if args.json:
        _print_json(summary.to_json(with_trials=False))
    else:
        print(report(summary))
    return 0


def select(args) -> int:
    from eco_ray.budget import Budget
    from eco_ray.cli.format import selection
    from eco_ray.sweep import select as choose_and_register

    name, limit = next((n, getattr(args, n)) for n in ("max_gflops", "max_relative_gflops", "max_latency_ms",
                                                        "max_relative_latency", "min_pq", "min_ap")
                       if getattr(args, n) is not None)
    ctx = _context(args)
    budget = Budget.named(name, limit)
    r = choose_and_register(args.sweep, budget, ctx=ctx, registered_model=args.registered_model, alias=args.alias,
                            full_depth=_full_depth_of(args.sweep, ctx) if budget.relative else None)
    if args.json:
        _print_json(r.to_json())
    else:
        print(selection(r))
    return 0


def _full_depth_of(sweep: str, ctx) -> dict:
    """The full-depth costs of the table a sweep ran on (a relative budget's reference)."""
    from eco_ray.derive.table import DerivedDataset

    info = ctx.sweep_dir(sweep) / "sweep.json"
    if not info.is_file() or "derived" not in json.loads(info.read_text()):
        raise ConfigError(f"a relative budget needs the sweep's table; {info} does not name one: give an absolute "
                          "budget (--max-gflops)")
    return DerivedDataset.open(json.loads(info.read_text())["derived"]).cost_table.full_depth()


def models(args) -> int:
    from eco_ray.cli.format import models as report
    from eco_ray.sweep import list_models

    rows = list_models(_context(args).tracking_uri)
    if args.json:
        _print_json(rows)
    else:
        print(report(rows))
    return 0


# ------------------------------------------------------------------------------------------------ serve
def serve(args) -> int:
    from eco_ray.serve.run import start

    start(args.config, parent_uri=args.parent, gate_uri=args.gate, ctx=_context(args), host=args.host, port=args.port)
    return 0


# --------------------------------------------------------------------------------------------- pipeline
def pipeline(args) -> int:
    from eco_ray.config import to_yaml
    from eco_ray.context import RunContext
    from eco_ray.pipeline import Pipeline, format_summary, load_pipeline_config

    cfg = load_pipeline_config(args.config, args.set)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    ctx = RunContext.create(args.run_dir or cfg.run_dir, args.tracking_uri, args.address, args.experiment)
    p = Pipeline(cfg, ctx, from_stage=args.from_stage, keep_serving=args.keep_serving)
    with contextlib.redirect_stdout(sys.stderr):  # Ray forwards worker logs to stdout; keep it for the summary
        summary = p.run()
    if args.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
    if args.keep_serving:
        from eco_ray.serve.run import serve_until_interrupted

        serve_until_interrupted(summary["serving"]["url"], summary["serving"]["route"].removeprefix("/v1/"))
    return 0


def kuberay_render(args) -> int:
    from eco_ray.kuberay import RAYSERVICE, render_rayservice

    out = Path(args.rayservice or RAYSERVICE)
    if not out.is_file():
        raise ConfigError(f"{out} not found: run this from the repository root or pass --rayservice")
    text = render_rayservice(args.serve_config, out)
    if args.check:
        if out.read_text() != text:
            print(f"{out} is out of date with the Serve config: run `eco-ray kuberay render`", file=sys.stderr)
            return 1
        print(f"{out} matches the Serve config")
        return 0
    out.write_text(text)
    print(f"rendered serveConfigV2 of {out} from {args.serve_config or 'the shipped Serve config'}")
    return 0
