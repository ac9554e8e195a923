"""Fuzz benchmark of the HTTP API: malformed requests of many kinds against a running app, from concurrent
clients, then a valid request and the replicas' states. Each kind has the statuses it may get; anything else
is counted, and so is every 5xx, every transport error and every timeout. One run, on loopback.

    python benchmarks/fuzz_serve.py --parent models:/eco-parent/latest --gate models:/eco-gate@production \
        --data-root runs/data [--per-kind 70] [--clients 8] [--json]

Exit status 1 when any request got an unexpected status, a 5xx or no answer, when the valid request after
the fuzzing fails, or when a replica is not RUNNING at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

MAX_IMAGE_BYTES = 400_000  # small limits, so that oversize kinds stay cheap to send
MAX_PIXELS = 300 * 300


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height over a tiny (wrong) payload: the header is all a check sees."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def request_kinds(valid_png: bytes, rgb: np.ndarray, rng: random.Random) -> dict:
    """kind -> (a function returning httpx.request kwargs, the statuses that kind may get)."""
    img = Image.fromarray(rgb)
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(MAX_IMAGE_BYTES + 50_000)

    def raw(body, ctype="image/png", params=None, headers=None, method="POST", path="/v1/segment"):
        return {"method": method, "path": path, "content": body,
                "headers": {"content-type": ctype, **(headers or {})}, "params": params or {}}

    def chunked_big():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    gif, tiff, bmp, ico, ppm = (_encode(img, f) for f in ("GIF", "TIFF", "BMP", "ICO", "PPM"))
    bomb = _encode(Image.new("1", (20000, 20000)), "PNG")
    return {
        "empty body": (lambda: raw(b""), {400}),
        "random bytes as png": (lambda: raw(os.urandom(rng.randint(1, 5000))), {400, 415}),
        "truncated png": (lambda: raw(valid_png[:rng.randint(8, len(valid_png) - 1)]), {400}),
        "png magic + garbage": (lambda: raw(valid_png[:8] + os.urandom(rng.randint(10, 3000))), {400}),
        "gif declared png": (lambda: raw(gif), {415}),
        "tiff declared png": (lambda: raw(tiff), {415}),
        "bmp declared png": (lambda: raw(bmp), {415}),
        "ico declared png": (lambda: raw(ico), {415}),
        "ppm declared png": (lambda: raw(ppm), {415}),
        "postscript": (lambda: raw(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
                                   "application/postscript"), {400, 415}),
        "svg": (lambda: raw(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "image/svg+xml"),
                {400, 415}),
        "json body": (lambda: raw(b'{"image": "aGVsbG8="}', "application/json"), {400, 415}),
        "decompression bomb": (lambda: raw(bomb), {413}),
        "header claims 100k x 100k": (lambda: raw(_png_with_header(100_000, 100_000)), {413}),
        "zero-size png header": (lambda: raw(_png_with_header(0, 0)), {400}),
        "oversize body": (lambda: raw(big), {413}),
        "oversize chunked body": (lambda: raw(chunked_big()), {413}),
        "oversize multipart": (lambda: {"method": "POST", "path": "/v1/segment",
                                        "files": {"file": ("x.png", big, "image/png")}, "params": {}}, {413}),
        "multipart without file": (lambda: {"method": "POST", "path": "/v1/segment",
                                            "files": {"other": ("x.png", valid_png, "image/png")}, "params": {}},
                                   {400}),
        "malformed multipart": (lambda: raw(b"--xx\r\nContent-Disposition: form-data\r\n\r\n" + os.urandom(300),
                                            "multipart/form-data; boundary=xx"), {400}),
        "bad budget values": (lambda: raw(valid_png, params=rng.choice([
            {"max_gflops": "-1"}, {"max_gflops": "abc"}, {"beta": "nan"}, {"beta": "-3"}, {"exit": "99"},
            {"exit": "x"}, {"exit": "1", "beta": "0.1"}, {"mask_format": "bmp"}, {"max_gflops": "inf"}])),
            {400, 422}),
        "client timeout header": (lambda: raw(valid_png, headers={"x-request-timeout-seconds": "0.001"}), {200}),
        "wrong method": (lambda: raw(b"", method="GET"), {405}),
        "unknown path": (lambda: raw(valid_png, path=f"/v1/{rng.randint(0, 10**6)}"), {404}),
        "valid grayscale / rgba png": (lambda: raw(_encode(img.convert(rng.choice(["L", "RGBA", "I;16"])), "PNG")),
                                       {200}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent", default="models:/eco-parent/latest")
    p.add_argument("--gate", default="models:/eco-gate@production")
    p.add_argument("--data-root", default="runs/data", help="a generated dataset: one val image is the valid one")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--per-kind", type=int, default=70, help="requests of each kind")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--port", type=int, default=8322)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import httpx
    import ray
    from ray import serve

    from eco_ray.serve.proxy import CALLBACK, CALLBACK_ENV
    from eco_ray.serve.run import build_app, load_serve_config
    from eco_ray.tracking import default_tracking_uri

    rng = random.Random(args.seed)
    valid_file = sorted((Path(args.data_root) / "val").glob("*.png"))[0]
    valid_png = valid_file.read_bytes()
    kinds = request_kinds(valid_png, np.asarray(Image.open(valid_file).convert("RGB")), rng)
    plan = [k for k in kinds for _ in range(args.per_kind)]
    rng.shuffle(plan)

    doc = load_serve_config()
    for d in doc["applications"][0]["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        if d["name"] == "Ingress":
            d["user_config"].update(max_image_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_PIXELS)
    tracking = args.tracking_uri or default_tracking_uri("runs")
    app, _ = build_app(doc, {"parent_uri": args.parent, "gate_uri": args.gate, "tracking_uri": tracking})
    os.environ[CALLBACK_ENV] = CALLBACK  # as eco-ray serve does
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port, "request_timeout_s": 60})
    serve.run(app, name="eco-ray", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"

    table: dict[str, Counter] = defaultdict(Counter)
    lock = threading.Lock()
    queue = list(plan)
    t0 = time.perf_counter()

    def client():
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    kind = queue.pop()
                kw = kinds[kind][0]()
                try:
                    r = http.request(kw.pop("method"), kw.pop("path"), **kw)
                    outcome = r.status_code
                    if r.status_code >= 400 and not _json_error(r):
                        outcome = f"{r.status_code} without JSON error"
                except httpx.HTTPError as e:  # a transport error or a timeout: a failure, never dropped
                    outcome = type(e).__name__
                with lock:
                    table[kind][outcome] += 1

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    after = httpx.post(f"{url}/v1/segment", content=valid_png, headers={"content-type": "image/png"}, timeout=60)
    status = serve.status().applications["eco-ray"].deployments
    replicas = {name: dict(d.replica_states) for name, d in status.items()}
    serve.shutdown()
    ray.shutdown()

    rows, unexpected = [], 0
    for kind, (_, allowed) in kinds.items():
        got = table[kind]
        bad = sum(n for code, n in got.items() if code not in allowed)
        unexpected += bad
        rows.append({"kind": kind, "expected": sorted(allowed), "got": {str(k): v for k, v in sorted(
            got.items(), key=lambda kv: str(kv[0]))}, "unexpected": bad})
    five_xx = sum(n for got in table.values() for code, n in got.items() if isinstance(code, int) and code >= 500)
    no_answer = sum(n for got in table.values() for code, n in got.items() if isinstance(code, str))
    dead = {name: s for name, s in replicas.items() if set(s) - {"RUNNING"}}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import machine  # the benchmarks' one machine description

    host = machine()
    out = {"benchmark": "fuzz_serve", "machine": f"{host['cpu']}, {host['cores']} cores", "requests": len(plan), "kinds": len(kinds), "clients": args.clients,
           "seconds": round(seconds, 1), "unexpected": unexpected, "5xx": five_xx,
           "transport_errors_or_timeouts": no_answer, "valid_after": after.status_code, "replicas": replicas,
           "rows": rows}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"Fuzz of the HTTP API on {out['machine']}: {len(plan)} requests of {len(kinds)} kinds, "
              f"{args.clients} clients, {seconds:.0f} s, one run")
        print(f"| {'kind':<28} | {'may get':<9} | {'got':<30} |")
        print(f"|{'-' * 30}|{'-' * 11}|{'-' * 32}|")
        for r in rows:
            got = ", ".join(f"{k}: {v}" for k, v in r["got"].items())
            print(f"| {r['kind']:<28} | {'/'.join(map(str, r['expected'])):<9} | {got:<30} |")
        print(f"unexpected statuses: {unexpected}; 5xx: {five_xx}; transport errors or timeouts: {no_answer}; "
              f"valid request after: {after.status_code}; replicas: {replicas}")
    if unexpected or five_xx or no_answer or after.status_code != 200 or dead:
        raise SystemExit(1)


def _json_error(r) -> bool:
    try:
        return bool(r.json().get("error"))
    except (ValueError, AttributeError):
        return False


if __name__ == "__main__":
    main()
