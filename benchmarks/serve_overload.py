"""Overload benchmark of the Serve deployment on loopback, one run, same replicas for every mode: an open-loop
load (Poisson arrivals, seeded) stepping through fractions of the full-depth capacity, for

- ``full_depth``: every request forced to the deepest exit;
- ``fixed_gate``: the selected gate at its own beta, load-adaptive depth off;
- ``adaptive``: the same gate with load-adaptive depth on (the shipped ``adaptive`` knobs, ``enabled: true``);
- ``full_depth_shed``: full depth with shedding alone (the policy's floor at the deepest exit, ``shed_held``);
- ``adaptive_shed``: load-adaptive depth and the same shedding.

Per step and mode: goodput (answers within the latency SLO per second), p50/p99 of the answered requests (from
their scheduled arrival: a client's wait counts), PQ of the served answers (the derived table's statistics of
each validation image sent at the exit it was served at), mean exit, shed (429/503) and failed (transport error
or client timeout) counts.

The capacity is measured first: closed-loop clients at full depth, answers per second. The SLO is fixed by a
rule stated before any mode runs: ``--slo-factor`` (default 2) times the full-depth p50 latency of that probe
(a replica at full depth and saturated answers within it), unless ``--slo-ms`` gives one.

    python benchmarks/serve_overload.py --parent models:/eco-parent/latest --gate models:/eco-gate@production \\
        --derived runs/derived/<key> [--seconds 15] [--loads 0.5,1,1.5,2,0.5] [--report benchmarks/results/report.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("full_depth", "fixed_gate", "adaptive", "full_depth_shed", "adaptive_shed")


def log(msg: str) -> None:
    print(f"[overload] {msg}", file=sys.stderr, flush=True)


async def _open_loop(url: str, images: list[bytes], params: dict, rates: list[float], seconds: float,
                     timeout_s: float, seed: int) -> list[dict]:
    """One continuous schedule: Poisson arrivals at ``rates[j]`` per second during step j (``seconds`` each, one
    after the other, so a backlog carries into the next step); each answer recorded with its step, image index,
    status, latency from its scheduled arrival (to the response's last byte: a late client counts, decoding its
    JSON does not), exit and load level. The arrivals depend on ``seed`` alone: every mode gets the same."""
    import httpx

    rng = np.random.default_rng(seed)
    schedule, t0 = [], 0.0
    for j, rate in enumerate(rates):
        t = t0
        while True:
            t += rng.exponential(1.0 / rate)
            if t >= t0 + seconds:
                break
            schedule.append((j, t))
        t0 += seconds
    records: list[dict] = []
    async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=1024,
                                                                         max_keepalive_connections=256)) as client:
        async def one(i: int, step: int, scheduled: float):
            rec = {"step": step, "image": i % len(images)}
            try:
                r = await client.post(f"{url}/v1/segment", content=images[i % len(images)], params=params,
                                      headers={"content-type": "image/png"})
                rec["latency_ms"] = (time.perf_counter() - scheduled) * 1e3
                rec["status"] = r.status_code
                if r.status_code == 200:
                    body = r.json()
                    rec["exit"] = body["exit"]
                    rec["level"] = (body.get("load") or {}).get("level", 0)
            except httpx.HTTPError as e:  # a timeout or a transport error: a failure, never lost
                rec["latency_ms"] = (time.perf_counter() - scheduled) * 1e3
                rec["status"] = type(e).__name__
            records.append(rec)

        start, tasks = time.perf_counter(), []
        for i, (step, t) in enumerate(schedule):
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i, step, start + t)))
        await asyncio.gather(*tasks)
    return records


def closed_loop(url: str, images: list[bytes], params: dict, seconds: float, clients: int) -> dict:
    """Answers per second and p50 with ``clients`` clients posting back to back (the capacity probe)."""
    from serve_load import drive  # benchmarks/serve_load.py: the closed-loop client of the load benchmark

    r = drive(url, images, params, seconds, clients)
    if not r["requests"]:
        sys.exit("serve_overload: the capacity probe got no answer: is the deployment serving?")
    return {"rps": r["rps"], "p50_ms": r["p50_ms"], "answers": r["requests"], "errors": r["errors"]}


def summarize(records: list[dict], seconds: float, slo_ms: float, quality) -> dict:
    ok = [r for r in records if r["status"] == 200]
    lat = np.asarray([r["latency_ms"] for r in ok])
    shed = sum(1 for r in records if r["status"] in (429, 503))
    return {"sent": len(records), "answered": len(ok), "goodput": float(np.sum(lat <= slo_ms)) / seconds,
            "within_slo": float(np.mean(lat <= slo_ms)) if len(lat) else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "mean_pq": quality([r["image"] for r in ok], [r["exit"] for r in ok]) if ok else None,
            "mean_exit": float(np.mean([r["exit"] for r in ok])) if ok else None,
            "max_level": max((r.get("level", 0) for r in ok), default=0),
            "shed": shed, "failed": len(records) - len(ok) - shed}


SECTION = "## Serving under overload (benchmarks/serve_overload.py)"


def markdown_lines(r: dict) -> list[str]:
    """The report's section (benchmarks/report.py writes it into report.md)."""
    lines = [SECTION, "",
             f"One Segmenter replica, open-loop Poisson load in steps of {r['seconds_per_step']:g} s, in time order "
             f"{', '.join(f'{f:g}x' for f in r['offered_load'])} of the full-depth capacity "
             f"({r['capacity_rps']:.2f} req/s: {r['capacity_probe']['clients']} closed-loop clients at full depth); "
             f"SLO {r['slo_ms']:.0f} ms ({r['slo_rule']}); PQ of the answers from the derived table; adaptive "
             f"policy {json.dumps({k: v for k, v in r['policy'].items() if v is not None})}; the *_shed modes "
             f"shed at shed_held {next((a.get('shed_held') for a in r.get('mode_policies', {}).values() if a.get('shed_held')), None)} "
             "(full_depth_shed: the floor at the deepest exit, so it sheds and never caps).", "",
             "| mode | load | goodput /s | within SLO | p50 ms | p99 ms | PQ | mean exit | max level | shed | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for mode, v in r["modes"].items():
        for j, f in enumerate(r["offered_load"]):
            lines.append(f"| {mode} | {f:g}x | {v['goodput'][j]:.2f} | {v['within_slo'][j]:.0%} | "
                         f"{fmt(v['p50_ms'][j], '.0f')} | {fmt(v['p99_ms'][j], '.0f')} | {fmt(v['mean_pq'][j], '.3f')} | "
                         f"{fmt(v['mean_exit'][j], '.2f')} | {v['max_level'][j]} | {v['shed'][j]} | {v['failed'][j]} |")
    if r.get("plot"):
        lines += ["", f"![overload]({r['plot']})"]
    return lines + [""]


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = result["offered_load"]
    x = np.arange(len(loads))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = {"full_depth": "0.4", "fixed_gate": "tab:blue", "adaptive": "tab:orange", "full_depth_shed": "0.7",
               "adaptive_shed": "tab:red"}
    for mode, v in result["modes"].items():
        axes[0].plot(x, v["goodput"], "o-", color=colours[mode], label=mode)
        axes[1].plot(x, [p if p is not None else np.nan for p in v["p99_ms"]], "o-", color=colours[mode])
        axes[2].plot(x, [e if e is not None else np.nan for e in v["mean_exit"]], "o-", color=colours[mode])
    axes[0].plot(x, [f * result["capacity_rps"] for f in loads], ":", color="0.7", label="offered")
    axes[1].axhline(result["slo_ms"], ls="--", color="tab:red", lw=1, label=f"SLO {result['slo_ms']:.0f} ms")
    axes[1].set_yscale("log")
    for ax, title in zip(axes, ("goodput (answers within SLO / s)", "p99 latency (ms)", "mean exit served")):
        ax.set_xticks(x, [f"{f:g}x" for f in loads])
        ax.set_xlabel("offered load (x full-depth capacity), in time order")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"Serve overload, one run: {m['cpu']} x{m['cores']}, {result['replicas']} Segmenter replica, "
                 f"capacity {result['capacity_rps']:.1f} req/s at full depth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", default="models:/eco-parent/latest")
    p.add_argument("--gate", default="models:/eco-gate@production")
    p.add_argument("--derived", required=True, help="the derived table of the parent (its validation split scores "
                                                    "the served exits)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--seconds", type=float, default=15, help="seconds per load step (default 15)")
    p.add_argument("--loads", default="0.5,1,1.5,2,0.5", help="offered load steps as fractions of the full-depth "
                                                              "capacity, in time order")
    p.add_argument("--slo-ms", type=float, default=None, help="the latency SLO (default: --slo-factor x the "
                                                              "full-depth p50 of the capacity probe)")
    p.add_argument("--slo-factor", type=float, default=2.0)
    p.add_argument("--probe-clients", type=int, default=8)
    p.add_argument("--probe-seconds", type=float, default=10)
    p.add_argument("--timeout-s", type=float, default=60, help="client timeout: a request past it failed")
    p.add_argument("--port", type=int, default=8331)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES), help=f"modes to run, in this order (default {','.join(MODES)})")
    p.add_argument("--shed-held", type=int, default=None, help="shed_held of the *_shed modes (default: the "
                                                               "shipped queue_high)")
    p.add_argument("--out-dir", default=None, help="write serving_overload.json and .png here")
    p.add_argument("--report", default=None, help="a report.json to add (or replace) the serving_overload key in")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    loads = [float(f) for f in args.loads.split(",")]

    import ray
    from ray import serve

    from eco_ray.data.coco_panoptic import CocoPanopticDataset
    from eco_ray.derive.table import DerivedDataset
    from eco_ray.metrics.panoptic import aggregate
    from eco_ray.serve.run import build_app, load_serve_config
    from eco_ray.tracking import default_tracking_uri

    tracking = args.tracking_uri or default_tracking_uri("runs")
    ds = DerivedDataset.open(args.derived)
    val = ds.split("val")
    gt = CocoPanopticDataset.from_root(ds.manifest["data"]["root"], "val")
    row_of = {int(i): r for r, i in enumerate(val.image_ids)}
    rows = [row_of[i] for i in gt.image_ids]  # request image k -> its row in the derived table
    images = [(gt.paths.images / gt.image_meta(k)["file_name"]).read_bytes() for k in range(len(gt))]

    def quality(image_indexes, exits):
        idx = np.asarray([rows[k] for k in image_indexes])
        cols = np.asarray([ds.exits.index(e) for e in exits])
        return float(aggregate(val.eval_stats.take(idx).totals(cols), ds.categories).pq)

    doc = load_serve_config()
    for d in doc["applications"][0]["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
    seg = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "Segmenter")
    shipped_policy = dict(seg["user_config"].get("adaptive") or {})
    overrides = {"parent_uri": args.parent, "gate_uri": args.gate, "tracking_uri": tracking}
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    import httpx

    def deploy(adaptive: dict, revision: int) -> dict:
        app, _ = build_app(doc, {**overrides, "adaptive": adaptive, "revision": revision})
        serve.run(app, name="eco-ray", route_prefix="/")
        return httpx.get(f"{url}/v1/models", timeout=60).json()

    t_start = time.perf_counter()
    info = deploy({**shipped_policy, "enabled": False}, 0)
    deepest = info["exits"][-1]
    closed_loop(url, images, {"exit": deepest}, 3, args.probe_clients)  # warm-up
    probe = closed_loop(url, images, {"exit": deepest}, args.probe_seconds, args.probe_clients)
    capacity = probe["rps"]
    slo_ms = args.slo_ms if args.slo_ms is not None else args.slo_factor * probe["p50_ms"]
    log(f"full-depth capacity {capacity:.2f} req/s (p50 {probe['p50_ms']:.0f} ms, {args.probe_clients} clients); "
        f"SLO {slo_ms:.0f} ms")
    policy = {**shipped_policy, "enabled": True}
    # shedding at the tightening mark (one batch held), the same for the two modes that shed: with the floor at
    # full depth the policy only sheds, the baseline that isolates what depth adds to shedding
    shed = {"shed_held": args.shed_held if args.shed_held is not None else policy["queue_high"]}
    modes = {"full_depth": ({"exit": deepest}, {**shipped_policy, "enabled": False}),
             "fixed_gate": ({}, {**shipped_policy, "enabled": False}),
             "adaptive": ({}, policy),
             "full_depth_shed": ({"exit": deepest}, {**policy, "floor_exit": deepest, **shed}),
             "adaptive_shed": ({}, {**policy, **shed})}
    modes = {m: modes[m] for m in args.modes.split(",")}
    done = 0
    out_modes = {}
    for revision, (mode, (params, adaptive)) in enumerate(modes.items(), start=1):
        deploy(adaptive, revision)
        closed_loop(url, images, {}, 2, 2)  # the new replica warmed up
        t0 = time.perf_counter()
        records = asyncio.run(_open_loop(url, images, params, [f * capacity for f in loads], args.seconds,
                                         args.timeout_s, args.seed))
        per_step = [summarize([r for r in records if r["step"] == j], args.seconds, slo_ms, quality)
                    for j in range(len(loads))]
        done += 1
        eta = (time.perf_counter() - t_start) / done * (len(modes) - done)
        for f, s in zip(loads, per_step):
            log(f"{mode:>10} {f:g}x: goodput {s['goodput']:.2f}/s, p99 {s['p99_ms'] or float('nan'):.0f} ms, "
                f"mean exit {s['mean_exit'] or float('nan'):.2f}, max level {s['max_level']}, shed {s['shed']}, "
                f"failed {s['failed']}")
        log(f"{mode} done in {time.perf_counter() - t0:.0f} s ({done}/{len(modes)} modes, ETA {eta:.0f} s)")
        out_modes[mode] = {k: [s[k] for s in per_step] for k in per_step[0]}
    serve.shutdown()
    ray.shutdown()
    from report import machine  # benchmarks/report.py: the same machine record as the report's

    result = {"benchmark": "serve_overload", "machine": machine(), "replicas": 1,
              "parent": info["versions"]["parent"], "gate": info["versions"]["gate"],
              "seconds_per_step": args.seconds, "seed": args.seed, "images": len(images),
              "capacity_rps": capacity, "capacity_probe": {**probe, "clients": args.probe_clients},
              "slo_ms": slo_ms, "slo_rule": (f"{args.slo_factor:g} x the full-depth p50 of the capacity probe"
                                             if args.slo_ms is None else "given (--slo-ms)"),
              "offered_load": loads, "offered_rps": [f * capacity for f in loads], "policy": policy,
              "mode_policies": {m: a for m, (_, a) in modes.items()},
              "modes": out_modes, "seconds": round(time.perf_counter() - t_start, 1)}
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["plot"] = plot(result, out / "serving_overload.png").name
        (out / "serving_overload.json").write_text(json.dumps(result, indent=2))
    if args.report:  # report.json gains the key, report.md (beside it) the section, in place of an older one
        report_path = Path(args.report)
        report = json.loads(report_path.read_text())
        if result.get("plot") and Path(args.out_dir).resolve() != report_path.parent.resolve():
            result["plot"] = os.path.relpath(Path(args.out_dir) / result["plot"], report_path.parent)
        report["serving_overload"] = result
        report_path.write_text(json.dumps(report, indent=2, default=float))
        md = report_path.with_suffix(".md")
        text = md.read_text() if md.is_file() else ""
        head = text.split(SECTION)[0].rstrip("\n")
        md.write_text((head + "\n\n" if head else "") + "\n".join(markdown_lines(result)))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"Serve overload on {result['machine']['cpu']} x{result['machine']['cores']}: capacity {capacity:.2f} req/s at full depth, SLO {slo_ms:.0f} ms, "
          f"{args.seconds:g} s per step")
    print(f"{'mode':>10} {'load':>5} {'goodput':>8} {'p50 ms':>8} {'p99 ms':>8} {'PQ':>6} {'exit':>5} {'shed':>5} "
          f"{'failed':>6}")
    for mode, v in out_modes.items():
        for j, f in enumerate(loads):
            print(f"{mode:>10} {f:>4g}x {v['goodput'][j]:>8.2f} {v['p50_ms'][j] or float('nan'):>8.0f} "
                  f"{v['p99_ms'][j] or float('nan'):>8.0f} {v['mean_pq'][j] or float('nan'):>6.3f} "
                  f"{v['mean_exit'][j] or float('nan'):>5.2f} {v['shed'][j]:>5} {v['failed'][j]:>6}")


if __name__ == "__main__":
    main()
