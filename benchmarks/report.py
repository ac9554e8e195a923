"""The benchmark report: every benchmark of the project, run now on this machine, in one Markdown + JSON report.

    python benchmarks/report.py [--pipeline default] [--run-dir runs] [--out benchmarks/results] [--quick]

It reads what `eco-ray pipeline` produced (the parent, the derived table, the selected gate: see
<run_dir>/pipeline/<name>/state.json) and runs, one after the other on this machine:
  1. the per-exit cost table (GFLOPs counted, latency measured) - from the derived table's manifest;
  2. the trade-off on the validation split, exact from the derived statistics: static depth at every exit,
     the classification gate and the quality gate at the same betas, the oracle, and the
     selected ECO model;
  3. the derive ratio and the beta-change ratio (benchmarks/derive_gate.py);
  4. sweep throughput, TPE (benchmarks/sweep.py);
  4b. the verdict on the table (eco-ray diagnose) with the selected gate's lead and its interval;
  5. serving throughput and latency, gated vs. full depth, same replicas (benchmarks/serve_load.py);
  6. serving under overload, full depth vs. the fixed gate vs. load-adaptive depth (benchmarks/serve_overload.py);
  7. the detector (`eco-ray pipeline --config detection`, when its state exists): per-exit AP and GFLOPs, both
     gates, the oracle and the cross-view oracle, the selected gate and its lead with an interval, under the
     report's ``detection`` key (``--skip-panoptic``: that key alone);
  8. with ``--depth-need <run_dir>/pipeline/<name>``: that pipeline judged as the issue "Where depth pays" asks
     (static line, cross-view oracle lead, the selected gate's validation lead and capture, PQ per exit per
     kind, each bar met or not) under ``depth_need``, with a control pipeline beside it in the same format.
Writes <out>/report.json, <out>/report.md and the plots beside them. Every figure comes from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BETAS = (0.02, 0.1, 0.3)


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem,
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_json(args: list[str], timeout: float) -> dict:
    """A benchmark script's --json output (its progress goes to our stderr)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    lines = r.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")  # libraries may print before the JSON
    out = json.loads("\n".join(lines[start:]))
    print(f"[report] {args[0]}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


QUALITY_KEYS = {"pq": ("pq", "pq_things", "pq_stuff", "miou"), "ap": ("ap", "ap50", "ap75")}


def tradeoff(derived: str, selected: dict) -> tuple[list[dict], dict]:
    """Static depth, both gates at BETAS, the oracle, the cross-view oracle and the selected gate on the
    validation split, in the table's metric (PQ or AP), each beside the static curve at its compute."""
    from eco_ray.derive.table import DerivedDataset, relative_costs
    from eco_ray.gate.config import GateConfig
    from eco_ray.gate.evaluate import cross_view_oracle_point, fit_and_evaluate
    from eco_ray.results import static_at

    ds = DerivedDataset.open(derived)
    metric = ds.metric
    keys = (*QUALITY_KEYS[metric], "encoder_gflops_mean", "encoder_gflops_p95", "latency_ms_mean", "exit_histogram")
    gain = f"{metric}_gain_vs_static_at_same_gflops"
    pick = lambda point: {k: v for k, v in point.to_json().items() if k in keys}  # noqa: E731
    classify = fit_and_evaluate(ds, GateConfig(kind="classify"), list(BETAS))
    quality = fit_and_evaluate(ds, GateConfig(kind="quality"), list(BETAS))
    points: list[dict] = [{"method": "static", "exit": p.exit, **pick(p)} for p in classify.static]
    for method, result in (("gate", classify), ("quality_gate", quality)):
        points += [{"method": method, "beta": e.beta, **pick(e.gate)} for e in result.evaluations]
    points += [{"method": "oracle", "beta": e.beta, **pick(e.oracle)} for e in classify.evaluations]
    val, rel = ds.split("val"), relative_costs(ds.costs("gflops"))
    if len(val.views) > 1:  # the oracle without the label noise it profits from
        points += [{"method": "oracle_cross_view", "beta": b, **pick(cross_view_oracle_point(
            val, ds.categories, ds.cost_columns(), rel, b))} for b in BETAS]
    for p in points:  # the equal-compute baseline of every point: the static curve at its mean GFLOPs
        p[gain] = p[metric] - static_at(classify.static, p["encoder_gflops_mean"])
    chosen = selected["chosen"]
    # the validation figures of the selected gate (val_*): the sweep selected on held-out training images
    eco: dict = {"method": "selected", "model_uri": selected["model_uri"], "params": chosen.get("params"),
                 **{k: chosen.get(f"val_{k}", chosen.get(k)) for k in (*QUALITY_KEYS[metric][:3],
                                                                      "encoder_gflops_mean", "latency_ms_mean")
                    if f"val_{k}" in chosen or k in chosen}}
    timings = {"classify_fit_s": classify.fit_seconds, "quality_fit_s": quality.fit_seconds}
    eco[gain] = eco[metric] - static_at(classify.static, eco["encoder_gflops_mean"])
    return points + [eco], timings


def pipeline_state(run_dir: str, name: str, required: bool = True) -> dict | None:
    """The outputs of a finished pipeline's stages (None: no such pipeline ran here, or, unless ``required``,
    it has not finished)."""
    path = Path(run_dir) / "pipeline" / name / "state.json"
    if not path.is_file():
        return None
    state = {k: v["output"] for k, v in json.loads(path.read_text()).items() if isinstance(v, dict) and "output" in v}
    for stage in ("train", "derive", "select"):
        if stage not in state:
            if required:
                sys.exit(f"the pipeline {name!r} has not finished its {stage} stage ({path})")
            print(f"[report] the pipeline {name!r} has not finished its {stage} stage: left out", file=sys.stderr)
            return None
    summary = path.parent / "summary.json"
    state["summary"] = json.loads(summary.read_text()) if summary.is_file() else None
    return state


def detection_section(state: dict, name: str, ctx, out: Path) -> dict:
    """The detector's part of the report: its table's trade-off in AP and the verdict with the selected
    gate's lead, on validation (the gate was selected on held-out training images)."""
    from eco_ray.derive.table import DerivedDataset

    derived, train, selected = state["derive"], state["train"], state["select"]
    manifest = DerivedDataset.open(derived["path"]).manifest
    points, timings = tradeoff(derived["path"], selected)
    diag = diagnosis(derived["path"], ctx, selected["model_uri"])
    static = [p for p in points if p["method"] == "static"]
    full, eco = static[-1], points[-1]
    same = [p for p in static if p["encoder_gflops_mean"] <= eco["encoder_gflops_mean"] + 1e-12]
    val = manifest["splits"]["val"]
    best = lambda method: max((p for p in points if p["method"] == method),  # noqa: E731
                              key=lambda p: p["ap_gain_vs_static_at_same_gflops"], default=None)
    plot = plot_tradeoff(points, out / "report_detection_tradeoff.png",
                         f"detector {train['model_uri']}, {val['images']} val images", metric="ap")
    summary = state.get("summary") or {}
    return {
        "config": {"pipeline": name, "parent": train["model_uri"], "parent_steps": train["steps"],
                   "parent_train_seconds": train["seconds"], "derived_key": manifest["key"],
                   "views": manifest["views"], "train_images": manifest["splits"].get("train", {}).get("images"),
                   "val_images": val["images"], "selected_gate": selected["model_uri"],
                   "selection": {k: selected[k] for k in ("budget", "why")}, "betas": list(BETAS),
                   "pipeline_seconds": summary.get("seconds"), "stage_seconds": summary.get("stage_seconds")},
        "per_exit": [{k: p[k] for k in ("exit", "ap", "ap50", "ap75", "encoder_gflops_mean")} for p in static],
        "tradeoff": points,
        "best_gain_vs_static": {m: best(m) for m in ("gate", "quality_gate", "oracle", "oracle_cross_view")},
        "selected_vs_static": {
            "static_exit": full["exit"], "static_ap": full["ap"], "static_gflops": full["encoder_gflops_mean"],
            "eco_ap": eco["ap"], "eco_gflops": eco["encoder_gflops_mean"],
            "encoder_gflops_saved": 1 - eco["encoder_gflops_mean"] / full["encoder_gflops_mean"],
            "ap_lost": full["ap"] - eco["ap"], "val_lead": diag["gate_lead"], "val_lead_ci95": diag["gate_lead_ci95"],
            "static_same_compute": {k: same[-1][k] for k in ("exit", "ap", "encoder_gflops_mean")} if same else None},
        "diagnose": {k: v for k, v in diag.items() if k != "full"},
        "gate_fit_seconds": timings,
        "plot": plot.name,
    }


# issue "Where depth pays": what a depth-need regime must show on validation (a bar is never moved to fit a result)
DEPTH_NEED_BARS = {"cross_view_oracle_lead": 0.03, "selected_gate_val_lead": 0.01, "captured_share": 0.5,
                   "encoder_gflops_saved": 0.30, "pq_lost": 0.01}


def pipeline_dir_state(path: str, required: bool = True):
    """(state, name, run context) of the finished pipeline whose directory (``<run_dir>/pipeline/<name>``) is
    ``path``, its models read from that run directory's tracking store; None where it has not finished and is
    not ``required``."""
    from eco_ray.context import RunContext

    where = Path(path)
    state = pipeline_state(str(where.parent.parent), where.name, required=required)
    if state is None:
        if required:
            sys.exit(f"no pipeline state at {where}: give <run_dir>/pipeline/<name> of a finished `eco-ray pipeline`")
        return None
    return state, where.name, RunContext.create(where.parent.parent)


def depth_need_section(state: dict, name: str, ctx, out: Path, plot_name: str | None = None) -> dict:
    """One pipeline judged as the issue "Where depth pays" asks, on validation: the static line, the cross-view
    oracle's lead (bootstrap 95% interval), the gate selected on held-out training images and its lead, the
    share of the oracle's lead it captures at its compute, PQ per exit per kind, and each bar met or not."""
    from eco_ray.derive.table import DerivedDataset
    from eco_ray.model.io import CONFIG

    derived, train, selected = state["derive"], state["train"], state["select"]
    manifest = DerivedDataset.open(derived["path"]).manifest
    points, _ = tradeoff(derived["path"], selected)
    diag = diagnosis(derived["path"], ctx, selected["model_uri"])
    full_diag = diag["full"]
    static = [p for p in points if p["method"] == "static"]
    full, eco = static[-1], points[-1]
    meta_file = Path(train.get("parent_dir") or "") / CONFIG
    parent_meta = json.loads(meta_file.read_text()) if train.get("parent_dir") and meta_file.is_file() else {}
    synth = Path(state["data"]["root"]) / "eco_ray_synth.json" if "data" in state else None
    gate = {"val_pq": eco["pq"], "encoder_gflops_mean": eco["encoder_gflops_mean"],
            "val_lead": diag["gate_lead"], "val_lead_ci95": diag["gate_lead_ci95"],
            "captured_share": full_diag.get("gate_capture"),
            "encoder_gflops_saved": 1 - eco["encoder_gflops_mean"] / full["encoder_gflops_mean"],
            "pq_lost": full["pq"] - eco["pq"], "model_uri": selected["model_uri"]}
    b = DEPTH_NEED_BARS
    lead, (lo, hi) = diag["cross_view_oracle_lead"], diag["cross_view_oracle_lead_ci95"]
    bars = {
        "cross_view_oracle_lead >= +0.03 at some beta": lead >= b["cross_view_oracle_lead"],
        "selected gate's val lead >= +0.01, interval above 0": gate["val_lead"] is not None and
        gate["val_lead"] >= b["selected_gate_val_lead"] and gate["val_lead_ci95"][0] > 0,
        "captures >= 50% of the cross-view oracle's lead at its compute": gate["captured_share"] is not None and
        gate["captured_share"] >= b["captured_share"],
        ">= 30% encoder GFLOPs saved at <= 0.01 PQ lost": gate["encoder_gflops_saved"] >= b["encoder_gflops_saved"]
        and gate["pq_lost"] <= b["pq_lost"]}
    val = manifest["splits"]["val"]
    plot = plot_tradeoff(points, out / f"report_depth_need_{plot_name or name}.png",
                         f"{name}: parent {train['model_uri']}, {val['images']} val images")
    return {
        "config": {"pipeline": name, "parent": train["model_uri"], "parent_steps": train["steps"],
                   "model": parent_meta.get("model"), "data": json.loads(synth.read_text())["request"]
                   if synth is not None and synth.is_file() else {"root": state.get("data", {}).get("root")},
                   "derived_key": manifest["key"], "views": manifest["views"], "val_images": val["images"],
                   "train_images": manifest["splits"].get("train", {}).get("images"), "betas": list(BETAS),
                   "selection": {k: selected[k] for k in ("budget", "why")}},
        "static": [{k: p[k] for k in ("exit", "pq", "encoder_gflops_mean")} for p in static],
        "cross_view_oracle_lead": lead, "cross_view_oracle_lead_ci95": [lo, hi],
        "cross_view_oracle_beta": diag["cross_view_oracle_beta"],
        "cross_view_oracle": full_diag["cross_view_oracle"],
        "selected_gate": gate,
        "per_kind_pq_by_exit": full_diag.get("per_kind_by_exit"),
        "verdict": diag["verdict"],
        "gate_pays": bool(gate["val_lead_ci95"] and gate["val_lead_ci95"][0] > 0),
        "bars": bars, "all_bars_met": all(bars.values()),
        "tradeoff": points, "plot": plot.name,
    }


def depth_need_markdown(d: dict) -> list[str]:
    lines = ["", "## Where depth pays (validation; the gate selected on held-out training images)", ""]
    for part in (d, d.get("control")):
        if not part:
            continue
        c, g = part["config"], part["selected_gate"]
        lo, hi = part["cross_view_oracle_lead_ci95"]
        lead = "n/a" if g["val_lead"] is None else \
            f"{g['val_lead']:+.4f} [{g['val_lead_ci95'][0]:+.4f}, {g['val_lead_ci95'][1]:+.4f}]"
        lines += [f"### `{c['pipeline']}`{' (control)' if part is d.get('control') else ''}: {c['val_images']} val "
                  f"images, parent {c['parent']} ({c['parent_steps']} steps)", "",
                  "static PQ by exit: " + ", ".join(f"{p['exit']}: {p['pq']:.3f}" for p in part["static"]), "",
                  "| kind | " + " | ".join(f"exit {p['exit']}" for p in part["static"]) + " |",
                  "|---|" + "---|" * len(part["static"])]
        for kind, by_exit in (part["per_kind_pq_by_exit"] or {}).items():
            lines.append(f"| {kind} | " + " | ".join(f"{by_exit.get(str(p['exit']), float('nan')):.3f}"
                                                   for p in part["static"]) + " |")
        lines += ["", f"Cross-view oracle lead {part['cross_view_oracle_lead']:+.4f} [{lo:+.4f}, {hi:+.4f}] PQ "
                  f"(beta {part['cross_view_oracle_beta']:g}); selected gate PQ {g['val_pq']:.4f} at "
                  f"{g['encoder_gflops_mean']:.4f} GFLOPs ({g['encoder_gflops_saved']:.1%} saved, {g['pq_lost']:+.4f} "
                  f"PQ lost), lead over static depth {lead}"
                  + (f", {g['captured_share']:.0%} of the cross-view oracle's lead there" if g["captured_share"]
                     is not None else "") + f". The selected gate **{'pays' if part['gate_pays'] else 'does not pay'}"
                  f"** (its lead's interval {'above' if part['gate_pays'] else 'not above'} 0); `eco-ray diagnose`'s "
                  f"verdict on the table (a cross-view lead beyond 0.005 PQ): {part['verdict']}.", ""]
        lines += [f"- {'met' if ok else 'not met'}: {bar}" for bar, ok in part["bars"].items()]
        lines += ["", f"![trade-off {c['pipeline']}]({part['plot']})", ""]
    return lines


def tradeoff_table(points: list[dict], metric: str, labels: tuple[str, ...]) -> list[str]:
    """The trade-off points as a Markdown table: the metric and its two parts, cost, gain over static depth."""
    keys = QUALITY_KEYS[metric][:3]
    lines = [f"| method | exit / beta | {' | '.join(labels)} | mean enc. GFLOPs | {labels[0]} vs static at that "
             f"compute | exits |", "|---|---|" + "---|" * len(labels) + "---|---|---|"]
    for p in points:
        at = p.get("exit", p.get("beta", ""))
        cells = " | ".join(f"{p.get(k, float('nan')):.4f}" for k in keys)
        lines.append(f"| {p['method']} | {at} | {cells} | {p['encoder_gflops_mean']:.4f} | "
                     f"{p[f'{metric}_gain_vs_static_at_same_gflops']:+.4f} | {p.get('exit_histogram', '')} |")
    return lines


def detection_markdown(d: dict) -> list[str]:
    c, s, dg = d["config"], d["selected_vs_static"], d["diagnose"]
    lo, hi = dg["cross_view_oracle_lead_ci95"]
    lines = ["", "## Object detection (`eco-ray pipeline --config detection`)", "",
             f"Parent {c['parent']} ({c['parent_steps']} steps), table `{c['derived_key']}` ({c['train_images']} train "
             f"/ {c['val_images']} val images), selected gate {c['selected_gate']}; COCO box AP (IoU .50:.95) on "
             f"validation, exact from the table's matching records.", "",
             *tradeoff_table(d["tradeoff"], "ap", ("AP", "AP50", "AP75"))]
    lead = s["val_lead"]
    lines += ["", f"![detection trade-off]({d['plot']})", "",
              f"Verdict: **{dg['verdict']}**; the cross-view oracle leads static depth by "
              f"{dg['cross_view_oracle_lead']:+.4f} [{lo:+.4f}, {hi:+.4f}] AP (beta {dg['cross_view_oracle_beta']:g}). "
              f"The selected gate: AP {s['eco_ap']:.4f} at {s['eco_gflops']:.4f} GFLOPs against full depth's "
              f"{s['static_ap']:.4f} at {s['static_gflops']:.4f} ({s['encoder_gflops_saved']:.1%} saved)"
              + (f"; its lead over static depth at equal compute {lead:+.4f} [{s['val_lead_ci95'][0]:+.4f}, "
                 f"{s['val_lead_ci95'][1]:+.4f}] AP: it "
                 f"{'beats' if s['val_lead_ci95'][0] > 0 else 'does not beat'} static depth" if lead is not None
                 else "") + "."]
    return lines


def diagnosis(derived: str, ctx, gate_uri: str | None) -> dict:
    """The verdict on the table (eco-ray diagnose) with the selected gate's lead, under the report's
    ``diagnose`` key (its headline figures first, the whole diagnosis beside them)."""
    from eco_ray.diagnose import diagnose_table

    d, plot = diagnose_table(derived, ctx, gate=gate_uri, log_to_mlflow=False)
    best = d.cross_view_oracle_lead
    return {"verdict": d.verdict, "label_noise_share": d.label_noise_share,
            "gain_reliability": d.gain_reliability.get(d.exits[0]), "cross_view_oracle_lead": best.lead,
            "cross_view_oracle_lead_ci95": list(best.lead_ci95), "cross_view_oracle_beta": best.beta,
            "probe_share": d.probes[0].share if d.probes else None,
            "gate_lead": d.gate.lead if d.gate else None, "gate_lead_ci95": list(d.gate.lead_ci95) if d.gate else None,
            "reasons": d.reasons, "plot": str(plot), "seconds": d.seconds, "resamples": d.resamples,
            "images": d.images, "full": d.to_json()}


def plot_tradeoff(points: list[dict], path: Path, title: str, metric: str = "pq") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    style = {"static": ("o-", "0.3"), "oracle": ("--", "tab:green"), "gate": ("s:", "tab:blue"),
             "quality_gate": ("^:", "tab:orange"), "oracle_cross_view": ("x--", "tab:olive"),
             "selected": ("*", "tab:red")}
    for method, (fmt, colour) in style.items():
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["encoder_gflops_mean"])
        if not pts:
            continue
        ax.plot([p["encoder_gflops_mean"] for p in pts], [p[metric] for p in pts], fmt, color=colour,
                ms=12 if method == "selected" else 6, label={"static": "static depth", "gate": "classify gate",
                                                               "quality_gate": "quality gate", "oracle": "oracle",
                                                               "oracle_cross_view": "oracle, picked on the flipped view",
                                                               "selected": "selected ECO model"}[method])
        for p in pts:
            label = f"exit {p['exit']}" if "exit" in p else (f"β={p['beta']:g}" if "beta" in p else "")
            ax.annotate(label, (p["encoder_gflops_mean"], p[metric]), textcoords="offset points", xytext=(3, -10),
                        fontsize=6, color=colour)
    ax.set_xlabel("mean encoder GFLOPs per image (validation)")
    ax.set_ylabel(f"{'PQ' if metric == 'pq' else 'COCO box AP'} (validation, dataset level)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_serving(serving: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(serving)
    fig, axes = plt.subplots(1, 3, figsize=(8, 3))
    for ax, key, label in zip(axes, ("rps", "p50_ms", "p99_ms"), ("requests/s", "p50 latency (ms)", "p99 latency (ms)")):
        ax.bar(modes, [serving[m][key] for m in modes], color=["tab:blue", "0.5", "tab:cyan"][:len(modes)])
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def markdown(r: dict) -> str:
    m = r["machine"]
    head = [
        "# eco-ray benchmark report", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']} "
        f"({m['torch_threads']} threads), GPU: {m['gpu'] or 'none'}; host {m['host']}; {m['date_utc']}.",
    ]
    tail = (detection_markdown(r["detection"]) if r.get("detection") else []) + \
        (depth_need_markdown(r["depth_need"]) if r.get("depth_need") else [])
    if "tradeoff" not in r:  # --skip-panoptic
        return "\n".join(head + tail)
    lines = head + [
        f"Config: pipeline `{r['config']['pipeline']}`, parent {r['config']['parent']}, derived table "
        f"`{r['config']['derived_key']}` ({r['config']['train_images']} train / {r['config']['val_images']} val images), "
        f"selected gate {r['config']['selected_gate']}. Every figure below was measured in this one run on this "
        "machine, except where it says it was read from the pipeline's run.", "",
        "## Per-exit cost (batch 1; GFLOPs counted as fvcore would: linear/conv/matmul)", "",
        "| exit | encoder GFLOPs | total GFLOPs | latency ms |", "|---|---|---|---|",
    ]
    for c in r["exit_costs"]["exits"]:
        lines.append(f"| {c['exit']} | {c['encoder_gflops']:.4f} | {c.get('total_gflops', float('nan')):.4f} | "
                     f"{c.get('latency_ms', float('nan')):.2f} |")
    dg = r["diagnose"]
    lo, hi = dg["cross_view_oracle_lead_ci95"]
    lines += ["", "## Will adaptive depth pay off here? (`eco-ray diagnose`)", "",
              f"Verdict: **{dg['verdict']}**. Cross-view oracle lead over static depth at equal compute "
              f"{dg['cross_view_oracle_lead']:+.4f} [{lo:+.4f}, {hi:+.4f}] (beta {dg['cross_view_oracle_beta']:g}); "
              f"label noise share {dg['label_noise_share']:.0%}; gain reliability {dg['gain_reliability']:+.2f}; "
              f"probe share {dg['probe_share'] if dg['probe_share'] is None else format(dg['probe_share'], '.0%')}"
              + (f"; selected gate's lead {dg['gate_lead']:+.4f} [{dg['gate_lead_ci95'][0]:+.4f}, "
                 f"{dg['gate_lead_ci95'][1]:+.4f}]" if dg["gate_lead"] is not None else "") + ".", ""]
    lines += [f"- {reason}" for reason in dg["reasons"]]
    lines += ["", "## Trade-off on the validation split (exact, from the derived statistics)", "",
              *tradeoff_table(r["tradeoff"], "pq", ("PQ", "things", "stuff"))]
    s = r["selected_vs_static"]
    lines += ["", f"![trade-off]({r['plots']['tradeoff']})", "",
              f"**Selected ECO model vs. the static (full-depth) model:** encoder GFLOPs saved "
              f"{s['encoder_gflops_saved']:.1%}, PQ lost {s['pq_lost']:+.4f} "
              f"(static exit {s['static_exit']}: PQ {s['static_pq']:.4f} at {s['static_gflops']:.4f} GFLOPs; selected: "
              f"PQ {s['eco_pq']:.4f} at {s['eco_gflops']:.4f}). The static exit with no more compute than the "
              f"selected model (exit {s['static_same_compute']['exit']}) has PQ {s['static_same_compute']['pq']:.4f}: "
              f"the gate {'beats' if s['eco_pq'] > s['static_same_compute']['pq'] else 'does not beat'} static depth "
              "at equal compute.", "",
              f"Shallowest sufficient exit per validation image (within "
              f"{r['sufficient_tolerance']} per-image PQ of the deepest exit): {r['sufficient_exit_histogram']}; "
              f"label noise (plain vs. flipped image, same exit): mean |dq| {r['noise_floor']['mean_abs_diff']:.3f}, "
              f"{r['noise_floor']['share_above_tolerance']:.0%} of (image, exit) pairs move more than "
              f"{r['noise_floor']['tolerance']}. `oracle_cross_view` picks each image's exit on the flipped image and "
              "scores it on the plain one: its lead over static depth is what the images' real differences in needed "
              "depth are worth; the usual oracle's larger lead is mostly the label noise it sees.", "",
              "## Step B and C costs", "",
              f"- derive ratio (all exits from one multi-exit pass vs. one forward per exit, per image): "
              f"**{r['derive_ratio']:.3f}** ({r['derive']['one_pass_ms_per_image']:.1f} vs "
              f"{r['derive']['separate_ms_per_image']:.1f} ms/image)",
              f"- beta-change ratio (one parent pass over the training split / a gate fit + exact evaluation): "
              f"**{r['beta_change_ratio']:.0f}x**",
              f"- sweep throughput (TPE, concurrency {r['sweep']['concurrency']}): "
              f"**{r['sweep_trials_per_minute']:.1f} trials/min**", "",
              "## Serving (Ray Serve on loopback, same replicas, gated vs. forced full depth)", "",
              "| mode | req/s | p50 ms | p99 ms | mean enc. GFLOPs |", "|---|---|---|---|---|"]
    for mode, v in r["serving"].items():
        lines.append(f"| {mode} | {v['rps']:.1f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
                     f"{v.get('encoder_gflops_mean', float('nan')):.4f} |")
    sv = r["serving_setup"]
    lines += ["", f"{sv['replicas']} Segmenter replica(s), {sv['clients']} concurrent clients, {sv['seconds_per_mode']} s "
              f"per mode on {sv['images']} validation images; throughput ratio gated / full depth "
              f"{sv['rps_ratio_gated_vs_full']:.3f}.", "", f"![serving]({r['plots']['serving']})", "",
              f"Where a replica's time goes (in process, batch {r['serving_profile']['batch']}, "
              f"{r['serving_profile']['threads']} thread, median ms per batch; "
              "benchmarks/diagnostics/serve_profile.py):", "", "| part | gated | full depth |", "|---|---|---|"]
    prof = r["serving_profile"]["median_ms_per_batch"]
    for k in prof["full_depth"]:
        lines.append(f"| {k} | {prof['gated'].get(k, 0):.1f} | {prof['full_depth'][k]:.1f} |")
    lines.append("")
    if r.get("serving_overload"):
        from serve_overload import markdown_lines

        lines += markdown_lines(r["serving_overload"])
    return "\n".join(lines + tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--pipeline", default="default", help="pipeline name whose outputs to benchmark (default default)")
    p.add_argument("--detection-pipeline", default="detection",
                   help="the detection pipeline for the report's detection key, when it ran (default detection)")
    p.add_argument("--depth-need", metavar="DIR", help="a finished pipeline (<run_dir>/pipeline/<name>) to judge "
                   "under the report's depth_need key, as the issue 'Where depth pays' asks")
    p.add_argument("--depth-need-control", metavar="DIR", help="the control pipeline reported beside it in the same "
                   "format (default: --pipeline's, when it ran under --run-dir)")
    p.add_argument("--skip-panoptic", action="store_true",
                   help="no panoptic benchmarks: the detection key and/or the depth_need key alone")
    p.add_argument("--run-dir", default="runs")
    p.add_argument("--out", default="benchmarks/results", help="where report.json/.md and plots go")
    p.add_argument("--serve-seconds", type=float, default=20, help="load per serving mode (default 20 s)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--sweep-trials", type=int, default=40)
    args = p.parse_args()

    from eco_ray.context import RunContext

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext.create(args.run_dir)
    t0 = time.perf_counter()
    detector = pipeline_state(args.run_dir, args.detection_pipeline,
                              required=args.skip_panoptic and not args.depth_need)
    if args.skip_panoptic:
        if detector is None and not args.depth_need:
            sys.exit(f"no detection pipeline {args.detection_pipeline!r} under {args.run_dir}: run `eco-ray pipeline "
                     f"--config detection` first")
        report = {"machine": machine()}
        if detector is not None:
            report["detection"] = detection_section(detector, args.detection_pipeline, ctx, out)
    else:
        report = panoptic_report(args, ctx, out)
        if detector is not None:
            report["detection"] = detection_section(detector, args.detection_pipeline, ctx, out)
        else:
            print(f"[report] no detection pipeline {args.detection_pipeline!r}: the report has no detection key",
                  file=sys.stderr)
    if args.depth_need:
        report["depth_need"] = depth_need_section(*pipeline_dir_state(args.depth_need), out)
        control = args.depth_need_control or str(Path(args.run_dir) / "pipeline" / args.pipeline)
        if Path(control).resolve() != Path(args.depth_need).resolve():
            found = pipeline_dir_state(control, required=bool(args.depth_need_control))
            if found is None:
                print(f"[report] no finished control pipeline at {control}: depth_need has no control", file=sys.stderr)
            else:
                report["depth_need"]["control"] = depth_need_section(*found, out, plot_name="control")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(markdown(report))
    print(f"wrote {out / 'report.md'} and {out / 'report.json'} in {report['seconds']:.0f} s")


def panoptic_report(args, ctx, out: Path) -> dict:
    state = pipeline_state(args.run_dir, args.pipeline)
    if state is None:
        sys.exit(f"no pipeline state at {Path(args.run_dir) / 'pipeline' / args.pipeline}: run `eco-ray pipeline` first")
    derived, train, selected = state["derive"], state["train"], state["select"]
    from eco_ray.derive.table import DerivedDataset

    tracking = ctx.tracking_uri
    manifest = DerivedDataset.open(derived["path"]).manifest
    points, fit_timings = tradeoff(derived["path"], selected)
    diag = diagnosis(derived["path"], ctx, selected["model_uri"])
    dg = run_json(["benchmarks/derive_gate.py", "--derived", derived["path"], "--tracking-uri", tracking], 1800)
    sw = run_json(["benchmarks/sweep.py", "--derived", derived["path"], "--samplers", "tpe", "--trials",
                   str(args.sweep_trials)], 1800)
    sl = run_json(["benchmarks/serve_load.py", "--parent", train["model_uri"], "--gate", selected["model_uri"],
                   "--data-root", manifest["data"]["root"], "--tracking-uri", tracking, "--seconds",
                   str(args.serve_seconds), "--clients", str(args.clients)], 1800)
    sp = run_json(["benchmarks/diagnostics/serve_profile.py", "--parent", train["model_uri"], "--gate",
                   selected["model_uri"], "--data-root", manifest["data"]["root"], "--tracking-uri", tracking], 1800)
    so = run_json(["benchmarks/serve_overload.py", "--parent", train["model_uri"], "--gate", selected["model_uri"],
                   "--derived", derived["path"], "--tracking-uri", tracking, "--out-dir", str(out)], 3600)

    static = [p for p in points if p["method"] == "static"]
    full, eco = static[-1], points[-1]
    same = [p for p in static if p["encoder_gflops_mean"] <= eco["encoder_gflops_mean"] + 1e-12]
    val = manifest["splits"]["val"]
    report = {
        "machine": machine(),
        "config": {"pipeline": args.pipeline, "parent": train["model_uri"], "parent_steps": train["steps"],
                   "parent_train_seconds": train["seconds"], "derived_key": manifest["key"],
                   "derived_config": manifest["config"], "views": manifest["views"],
                   "train_images": manifest["splits"].get("train", {}).get("images"), "val_images": val["images"],
                   "selected_gate": selected["model_uri"], "selection": {k: selected[k] for k in ("budget", "why")},
                   "betas": list(BETAS)},
        "exit_costs": manifest["costs"],
        "tradeoff": points,
        "selected_vs_static": {
            "static_exit": full["exit"], "static_pq": full["pq"], "static_gflops": full["encoder_gflops_mean"],
            "eco_pq": eco["pq"], "eco_gflops": eco["encoder_gflops_mean"],
            "encoder_gflops_saved": 1 - eco["encoder_gflops_mean"] / full["encoder_gflops_mean"],
            "pq_lost": full["pq"] - eco["pq"],
            "static_same_compute": {k: same[-1][k] for k in ("exit", "pq", "encoder_gflops_mean")} if same else None},
        "diagnose": {k: v for k, v in diag.items() if k != "full"},
        "diagnose_full": diag["full"],
        "sufficient_exit_histogram": val["sufficient_exit_histogram"],
        "sufficient_tolerance": manifest["config"]["sufficient_tolerance"],
        "noise_floor": val["noise_floor"],
        "derive": dg["derive"], "derive_ratio": dg["derive"]["time_ratio"],
        "beta_change": dg["beta_change"], "beta_change_ratio": dg["beta_change"]["ratio"],
        "gate_fit_seconds": fit_timings,
        "sweep": {"trials": sw["samplers"]["tpe"]["trials"], "concurrency": sw["concurrency"],
                  "hypervolume": sw["samplers"]["tpe"]["hypervolume"], "static_hypervolume": sw["static_hypervolume"]},
        "sweep_trials_per_minute": sw["samplers"]["tpe"]["trials_per_minute"],
        "serving": {"gated": sl["results"]["gated"], "full_depth": sl["results"]["full_depth"],
                    "gated_again": sl["results"]["gated_again"]},
        "serving_profile": sp,
        "serving_overload": so,
        "serving_setup": {k: sl[k] for k in ("replicas", "clients", "seconds_per_mode", "images", "parent", "gate",
                                             "rps_ratio_gated_vs_full")},
    }
    title = f"{report['machine']['cpu']} x{report['machine']['cores']}; parent {train['model_uri']}"
    report["plots"] = {"tradeoff": plot_tradeoff(points, out / "report_tradeoff.png", title).name,
                       "serving": plot_serving(report["serving"], out / "report_serving.png", title).name}
    return report


if __name__ == "__main__":
    main()
