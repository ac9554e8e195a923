"""The text reports the commands print (``--json`` prints the results themselves)."""

from __future__ import annotations

NAN = float("nan")


def dataset_report(report: dict) -> str:
    lines = [f"dataset {report['root']}",
             "categories: " + ", ".join(f"{c['name']}({'thing' if c['isthing'] else 'stuff'})"
                                        for c in report["categories"])]
    for split, d in report["splits"].items():
        lines.append(f"[{split}] {d['images']} images" + (f", kinds {d['kinds']}" if d.get("kinds") else ""))
        if d.get("objects_per_image"):
            lines.append(f"  objects per image: {d['objects_per_image']}")
        if d["self_check"]:
            sc = d["self_check"]
            lines.append(f"  ground truth vs itself: PQ {sc['pq']:.4f} (things {sc['pq_things']:.4f}, "
                         f"stuff {sc['pq_stuff']:.4f}), mIoU {sc['miou']:.4f}  [{d['seconds']} s]")
    return "\n".join(lines)


def prediction_score(score: dict, per_class: bool = False) -> str:
    lines = [f"{score['images']} images      PQ      SQ      RQ",
             *(f"{name:<12} {score['pq' + k]:.4f}  {score['sq' + k]:.4f}  {score['rq' + k]:.4f}"
               for name, k in (("all", ""), ("things", "_things"), ("stuff", "_stuff"))),
             f"mIoU {score['miou']:.4f}"]
    if "exits" in score:
        lines.append(f"mean encoder GFLOPs {score['encoder_gflops_mean']:.4f}; images per exit {score['exits']}; "
                     f"predictions in {score['predictions']}")
        if score.get("targets_missed"):
            lines.append(f"the target was missed for {score['targets_missed']} images: no exit meets it (they ran "
                         f"at the cheapest exit)")
    if per_class:
        def f(v):
            return "     -" if v is None else f"{v:.4f}"

        lines.append(f"{'category':<20} {'kind':<6} {'PQ':>6} {'SQ':>6} {'RQ':>6} {'IoU':>6} {'TP':>6} {'FP':>6} {'FN':>6}")
        for c in score["per_class"]:
            lines.append(f"{c['name'][:20]:<20} {'thing' if c['isthing'] else 'stuff':<6} {f(c['pq'])} {f(c['sq'])} "
                         f"{f(c['rq'])} {f(c['iou'])} {c['tp']:>6} {c['fp']:>6} {c['fn']:>6}")
    return "\n".join(lines)


def cost_table(table: dict, height: int, width: int) -> str:
    lines = [f"model {table['model']}, input {height}x{width}; GFLOPs per image, {table['gflops_convention']}",
             f"backbone + input projections {table['backbone_gflops']:.4f}, one encoder layer "
             f"{table['encoder_layer_gflops'][0]:.4f}, {table.get('head', 'FPN + decoder + heads')} {table['head_gflops']:.4f}"]
    lat = table["latency"]
    cols = [f"batch {b} ms" for b in lat["batch_sizes"]] if lat else []
    lines.append(f"{'exit':>4} {'encoder GFLOPs':>15} {'total GFLOPs':>13} {'encoder share':>14}" +
                 "".join(f" {c:>12}" for c in cols))
    for e in table["exits"]:
        row = f"{e['exit']:>4} {e['encoder_gflops']:>15.4f} {e['total_gflops']:>13.4f} {e['encoder_share']:>14.1%}"
        if lat:
            row += "".join(f" {e[f'latency_ms_batch{b}']:>12.2f}" for b in lat["batch_sizes"])
        lines.append(row)
    if lat:
        lines.append(f"latency: median of {lat['repeats']} runs, {lat['device']}, {lat['threads']} threads")
    return "\n".join(lines)


def training(summary: dict) -> str:
    return "\n".join([
        f"trained {summary['name']}: {summary['steps']} steps in {summary['seconds']:.0f} s",
        f"validation {summary.get('metric', 'pq').upper()} per exit: " + ", ".join(
            f"{k}: {v:.3f}" for k, v in summary[f"val_{summary.get('metric', 'pq')}_per_exit"].items() if v is not None),
        f"registered {summary['model_uri']} (MLflow run {summary['run_id']}, {summary['tracking_uri']})"])


def derived(m: dict, tolerance: float) -> str:
    lines = [f"derived dataset {m['path']} ({'reused' if m['reused'] else 'new'}; key {m['key']}, "
             f"MLflow run {m.get('mlflow_run_id')})",
             f"parent {m['parent']['uri']}" + (f" (version {m['parent']['version']})" if m['parent'].get('version') else "")]
    exits = m["exits"]
    for split, s in m["splits"].items():
        static = {int(k): v for k, v in s["static"].items()}
        lines.append(f"[{split}] {s['images']} images in {m['timings'].get(split, {}).get('seconds', '?')} s")
        if m.get("task", "panoptic") == "detection":
            lines.append("  static AP per exit:     " + ", ".join(f"{k}: {static[k]['ap']:.3f}" for k in exits))
            lines.append(f"  AP50 / AP75 at exit {exits[-1]}: {static[exits[-1]]['ap50']:.3f} / "
                         f"{static[exits[-1]]['ap75']:.3f}")
        else:
            lines.append("  static PQ per exit:     " + ", ".join(f"{k}: {static[k]['pq']:.3f}" for k in exits))
            lines.append(f"  things / stuff at exit {exits[-1]}: {static[exits[-1]]['pq_things']:.3f} / "
                         f"{static[exits[-1]]['pq_stuff']:.3f}")
        nf = s["noise_floor"]
        if "mean_abs_diff" in nf:
            lines.append(f"  label noise (plain vs flip, same exit): mean |dq| {nf['mean_abs_diff']:.3f}, "
                         f"{nf['share_above_tolerance']:.0%} of (image, exit) pairs move > {nf['tolerance']}")
        lines.append(f"  shallowest sufficient exit (within {tolerance} of exit {exits[-1]}): "
                     f"{s['sufficient_exit_histogram']}")
    costs = m["costs"]["exits"]
    lines.append("encoder GFLOPs per exit: " + ", ".join(f"{c['exit']}: {c['encoder_gflops']:.4f}" for c in costs))
    if "latency_ms" in costs[0]:
        lines.append("latency ms (batch 1):   " + ", ".join(f"{c['exit']}: {c['latency_ms']:.2f}" for c in costs))
    return "\n".join(lines)


def gate(run) -> str:
    fit = run.fit
    # a segmenter's PQ with things and stuff, or a detector's AP with AP50 and AP75
    names = ("pq", "pq_things", "pq_stuff") if fit.static[0].metric == "pq" else ("ap", "ap50", "ap75")
    labels = {"pq": "PQ", "pq_things": "things", "pq_stuff": "stuff", "ap": "AP", "ap50": "AP50", "ap75": "AP75"}
    head = f"{'':>22} " + " ".join(f"{labels[n]:>7}" for n in names) + f" {'GFLOPs':>8} {'p95':>7} {'ms':>6}  exits"

    def row(label, p):
        ms = f"{p.latency_ms_mean:>6.2f}" if p.latency_ms_mean is not None else f"{'-':>6}"  # not derived
        return (f"{label:>22} " + " ".join(f"{getattr(p, n):>7.3f}" for n in names) +
                f" {p.encoder_gflops_mean:>8.4f} {p.encoder_gflops_p95:>7.4f} {ms}  {p.exit_histogram}")

    lines = [f"{fit.kind} gate, cost {fit.cost}: fit {fit.fit_seconds:.2f} s, exact evaluation {fit.eval_seconds:.2f} s; "
             f"saved in {run.path} (MLflow run {run.run_id})", head]
    lines += [row(f"static exit {p.exit}", p) for p in fit.static]
    for e in fit.evaluations:
        lines += [row(f"gate beta={e.beta:g}", e.gate), row(f"oracle beta={e.beta:g}", e.oracle)]
    lines.append(f"trade-off plot: {run.plot}")
    return "\n".join(lines)


def sweep(s) -> str:
    rate = s.trials_per_minute
    key, m = s.objective_cost, s.metric
    label = m.upper()
    sel, ev = s.selection_split, s.eval_split
    where = (f"{sel['images']} held-out {sel['split']} images" if sel["held_out"] > 0 else
             f"the {sel['split']} split itself")
    lines = [f"sweep {s.name}: {s.complete} complete ({s.feasible} within budget), {s.failed} failed; "
             f"{s.trials_run_now} run now in {s.seconds:.0f} s" + (f" ({rate:.0f} trials/min)" if rate else ""),
             f"Pareto front ({label} up, {key} down) on {where}, {len(s.front)} points; then the same gate on "
             f"{ev['split']} ({ev['images']} images):"]
    for p in s.front:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p["params"].items())
        lines.append(f"  trial {p['number']:>4}: {label} {p[m]:.4f}  {key} {p[key]:.4f} | {ev['split']}: {label} "
                     f"{p.get('val_' + m, NAN):.4f}  {key} {p.get('val_' + key, NAN):.4f}  [{params}]")
    for where_label, rows in ((where, s.static), (ev["split"], s.static_val)):
        pts = [p for p in rows if getattr(p, key) is not None]
        lines.append(f"static depth on {where_label}: " + ", ".join(
            f"exit {p.exit}: {label} {p.quality:.4f} @ {p.cost(key):.4f}" for p in pts))
    lines.append(f"MLflow parent run {s.run_id}; plot {s.plot}")
    return "\n".join(lines)


def selection(r) -> str:
    c = r.chosen
    if "ap" in c:  # a detector's gate: COCO AP with AP50 and AP75
        figures = [("ap", "AP"), ("ap50", "AP50"), ("ap75", "AP75")]
    else:
        figures = [("pq", "PQ"), ("pq_things", "things"), ("pq_stuff", "stuff")]

    def quality(prefix: str) -> str:
        (main, label), *parts = figures
        return (f"{label} {c.get(prefix + main, NAN):.4f} (" +
                ", ".join(f"{n} {c.get(prefix + k, NAN):.4f}" for k, n in parts) + ")")

    lines = [f"selected trial {c['optuna_trial']} of sweep {r.sweep} ({r.candidates} candidates): {r.why}",
             f"  {quality('')}, {c['encoder_gflops_mean']:.4f} mean encoder GFLOPs"
             + (f", {c['latency_ms_mean']:.2f} ms" if c.get("latency_ms_mean") is not None else "")]
    if "val_" + figures[0][0] in c:
        lines.append(f"  on the validation split (never selected on): {quality('val_')}, "
                     f"{c.get('val_encoder_gflops_mean', NAN):.4f} mean encoder GFLOPs")
    lines += [f"  params: {c['params']}",
              f"registered {r.registered_model} version {r.version}; alias {r.alias!r} -> version {r.version} "
              f"({r.model_uri})"]
    return "\n".join(lines)


def models(rows: list[dict]) -> str:
    if not rows:
        return "no registered eco-parent or eco-gate models yet (eco-ray train registers parents, eco-ray select gates)"
    lines = []
    for r in rows:
        aliases = ("@" + ",@".join(r["aliases"])) if r["aliases"] else ""
        metrics = ", ".join(f"{k}={v}" for k, v in r["metrics"].items())
        tags = ", ".join(f"{k}={v}" for k, v in r["tags"].items())
        lines.append(f"{r['name']:>10} v{r['version']:<3} {aliases:<14} {metrics}" + (f"  [{tags}]" if tags else ""))
    return "\n".join(lines)


def diagnosis(d, plot) -> str:
    lines = [f"verdict: {d.verdict.upper()}  ({d.images} {d.split} images, {len(d.views)} views, {d.resamples} "
             f"bootstrap resamples, {d.seconds:.1f} s)"]
    lines += [f"  - {r}" for r in d.reasons]
    lines.append("")
    lines.append(f"{'':<34}" + "".join(f"{'exit ' + str(p['exit']):>9}" for p in d.static))
    label = d.metric.upper()
    lines.append(f"{'static ' + label:<34}" + "".join(f"{p[d.metric]:>9.4f}" for p in d.static))
    lines.append(f"{'encoder GFLOPs':<34}" + "".join(f"{p['encoder_gflops_mean']:>9.4f}" for p in d.static))
    for kind, row in d.per_kind_by_exit.items():
        lines.append(f"{'  ' + label + ' of ' + kind + ' images':<34}" + "".join(f"{row[p['exit']]:>9.4f}"
                                                                             for p in d.static))
    lines.append("")
    lines.append(f"{'lead over static at equal compute':<34}{'beta':>7}{label:>9}{'GFLOPs':>9}{'lead':>9}  95% interval")
    for name, leads in (("usual oracle (noise-inflated)", d.oracle), ("cross-view oracle (real)", d.cross_view_oracle),
                         ("gate", [d.gate] if d.gate else [])):
        for p in leads:
            beta = f"{p.beta:g}" if p.beta is not None else "-"
            lines.append(f"{name:<34}{beta:>7}{p.quality:>9.4f}{p.encoder_gflops_mean:>9.4f}{p.lead:>+9.4f}  "
                         f"[{p.lead_ci95[0]:+.4f}, {p.lead_ci95[1]:+.4f}]")
    lines.append("")
    rel = ", ".join(f"{k}: {v:+.2f}" for k, v in d.gain_reliability.items())
    lines.append(f"reliability of the gain to exit {d.exits[-1]} between views, by exit: {rel}")
    lines.append(f"probe ({d.probe_images} {d.probe_split} images, 5-fold ridge; ceiling {d.probe_ceiling:.2f}): " +
                 ", ".join(f"{p.input} {p.correlation:+.2f}" + (f" ({p.share:.0%})" if p.share is not None else "")
                           for p in d.probes))
    lines.append(f"plot: {plot}")
    return "\n".join(lines)
