"""The ``eco-ray`` argument parser. Flags every command shares come from parent parsers, with one default
each: where the job runs (``--run-dir``, ``--tracking-uri``, ``--address``, ``--experiment``), settings
(``--config``, ``--set``) and ``--json``."""

from __future__ import annotations

import argparse

from eco_ray.cli import commands as c

# the pipeline's stages (eco_ray.pipeline.config.STAGES, which tests/test_cli.py checks this against): not
# imported from there, because the config tree imports torch and `--help` should not wait for it
STAGES = ("data", "train", "derive", "sweep", "select", "serve")


def _context_flags(ray: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("where it runs")
    g.add_argument("--run-dir", help="where runs, checkpoints and the embedded MLflow store live (default runs)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite under the "
                                          "run directory)")
    g.add_argument("--experiment", help="MLflow experiment (default eco-ray)")
    if ray:
        g.add_argument("--address", help="join an existing Ray cluster (auto, ray://...; default: start a local one)")
    return p


def _settings_flags(what: str, example: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", help=f"YAML file with {what} settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override one setting, e.g. --set {example} (repeatable)")
    return p


def _json_flag() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eco-ray",
        description="ECO-M2F early-exit Mask2Former on Ray: data, training, derived tables, a verdict, gates, "
                    "sweeps, selection, serving. Every command has --help.")
    sub = p.add_subparsers(dest="command", required=True)
    ctx, ctx_no_ray, js = _context_flags(), _context_flags(ray=False), _json_flag()

    # ------------------------------------------------------------------------------------------- data
    data = sub.add_parser("data", help="generate, check, describe and convert COCO-panoptic datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", parents=[_settings_flags("generator (SynthConfig, eco_ray/data/synth.py)",
                                                          "kind_mix.relational=0.5"), js],
                        help="generate the synthetic COCO-panoptic benchmark (COCO 2017 layout)",
                        description="Writes OUT/{train,val}/ images, OUT/annotations/panoptic_{train,val}.json, "
                                    "OUT/annotations/panoptic_{train,val}/ id PNGs and the COCO instance files of the "
                                    "same scenes, OUT/annotations/instances_{train,val}.json. Deterministic for a seed.")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    s.add_argument("--val", type=int, default=300, help="validation images (default 300)")
    s.add_argument("--size", type=int, default=None, help="image side in pixels (default 128)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 4)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already in --out (the same settings are reused without it)")
    s.set_defaults(func=c.data_synth)

    st = dsub.add_parser("synth-table", parents=[js],
                         help="a COCO-shaped derived table without a model (scale tests of gate, sweep, diagnose)",
                         description="Writes a derived-dataset directory as `eco-ray derive` would, from no model: "
                                     "133 categories (80 things, 53 stuff), ~11 segments per image, 2 views, exits "
                                     "2..6 at paper-scale GFLOPs, a planted per-image depth need the 256-d gate input "
                                     "partly reveals. For trying sweeps at COCO size (docs/scale.md); its numbers "
                                     "model no parent.")
    st.add_argument("--out", required=True, help="output directory (must not hold a derived table)")
    st.add_argument("--train", type=int, default=30000, help="training images (default 30000)")
    st.add_argument("--val", type=int, default=5000, help="validation images (default 5000, as COCO val2017)")
    st.add_argument("--seed", type=int, default=0)
    st.set_defaults(func=c.data_synth_table)

    k = dsub.add_parser("check", help="load every sample of a split and list broken files")
    k.add_argument("--root", required=True, help="dataset root in the COCO 2017 layout")
    k.add_argument("--split", default="val")
    k.set_defaults(func=c.data_check)

    r = dsub.add_parser("report", parents=[js], help="describe a dataset and score its ground truth against itself "
                                                     "(PQ must be 1)")
    r.add_argument("--root", required=True, help="dataset root in the COCO 2017 layout")
    r.add_argument("--splits", default="train,val", help="comma-separated splits (default train,val)")
    r.set_defaults(func=c.data_report)

    v = dsub.add_parser("convert", parents=[js], help="COCO instance JSON (+ semantic PNGs for stuff) -> COCO panoptic",
                        description="Writes the panoptic JSON and id PNGs of one split. With --out ROOT --split S: "
                                    "the COCO 2017 layout that every eco-ray command reads (ROOT/annotations/"
                                    "panoptic_S.json, ROOT/annotations/panoptic_S/, and with --images the images "
                                    "in ROOT/S/). Id-0 and background categories become void; larger instances "
                                    "are painted first, smaller ones on top. Every rule it applies is counted in "
                                    "the summary (docs/data.md).")
    v.add_argument("--instances", required=True, help="COCO instances JSON (polygons and/or RLE)")
    v.add_argument("--out", help="dataset root to write the split into (COCO 2017 layout)")
    v.add_argument("--split", default="val", help="split name under --out (default val)")
    v.add_argument("--out-json", help="panoptic JSON to write (instead of --out)")
    v.add_argument("--out-pngs", help="directory for the id PNGs (instead of --out)")
    v.add_argument("--images", help="folder the images' file_name is relative to: checks that every file exists "
                                    "and has the JSON's size, and with --out places them in ROOT/SPLIT/")
    v.add_argument("--image-mode", choices=["copy", "symlink"], default="copy",
                   help="how --out receives the images (default copy; symlink for large datasets)")
    v.add_argument("--semantic", help="directory of semantic PNGs (value = stuff category id; 0/255 void)")
    v.add_argument("--stuff-categories", help="JSON list of stuff categories [{id, name}] found in --semantic")
    v.add_argument("--min-visible", type=float, default=0.0,
                   help="drop instances with less than this fraction of their area visible (default 0)")
    v.add_argument("--strict", action="store_true",
                   help="stop on annotations of unlisted images, missing image files and size mismatches "
                        "(default: leave them out, or use the file's size, and say how many)")
    v.set_defaults(func=c.data_convert)

    ins = dsub.add_parser("instances", parents=[js], help="COCO panoptic -> COCO instances (things only), for detection",
                          description="Writes ROOT/annotations/instances_SPLIT.json (or --out): one instance per "
                                      "thing segment of the panoptic split, its mask as RLE, its box and area the "
                                      "mask's, iscrowd the segment's; stuff is left out, as in COCO's instance files. "
                                      "eco-ray data synth writes this file itself.")
    ins.add_argument("--root", required=True, help="dataset root in the COCO 2017 layout")
    ins.add_argument("--split", default="val", help="split (default val)")
    ins.add_argument("--out", help="instances JSON to write (default ROOT/annotations/instances_SPLIT.json)")
    ins.set_defaults(func=c.data_instances)

    # --------------------------------------------------------------------------------------- evaluate
    ev = sub.add_parser("evaluate", parents=[ctx_no_ray, js],
                        help="score predictions, or a parent at one exit, or a gated model, on a dataset split",
                        description="PQ / SQ / RQ (all, things, stuff, per class) as panopticapi's pq_compute "
                                    "computes them, and mIoU. Either of a prediction set in the COCO panoptic "
                                    "format (--pred: a JSON whose annotations give image_id, file_name and "
                                    "segments_info per image, and the folder of id PNGs), or of a model that "
                                    "predicts first (--parent with --exit K or --gate URI: the decision and the "
                                    "forward pass that serving runs, at each image's own size; the predictions "
                                    "are written to --out). Every image of the split needs a prediction.")
    ev.add_argument("--gt", required=True, help="dataset root in the COCO 2017 layout")
    ev.add_argument("--split", default="val", help="split of --gt to score (default val)")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred", help="prediction JSON (COCO panoptic annotations)")
    src.add_argument("--parent", help="a parent to predict with: models:/eco-parent@production, models:/NAME/N, "
                                      "runs:/..., or a directory")
    ev.add_argument("--pred-pngs", help="folder of the prediction id PNGs (default: the JSON's path without .json)")
    how = ev.add_mutually_exclusive_group()
    how.add_argument("--exit", type=int, help="with --parent: every image at this exit (static depth)")
    how.add_argument("--gate", help="with --parent: the gate that picks each image's exit (a model URI or directory)")
    ev.add_argument("--beta", type=float, help="with --gate (a quality gate): the trade-off (default: the gate's own)")
    ev.add_argument("--max-gflops", type=float, help="with --gate: a per-image encoder GFLOPs budget")
    ev.add_argument("--threshold", type=float, help="with --parent: query score threshold of the predictions "
                                                     "(default 0.5, as served)")
    ev.add_argument("--out", help="with --parent: where the predictions go (default RUN_DIR/predictions/SPLIT.json)")
    ev.add_argument("--batch-size", type=int, help="with --parent: images per forward pass (default 8)")
    ev.add_argument("--per-class", action="store_true", help="print every category's PQ / SQ / RQ / IoU")
    ev.set_defaults(func=c.evaluate)

    # ------------------------------------------------------------------------------------------- cost
    co = sub.add_parser("cost", parents=[js], help="GFLOPs and latency of every exit of a model config",
                        description="Counts GFLOPs per image (fvcore convention: 1 multiply-accumulate = 1 FLOP; "
                                    "the deformable sampling is not counted, as in the paper) and times forward() "
                                    "at each exit on this machine. Weights are random (or the config's pretrained checkpoint): cost "
                                    "does not depend on them.")
    co.add_argument("--task", choices=["panoptic", "detection"], default="panoptic",
                    help="panoptic: the early-exit Mask2Former; detection: the early-exit Deformable DETR "
                         "(default panoptic)")
    co.add_argument("--model", default="small", help="a preset of the task (panoptic: tiny, small, swin-t; "
                                                     "detection: tiny, small) or a model YAML (default small)")
    co.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model setting")
    co.add_argument("--image-size", type=int, nargs="+", default=None, metavar="SIDE",
                    help="input side, or HEIGHT WIDTH (GFLOPs only) (default: the config's image_size)")
    co.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to time (default 1 8)")
    co.add_argument("--repeats", type=int, default=20, help="timed runs per exit and batch size (default 20)")
    co.add_argument("--no-latency", action="store_true", help="count GFLOPs only (fast; for large configs)")
    co.set_defaults(func=c.cost)

    # ------------------------------------------------------------------------------------------ train
    t = sub.add_parser("train", parents=[_settings_flags("training (TrainConfig, eco_ray/train/config.py)",
                                                         "steps=500 --set model.num_queries=16"), ctx, js],
                       help="Step A: train the early-exit parent on Ray Train, register it in MLflow",
                       description="Weighted stochastic depth: each step trains one sampled exit, the deepest "
                                   "exit plus one sampled shallower exit (exit_sampling=deepest_plus_one, the "
                                   "pipeline's choice) or all exits, each exit's loss weighted by alpha_k. "
                                   "Data-parallel over Ray Train workers; checkpoints every checkpoint_every "
                                   "steps; a killed worker recovers from the last checkpoint, a stopped run "
                                   "continues with --resume NAME.")
    t.add_argument("--task", choices=["panoptic", "detection"],
                   help="panoptic: the early-exit Mask2Former on COCO panoptic files (default); detection: the "
                        "early-exit Deformable DETR on COCO instance files (annotations/instances_SPLIT.json), "
                        "registered as eco-det-parent (same as --set task=...)")
    t.add_argument("--data-root", help="dataset root with train and val splits in the COCO 2017 layout "
                                       "(default <run-dir>/data)")
    t.add_argument("--name", help="run name (default: train-<UTC time>); a new run never reuses an old name")
    t.add_argument("--resume", metavar="NAME", help="continue the stopped run NAME from its last checkpoint")
    t.set_defaults(func=c.train)

    # ----------------------------------------------------------------------------------------- derive
    d = sub.add_parser("derive", parents=[_settings_flags("DeriveConfig (eco_ray/derive/config.py)",
                                                          "views=[plain] --set chunk_size=32"), ctx, js],
                       help="Step B: per-image, per-exit statistics + gate inputs + exit costs (Ray)",
                       description="Runs the parent once per image and view with every exit tapped, distributed "
                                   "over Ray tasks, and writes a derived dataset (Arrow files; schema: eco_ray/derive/table.py): "
                                   "per image and exit the additive panoptic statistics (a detector's: the COCOeval "
                                   "matching records of its detections and two labels), the pooled gate input, "
                                   "and the measured cost of every exit. The parent's task picks the dataset's files. The flipped view measures the label noise "
                                   "and averages it down. The same inputs are reused, not recomputed.")
    d.add_argument("--parent", default="models:/eco-parent/latest",
                   help="models:/eco-parent@alias, models:/eco-parent/VERSION (a detector: eco-det-parent), "
                        "runs:/ID/parent or a directory (default models:/eco-parent/latest)")
    d.add_argument("--data-root", help="dataset root in the COCO 2017 layout: panoptic files for a segmenter, "
                                       "instance files for a detector (default <run-dir>/data)")
    d.add_argument("--split", help="comma-separated splits (default train,val)")
    d.add_argument("--max-images", type=int, help="at most this many images per split (default all)")
    d.add_argument("--out", help="output directory (default <run-dir>/derived/<key>)")
    d.add_argument("--overwrite", action="store_true", help="recompute even if the output exists")
    d.set_defaults(func=c.derive)

    # --------------------------------------------------------------------------------------- diagnose
    dg = sub.add_parser("diagnose", parents=[ctx_no_ray, js],
                        help="will adaptive depth pay off on this data? a verdict from the derived table",
                        description="Reads only the derived table (no model pass) and tells label noise from real "
                                    "per-image depth need: the static curve and the usual oracle; the share of "
                                    "(image, exit) pairs whose quality moves between the two views; the reliability "
                                    "of each image's gain from depth; the cross-view oracle (exits picked on the "
                                    "flipped image, scored on the plain one) against the static line at equal "
                                    "compute with bootstrap 95% intervals; how much of the real gain the gate "
                                    "input predicts; optionally a gate's lead. Ends with a verdict: pays / does not "
                                    "pay / cannot tell yet. Needs a table with two views (plain + flip). How to read "
                                    "it: docs/diagnose.md.")
    dg.add_argument("--derived", required=True, help="derived-dataset directory or the MLflow run id that logged it")
    dg.add_argument("--split", default="val", help="the split to judge on (default val)")
    dg.add_argument("--probe-split", default="train", help="where the probe is cross-validated (default train)")
    dg.add_argument("--gate", help="a saved gate (directory or models:/ URI) whose lead to add, e.g. "
                                   "models:/eco-gate@production")
    dg.add_argument("--betas", type=float, nargs="+", default=[0.02, 0.1, 0.3], help="trade-offs (default 0.02 0.1 0.3)")
    dg.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    dg.add_argument("--exits", help="judge on these exits only, e.g. 2,3,4,5,6 (default: all the table has)")
    dg.add_argument("--min-lead", type=float, default=0.005,
                    help="the smallest PQ lead worth the trouble (default 0.005)")
    dg.add_argument("--out", help="where diagnosis.json and diagnosis.png go (default: the table's directory)")
    dg.set_defaults(func=c.diagnose)

    # ------------------------------------------------------------------------------------------- gate
    g = sub.add_parser("gate", parents=[_settings_flags("GateConfig (eco_ray/gate/config.py)",
                                                        "lr=0.003 --set epochs=500"), ctx_no_ray, js],
                       help="Step C: fit a gate on a derived dataset; exact evaluation vs. baselines",
                       description="Labels for any beta come from the stored statistics (u_k = q_k - beta * c_k, "
                                   "c_k relative to the deepest exit's cost, ties to the cheaper exit); the gate "
                                   "trains on the cached gate inputs in seconds. The evaluation on the validation "
                                   "split is exact (summed statistics) and always shows static depth at every "
                                   "exit and the per-image oracle.")
    g.add_argument("--derived", required=True, help="derived-dataset directory or the MLflow run id that logged it")
    g.add_argument("--beta", type=float, nargs="+", help="trade-off(s); a quality gate is fitted once for all "
                                                         "(default 0.05)")
    g.add_argument("--kind", choices=["classify", "quality", "budget"],
                   help="classify: the paper's gate, one per beta; quality: per-exit quality regression, any beta "
                        "(budget: its old name)")
    g.add_argument("--cost", choices=["gflops", "latency", "layers"], help="cost measure of the utility "
                                                                           "(default gflops: encoder GFLOPs)")
    g.add_argument("--name", help="run name (default gate-<kind>-<cost>-<UTC time>)")
    g.add_argument("--out", help="where to write the gate(s) (default <run-dir>/gates/<name>)")
    g.set_defaults(func=c.gate)

    # ------------------------------------------------------------------------------------------ sweep
    w = sub.add_parser("sweep", parents=[_settings_flags("SweepConfig (eco_ray/sweep/config.py)", "trials=100"),
                                         ctx, js],
                       help="Ray Tune + Optuna sweep of the trade-off (PQ up, GFLOPs down)",
                       description="Multi-objective sweep over a search space (shipped: default; format "
                                   "docs/stages.md#sweeps-eco-ray-sweep): each trial fits a gate on the derived table and evaluates it "
                                   "exactly (seconds). The Optuna study is named eco-ray-<sweep> and stored in "
                                   "<run-dir>/sweeps/<sweep>/optuna.db (or --storage). Every trial is one MLflow "
                                   "child run of the sweep's run, which gets the Pareto front and its plot. Trials "
                                   "fit on the training split minus a held-out share (--holdout, default 0.25) and "
                                   "are scored, budgeted and selected on that share; the validation split only "
                                   "reports (val_* metrics).")
    w.add_argument("--derived", help="derived-dataset directory (eco-ray derive)")
    w.add_argument("--space", help="search space: a YAML file or a shipped name (default: default)")
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
    w.add_argument("--storage", help="Optuna storage URL (default SQLite in the sweep directory; a password in it is "
                                     "never written to disk: give it again with --resume)")
    w.add_argument("--name", help="sweep name (default sweep-<UTC time>); a new sweep never reuses a name")
    w.add_argument("--resume", metavar="NAME", help="continue the stopped sweep NAME (runs only missing trials)")
    w.set_defaults(func=c.sweep)

    # ----------------------------------------------------------------------------------------- select
    sl = sub.add_parser("select", parents=[ctx_no_ray, js],
                        help="pick the best gate of a sweep under a budget; register it, move an alias",
                        description="Among the sweep's finished trials in MLflow (scored on the held-out training "
                                    "images): the highest PQ (AP for a detector's) within the budget, or the cheapest "
                                    "reaching --min-pq (--min-ap). The gate is registered (default eco-gate, "
                                    "eco-det-gate for a detector's) and the alias (default production) "
                                    "moved to it. A budget no trial meets is an error that shows the cheapest "
                                    "available point; the alias stays where it was. The same selection again "
                                    "returns the version it registered.")
    sl.add_argument("--sweep", required=True, help="sweep name")
    budget = sl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-gflops", type=float, help="mean encoder GFLOPs per image at most")
    budget.add_argument("--max-relative-gflops", type=float, help="mean encoder GFLOPs at most this share of full "
                                                                  "depth (0.7 = save 30%%)")
    budget.add_argument("--max-latency-ms", type=float, help="mean latency per image (ms, batch 1) at most")
    budget.add_argument("--max-relative-latency", type=float, help="mean latency at most this share of full depth")
    budget.add_argument("--min-pq", type=float, help="PQ at least (then the cheapest)")
    budget.add_argument("--min-ap", type=float, help="COCO AP at least (a detector's gates; then the cheapest)")
    sl.add_argument("--registered-model", help="registry name (default eco-gate; eco-det-gate for a detector's)")
    sl.add_argument("--alias", default="production", help="alias to move (default production)")
    sl.set_defaults(func=c.select)

    mo = sub.add_parser("models", parents=[ctx_no_ray, js],
                        help="list registered parents and gates with aliases and key metrics")
    mo.set_defaults(func=c.models)

    # --------------------------------------------------------------------------------------- pipeline
    pl = sub.add_parser(
        "pipeline", parents=[ctx, js],
        help="the main job: data -> train -> derive -> diagnose -> sweep -> select -> serve, stages reused",
        description="Run every stage (a local Ray, MLflow on SQLite under --run-dir, Serve on localhost, or the "
                    "cluster and servers given): generate the dataset, train the parent (Step A), derive the "
                    "per-exit table (Step B) and diagnose it, sweep gates with Ray Tune + Optuna (Step C), select "
                    "the best gate under the budget and move its alias, start the Serve app and send it real "
                    "requests, then print PQ and encoder GFLOPs of the static model vs. the selected ECO model. A "
                    "stage whose inputs did not change is reused (state in <run_dir>/pipeline/<name>/state.json); "
                    "a stopped training or sweep continues where it stopped. The default takes about 45 minutes "
                    "on 2 cores; --config smoke runs every stage in a few minutes; --config detection runs the "
                    "early-exit Deformable DETR through every stage (COCO AP, POST /v1/detect), about 50-55 minutes.")
    pl.add_argument("--config", help="YAML with PipelineConfig settings (eco_ray/pipeline/config.py), or the name of "
                                     "a shipped one (smoke, detection); --print-config shows every key")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set train.steps=2000 --set select.budget=max_gflops "
                         "--set select.limit=0.05")
    pl.add_argument("--from", dest="from_stage", choices=STAGES,
                    help="rerun this stage and every later one even if their inputs did not change")
    pl.add_argument("--keep-serving", action="store_true", help="keep the Serve app up after the summary")
    pl.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    pl.set_defaults(func=c.pipeline)

    # ------------------------------------------------------------------------------------------ serve
    sv = sub.add_parser("serve", parents=[ctx],
                        help="serve the selected gate + parent over HTTP with Ray Serve",
                        description="Starts the Serve application of a Serve config (default: the shipped one, "
                                    "deploy/serve_config.yaml; autoscaling, limits, batching) on a local Ray or "
                                    "--address, against the MLflow store, and prints the URL. POST /v1/segment "
                                    "with an image (POST /v1/detect when the parent is a detector); GET "
                                    "/v1/models, /healthz. Ctrl-C stops.")
    sv.add_argument("--config", help="Serve config YAML (default: the shipped one)")
    sv.add_argument("--parent", help="parent URI (default: the config's, models:/eco-parent/latest)")
    sv.add_argument("--gate", help="gate URI (default: the config's, models:/eco-gate@production)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.set_defaults(func=c.serve)

    kr = sub.add_parser("kuberay", help="KubeRay manifests (deploy/kuberay)")
    krsub = kr.add_subparsers(dest="kuberay_command", required=True)
    rr = krsub.add_parser("render", help="write the RayService's serveConfigV2 from the Serve config",
                          description="Render spec.serveConfigV2 of deploy/kuberay/rayservice.yaml from the shipped "
                                      "Serve config (http_options.host becomes 0.0.0.0).")
    rr.add_argument("--serve-config", help="Serve config YAML (default: the shipped one)")
    rr.add_argument("--rayservice", help="RayService manifest to update (default deploy/kuberay/rayservice.yaml)")
    rr.add_argument("--check", action="store_true", help="only check that the manifest is up to date (exit 1 if not)")
    rr.set_defaults(func=c.kuberay_render)
    return p
