"""Load benchmark of the Serve deployment on loopback, in one run, same machine, same replica count:
the gated deployment vs. the same deployment forced to full depth (``exit=<deepest>`` on every request),
on the generated validation images. Reports throughput, p50/p99 latency, mean encoder GFLOPs and the
exits used. Bounded in time: ``--seconds`` per mode.

    python benchmarks/serve_load.py --parent models:/eco-parent/latest --gate models:/eco-gate@production \
        --data-root runs/data [--seconds 20] [--clients 8] [--replicas 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np


def drive(url: str, images: list[bytes], params: dict, seconds: float, clients: int) -> dict:
    import httpx

    latencies, exits, gflops, errors = [], Counter(), [], Counter()
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(offset: int):
        i = offset
        with httpx.Client(timeout=60) as client:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/segment", content=images[i % len(images)],
                                headers={"content-type": "image/png"}, params=params)
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    if r.status_code == 200:
                        body = r.json()
                        latencies.append(dt)
                        exits[body["exit"]] += 1
                        gflops.append(body["encoder_gflops"])
                    else:
                        errors[r.status_code] += 1
                i += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {"requests": len(lat), "errors": dict(errors), "seconds": round(wall, 2), "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "encoder_gflops_mean": float(np.mean(gflops)) if gflops else None,
            "exit_histogram": {int(k): v for k, v in sorted(exits.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", default="models:/eco-parent/latest")
    p.add_argument("--gate", default="models:/eco-gate@production")
    p.add_argument("--data-root", default="runs/data")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--replicas", type=int, default=1, help="Segmenter replicas (fixed: no autoscaling)")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import ray
    from ray import serve

    from eco_ray.tracking import default_tracking_uri
    from eco_ray.serve.run import build_app, load_serve_config

    tracking = args.tracking_uri or default_tracking_uri("runs")
    images = [f.read_bytes() for f in sorted((Path(args.data_root) / "val").glob("*.png"))]
    doc = load_serve_config()
    for d in doc["applications"][0]["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = args.replicas if d["name"] == "Segmenter" else 1
    app, user_config = build_app(doc, {"parent_uri": args.parent, "gate_uri": args.gate, "tracking_uri": tracking})
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(app, name="eco-ray", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    import httpx

    info = httpx.get(f"{url}/v1/models", timeout=60).json()
    deepest = info["exits"][-1]
    drive(url, images[:16], {}, 3, args.clients)  # warm-up
    results = {}
    for mode, params in (("gated", {}), ("full_depth", {"exit": deepest}), ("gated_again", {})):
        results[mode] = drive(url, images, params, args.seconds, args.clients)
    serve.shutdown()
    ray.shutdown()
    out = {"benchmark": "serve_load", "machine": f"{platform.machine()} {platform.processor()}".strip(),
           "parent": info["versions"]["parent"], "gate": info["versions"]["gate"], "replicas": args.replicas,
           "clients": args.clients, "seconds_per_mode": args.seconds, "images": len(images),
           "encoder_gflops_per_exit": info["encoder_gflops_per_exit"], "results": results,
           "rps_ratio_gated_vs_full": results["gated"]["rps"] / results["full_depth"]["rps"]
           if results["full_depth"]["rps"] else None}
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return
    print(f"Serve load on {out['machine']}: {args.replicas} Segmenter replica(s), {args.clients} clients, "
          f"{args.seconds:g} s per mode, {len(images)} validation images")
    print(f"{'mode':>12} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'GFLOPs':>8}  exits")
    for mode, r in results.items():
        print(f"{mode:>12} {r['rps']:>7.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['encoder_gflops_mean']:>8.4f}  "
              f"{r['exit_histogram']} {r['errors'] or ''}")
    print(f"throughput ratio gated / full depth: {out['rps_ratio_gated_vs_full']:.3f}")


if __name__ == "__main__":
    main()
