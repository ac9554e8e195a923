"""Ray Serve over real HTTP on localhost: segmentation round trip, per-request budgets, every bad-input case
(4xx with a JSON body, the service keeps answering), bodies counted as they stream, a full queue, a gate swap
under continuous requests, a swap that fails under load, autoscaling 1 -> 2+ -> 1 (a replica lost with its node
under load: tests/test_multinode.py).
Load-test clients count transport errors and timeouts as failures."""

import asyncio
import base64
import contextlib
import copy
import io
import json
import os
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from eco_ray.data.coco_panoptic import rgb2id
from eco_ray.derive.table import DerivedDataset
from eco_ray.gate.config import GateConfig
from eco_ray.gate.run import run_gate
from eco_ray.serve.run import build_app, load_serve_config

pytestmark = pytest.mark.slow
PORT = 8123
URL = f"http://127.0.0.1:{PORT}"
METRICS_PORT = 8124  # Ray's Prometheus endpoint (what a Prometheus server scrapes on each node)


def png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


PROXY_MAX_BODY = 1_000_000  # the proxy's cap, above the fixture's Ingress limit (400 kB)
API_KEY_ENV, API_KEY = "ECO_RAY_TEST_API_KEY", "s3cret-test-key"


@pytest.fixture(scope="module")
def served(tiny_derived, tmp_path_factory):
    import ray
    from ray import serve

    base = tmp_path_factory.mktemp("serve")
    gates = {}
    for name, beta in (("g1", 0.05), ("g2", 0.5)):
        r = run_gate(tiny_derived["manifest"]["path"], GateConfig(kind="quality", beta=beta, epochs=30), [beta],
                     ctx=tiny_derived["ctx"], out=str(base / name), name=name)
        gates[name] = r.path
    # fast autoscaling metrics, so that the autoscaling test sees 1 -> 2+ -> 1 within seconds (platform notes)
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # Prometheus output within seconds (default 10 s)
    from eco_ray.serve.proxy import CALLBACK, CALLBACK_ENV, MAX_BODY_ENV

    os.environ[CALLBACK_ENV] = CALLBACK  # as eco-ray serve does: the proxy's guard (eco_ray/serve/proxy.py)
    os.environ[MAX_BODY_ENV] = str(PROXY_MAX_BODY)
    os.environ[API_KEY_ENV] = API_KEY  # in the replicas' environment, as a Secret puts it on Kubernetes
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT, "request_timeout_s": 60})
    doc = load_serve_config()
    ingress = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "Ingress")
    ingress["user_config"]["max_pixels"] = 300 * 300  # small limits, to test them cheaply
    ingress["user_config"]["max_image_bytes"] = 400_000
    for d in doc["applications"][0]["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
    overrides = {"parent_uri": str(tiny_derived["parent_dir"]), "gate_uri": gates["g1"],
                 "tracking_uri": tiny_derived["tracking"], "threshold": 0.05}
    app, _ = build_app(doc, overrides)
    serve.run(app, name="eco-ray", route_prefix="/")
    val = DerivedDataset.open(tiny_derived["manifest"]["path"])
    image = np.asarray(Image.open(sorted((tiny_derived["root"] / "val").glob("*.png"))[0]).convert("RGB"))
    yield {"doc": doc, "overrides": overrides, "gates": gates, "image": image, "costs": val.costs("gflops")}
    serve.shutdown()
    ray.shutdown()


def post(data: bytes, ctype: str = "image/png", **params) -> httpx.Response:
    return httpx.post(f"{URL}/v1/segment", content=data, headers={"content-type": ctype}, params=params, timeout=60)


@contextlib.contextmanager
def under_load(img: bytes, clients: int):
    """Client threads posting until the block ends; each answer is recorded as (status, response), a transport
    error or a timeout as (its name, None): a failure, never lost. The threads stop even when the block fails."""
    record, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                r = post(img)
                record.append((r.status_code, r))
            except httpx.HTTPError as e:  # connection refused or reset, timeout: a failed request
                record.append((type(e).__name__, None))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield record
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)


def redeploy(served, doc=None, pin=True, **overrides):
    from ray import serve

    app, _ = build_app(doc or served["doc"], {**served["overrides"], **overrides}, pin=pin)
    serve.run(app, name="eco-ray", route_prefix="/")


def test_segmentation_round_trip(served):
    r = post(png_bytes(served["image"]))
    assert r.status_code == 200, r.text
    body = r.json()
    h, w = served["image"].shape[:2]
    assert (body["height"], body["width"]) == (h, w) and body["exit"] in [2, 3, 4, 5, 6]
    assert body["encoder_gflops"] == pytest.approx(served["costs"][[2, 3, 4, 5, 6].index(body["exit"])])
    ids = rgb2id(np.asarray(Image.open(io.BytesIO(base64.b64decode(body["id_map_png"]))).convert("RGB")))
    assert ids.shape == (h, w)
    assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in body["segments"]}
    for s in body["segments"]:
        assert s["area"] == int((ids == s["id"]).sum()) and len(s["bbox"]) == 4 and s["category"]
    assert body["versions"]["gate"]["uri"].endswith("g1")
    # multipart and RLE
    r = httpx.post(f"{URL}/v1/segment", files={"file": ("x.png", png_bytes(served["image"]), "image/png")},
                   params={"mask_format": "rle"}, timeout=60)
    assert r.status_code == 200, r.text
    from pycocotools import mask as mask_utils

    for s in r.json()["segments"]:
        rle = {"size": s["rle"]["size"], "counts": s["rle"]["counts"].encode()}
        assert int(mask_utils.area(rle)) == s["area"]
    models = httpx.get(f"{URL}/v1/models", timeout=30).json()
    assert models["exits"] == [2, 3, 4, 5, 6] and models["operating_points"] and models["swap_error"] is None
    assert httpx.get(f"{URL}/healthz", timeout=30).json() == {"status": "ok"}
    assert body["request_id"] and post(png_bytes(served["image"]), exit=2).json()["request_id"] != body["request_id"]


def test_budgets_change_the_exit(served):
    img = png_bytes(served["image"])
    assert post(img, exit=2).json()["exit"] == 2
    assert post(img, exit=6).json()["exit"] == 6
    assert post(img, max_gflops=served["costs"][0]).json()["exit"] == 2
    assert post(img, beta=0).json()["exit"] >= post(img, beta=100).json()["exit"] == 2
    # targets no exit meets are served by the cheapest exit and said to be missed, never silently
    missed = post(img, max_gflops=served["costs"][0] / 10).json()
    assert missed["exit"] == 2 and missed["target"] == {"name": "max_gflops", "limit": served["costs"][0] / 10,
                                                        "met": False}
    latency = httpx.get(f"{URL}/v1/models", timeout=30).json()["latency_ms_per_exit"]
    assert len(latency) == 5 and all(t > 0 for t in latency)  # measured by the replica when it started
    tight = post(img, max_latency_ms=0.001).json()
    assert tight["target"]["met"] is False and tight["target"]["predicted_ms"] > 0.001  # the cheapest, said
    table = httpx.get(f"{URL}/v1/models", timeout=30).json()["latency_ms_per_exit"]  # as the next decision reads it
    limit = sorted(table)[2]  # some exits fit, some do not: one that fits by the table the decision read
    mid = post(img, max_latency_ms=limit).json()
    assert mid["target"]["predicted_ms"] <= limit  # (whether the batch then finished in time is "met")
    fits = post(img, max_latency_ms=1000 * max(latency)).json()  # every exit fits: the gate's own choice
    assert fits["target"]["met"] is True and fits["exit"] == post(img).json()["exit"]
    assert "target" not in post(img).json() and "target" not in post(img, exit=3).json()


def prometheus_samples(prefix: str) -> dict[str, float]:
    """``{series line without its value: value}`` of the node's Prometheus output, for metrics named prefix*."""
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(prefix)}


def test_load_adaptive_depth_rises_under_load_returns_and_is_exported(served):
    """Under a load step the level rises and caps the requests without a control of their own: a capped request
    is served between the floor and the cap; a forced exit is honoured as given; after the load the level
    returns to 0 (read through /v1/models, no request needed); the level, exits, GFLOPs and latencies reach Ray's
    Prometheus output, whose counters add up, and the shipped dashboard queries only what is exported."""
    from eco_ray.config import ConfigError

    with pytest.raises(ConfigError, match="floor_exit=9 is not one of the model's exits"):
        build_app(served["doc"], {**served["overrides"], "adaptive": {"enabled": True, "floor_exit": 9}})
    with pytest.raises(ConfigError, match="above the Segmenter's max_ongoing_requests"):
        build_app(served["doc"], {**served["overrides"], "adaptive": {"enabled": True, "queue_high": 17}})
    adaptive = {"enabled": True, "floor_exit": 3, "queue_high": 3, "queue_low": 1, "step_s": 0.3,
                "relax_after_s": 1.0}
    redeploy(served, adaptive=adaptive)
    img = png_bytes(served["image"])
    assert post(img).json()["load"] == {"level": 0, "exit_cap": 6, "floor_exit": 3, "capped": False}
    assert post(img, max_gflops=1e-9).json()["target"]["met"] is False  # counted as missed
    forced = []
    with under_load(img, 8) as record:
        deadline = time.time() + 30
        while time.time() < deadline and not any(s == 200 and r.json()["load"]["level"] >= 2 for s, r in record):
            time.sleep(0.5)
        forced.append(post(img, exit=6).json())  # under load: an explicit control wins
    assert record and all(s == 200 for s, _ in record), sorted({str(s) for s, _ in record})
    loads = [(r.json()["exit"], r.json()["load"]) for _, r in record]
    assert max(lv["level"] for _, lv in loads) >= 2, "the level did not rise under 8 clients"
    assert all(k <= lv["exit_cap"] for k, lv in loads)
    capped = [(k, lv) for k, lv in loads if lv["capped"]]
    assert capped and all(3 <= k <= lv["exit_cap"] < 6 and lv["level"] > 0 for k, lv in capped)  # never < floor
    assert forced[0]["exit"] == 6 and forced[0]["load"]["capped"] is False
    state, deadline = None, time.time() + 30
    while time.time() < deadline:
        state = httpx.get(f"{URL}/v1/models", timeout=30).json()["load"]
        if state["level"] == 0:
            break
        time.sleep(0.5)
    assert state["level"] == 0 and state["max_level"] == 3 and state["floor_exit"] == 3, state
    # Prometheus: wait until the export holds what was served and stops moving
    dashboard = (Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "eco-ray-serving.json").read_text()
    queried = set(re.findall(r"ray_eco_\w+", dashboard))
    assert len(queried) >= 6
    exits_seen = {str(k) for k, _ in loads}
    deadline, samples, previous = time.time() + 40, {}, None
    while time.time() < deadline:  # the metrics agent exports every second or so (the fixture's interval)
        samples = prometheus_samples("ray_eco_")
        tags = {k.split('exit="')[1].split('"')[0] for k in samples if k.startswith("ray_eco_images_served") and
                'exit="' in k}
        if exits_seen <= tags and queried <= {k.split("{")[0] for k in samples} and samples == previous:
            break
        previous = samples
        time.sleep(1.5)
    assert queried <= {k.split("{")[0] for k in samples}, sorted(queried - {k.split("{")[0] for k in samples})
    gflops = dict(zip(["2", "3", "4", "5", "6"], served["costs"]))

    def per_replica(name):
        out: dict = {}
        for k, v in samples.items():
            if k.startswith(name + "{"):
                replica = re.search(r'replica="([^"]*)"', k).group(1)
                exit_tag = re.search(r'exit="([^"]*)"', k)
                out.setdefault(replica, {})[exit_tag.group(1) if exit_tag else None] = v
        return out

    images = per_replica("ray_eco_images_served_total")
    spent, full = per_replica("ray_eco_encoder_gflops_served_total"), per_replica("ray_eco_encoder_gflops_full_depth_total")
    assert any(e in by_exit for by_exit in images.values() for e in exits_seen)
    for replica, by_exit in images.items():  # every image counted once, at its exit's GFLOPs and at full depth's
        assert spent[replica][None] == pytest.approx(sum(n * gflops[e] for e, n in by_exit.items())), (replica, samples)
        assert full[replica][None] == pytest.approx(sum(by_exit.values()) * gflops["6"]), (replica, samples)
    assert sum(v for k, v in samples.items() if k.startswith("ray_eco_targets_missed_total")) >= 1
    # left deployed: the tests after it either do not depend on the policy or redeploy without it


def test_bad_inputs_get_4xx_and_the_service_keeps_answering(served):
    img = png_bytes(served["image"])
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    cases = [
        (post(img, ctype="text/plain"), 415),
        (post(b"this is not an image", ctype="image/png"), 400),
        (post(img[: len(img) // 2], ctype="image/png"), 400),  # truncated
        (post(b"", ctype="image/png"), 400),
        (post(png_bytes(np.zeros((400, 400, 3), np.uint8))), 413),  # over max_pixels
        (post(png_bytes(noise)), 413),  # over max_image_bytes
        (post(img, max_gflops="abc"), 422),
        (post(img, beta=-1), 422),
        (post(img, max_gflops=0.01, beta=0.1), 422),
        (post(img, max_quality_drop="x"), 422),
        (post(img, max_quality_drop=2), 422),
        (post(img, exit=9), 422),
        (post(img, exit=2, beta=0.1), 422),
        (post(img, mask_format="bmp"), 422),
        (httpx.post(f"{URL}/v1/segment", files={"other": ("x.png", img, "image/png")}, timeout=30), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, (status, response.text)
        assert response.json()["error"]
    assert post(img).status_code == 200  # still serving


def test_bodies_are_counted_as_they_stream_and_only_real_images_are_decoded(served):
    img = png_bytes(served["image"])
    big = b"\x89PNG" + os.urandom(600_000)  # over the fixture's 400 kB limit

    def chunked():  # no Content-Length: the limit must hold on the bytes themselves
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = httpx.post(f"{URL}/v1/segment", content=chunked(), headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]
    r = httpx.post(f"{URL}/v1/segment", files={"file": ("x.png", big, "image/png")}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]
    assert post(img).status_code == 200  # the replica still answers
    for fmt in ("GIF", "TIFF", "BMP", "ICO", "PPM"):  # Pillow decodes these: declared as PNG, they are refused
        buf = io.BytesIO()
        Image.fromarray(served["image"]).save(buf, format=fmt)
        r = post(buf.getvalue())
        assert r.status_code == 415 and r.json()["error"], (fmt, r.text)

    def chunked_past_the_proxy_cap():  # whichever counts first, the proxy or the replica: a JSON 413, no hang
        for _ in range(3 * PROXY_MAX_BODY // 65536):
            yield b"\x00" * 65536

    r = httpx.post(f"{URL}/v1/segment", content=chunked_past_the_proxy_cap(), headers={"content-type": "image/png"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"] and r.headers.get("x-request-id")
    # the proxy itself refuses a body past its cap before reading it, and lets no client lift its timeout
    r = httpx.post(f"{URL}/v1/segment", content=b"\x89PNG" + bytes(PROXY_MAX_BODY), timeout=60,
                   headers={"content-type": "image/png"})
    assert r.status_code == 413 and "proxy's limit" in r.json()["error"]
    r = httpx.post(f"{URL}/v1/segment", content=png_bytes(served["image"]), timeout=60,
                   headers={"content-type": "image/png", "x-request-timeout-seconds": "0.001"})
    assert r.status_code == 200  # honoured, the header would have made it a 408
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # a few kB that would decode to 400 M pixels
    r = post(bomb.getvalue())
    assert r.status_code == 413 and r.json()["error"]
    # every non-2xx has a JSON body, Serve's own routing errors too
    assert httpx.get(f"{URL}/no/such/path", timeout=30).json()["error"]
    assert httpx.get(f"{URL}/v1/segment", timeout=30).status_code == 405
    assert httpx.get(f"{URL}/v1/segment", timeout=30).json()["error"]


def test_gate_swap_under_continuous_requests_loses_none(served):
    from ray import serve

    img = png_bytes(served["image"])

    def gates_seen():
        return {r.json()["versions"]["gate"]["uri"].rsplit("/", 1)[-1] for s, r in list(record) if s == 200}

    with under_load(img, 3) as record:
        time.sleep(2)
        app, _ = build_app(served["doc"], {**served["overrides"], "gate_uri": served["gates"]["g2"], "revision": 1})
        serve.run(app, name="eco-ray", route_prefix="/")
        deadline = time.time() + 60
        while time.time() < deadline and "g2" not in gates_seen():
            time.sleep(0.5)
        time.sleep(1)
    assert record and all(s == 200 for s, _ in record), sorted({str(s) for s, _ in record})
    assert gates_seen() == {"g1", "g2"}


def test_a_swap_to_models_that_cannot_load_loses_no_request_and_keeps_the_old_ones(served, tmp_path):
    """Deploying: the models are loaded before anything is deployed, so a bad gate never reaches the replicas.
    Reconfiguring a running replica in place (``serve deploy`` of a changed user_config): it keeps its models
    and reports the error."""
    from eco_ray.config import ConfigError
    from eco_ray.serve.app import Segmenter

    redeploy(served)
    img = png_bytes(served["image"])
    with under_load(img, 3) as record:
        time.sleep(1)
        with pytest.raises(ConfigError, match="no-such-gate"):
            redeploy(served, gate_uri=str(tmp_path / "no-such-gate"), revision=7, pin=False)
        time.sleep(2)
    models = httpx.get(f"{URL}/v1/models", timeout=30).json()
    assert models.get("gate_uri", "").endswith("g1") and models["revision"] == 0, models  # the old models
    assert record and all(s == 200 for s, _ in record), sorted({str(s) for s, _ in record})
    # the replica's own rollback, on the Segmenter class itself (no Serve in between)
    replica = Segmenter.func_or_class()
    good = {**served["overrides"], "revision": 1}
    replica.reconfigure(good)
    engine = replica.engine
    replica.reconfigure({**good, "gate_uri": str(tmp_path / "no-such-gate"), "revision": 2})
    assert replica.engine is engine and "no-such-gate" in replica.swap_error and replica.describe()["revision"] == 1
    replica.reconfigure({**good, "revision": 3})
    assert replica.swap_error is None and replica.describe()["revision"] == 3
    with pytest.raises(Exception, match="no-such-gate"):  # a new replica with nothing to keep fails to start
        Segmenter.func_or_class().reconfigure({**good, "gate_uri": str(tmp_path / "no-such-gate")})


def test_a_config_deployed_as_it_is_serves_one_version_per_revision(served):
    """``serve deploy`` / the RayService deploy URIs with aliases as they are: replicas started later for the
    same revision (here every redeploy restarts them) load what the first one pinned, after the alias moved."""
    from mlflow import MlflowClient

    client = MlflowClient(served["overrides"]["tracking_uri"])
    name = "eco-gate-pins"
    client.create_registered_model(name)
    v1, v2 = (client.create_model_version(name, str(served["gates"][g])).version for g in ("g1", "g2"))
    client.set_registered_model_alias(name, "prod", v1)
    uri = f"models:/{name}@prod"

    def deployed(revision):
        redeploy(served, gate_uri=uri, revision=revision, pin=False)
        return httpx.get(f"{URL}/v1/models", timeout=30).json()

    first = deployed(21)
    assert first["gate_uri"] == f"models:/{name}/{v1}" and first["requested"]["gate_uri"] == uri
    client.set_registered_model_alias(name, "prod", v2)
    assert deployed(21)["gate_uri"] == f"models:/{name}/{v1}"  # new replicas, same revision: same version
    assert deployed(22)["gate_uri"] == f"models:/{name}/{v2}"  # a new revision resolves the alias anew


def test_a_replica_whose_batch_hangs_fails_its_health_check(served):
    from eco_ray.serve.app import Segmenter

    replica = Segmenter.func_or_class()
    replica.reconfigure({**served["overrides"], "stuck_batch_s": 5})
    asyncio.run(replica.check_health())  # idle
    replica.batch_started = time.monotonic() - 1  # a batch running for a second
    asyncio.run(replica.check_health())
    replica.batch_started = time.monotonic() - 6  # past stuck_batch_s
    with pytest.raises(RuntimeError, match="running for"):
        asyncio.run(replica.check_health())
    # a new config that cannot be honoured keeps the models serving and says why
    engine = replica.engine
    replica.reconfigure({**served["overrides"], "latency_repeats": "three"})
    assert replica.engine is engine and "latency_repeats" in replica.swap_error
    # a latency target accepted before a swap to models without a latency table: that request gets its 422,
    # the batch it shares with another request still runs
    from eco_ray.budget import Budget
    from eco_ray.serve.engine import InputError, RequestControl

    timed = RequestControl(budget=Budget.named("max_latency_ms", 1000.0))
    replica.engine.allowed_exits(timed)  # accepted on arrival
    replica.reconfigure({**served["overrides"], "latency_repeats": 0, "revision": 5})
    assert replica.swap_error is None and replica.engine.latency_ms is None

    png = {"mask_format": "png"}
    refused, answered = replica._run_batch(replica.engine, [(served["image"], timed, png),
                                                            (served["image"], RequestControl(), png)], None)
    assert isinstance(refused, InputError) and refused.status == 422 and "latency_repeats" in str(refused)
    assert isinstance(answered, dict) and answered["exit"] in replica.engine.exits
    # shedding: at the top level a request finding shed_held requests held is refused before it queues
    replica.reconfigure({**served["overrides"], "latency_repeats": 0, "revision": 6,
                         "adaptive": {"enabled": True, "floor_exit": 6, "shed_held": 2}})
    replica.held = 2
    shed = asyncio.run(replica.infer(served["image"], RequestControl(), {"mask_format": "png"}, "panoptic"))
    assert isinstance(shed, InputError) and shed.status == 429 and replica.held == 2
    replica.held = 0


def test_a_full_queue_answers_429_with_retry_after(served):
    doc = copy.deepcopy(served["doc"])
    seg = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "Segmenter")
    seg.update(max_ongoing_requests=1, max_queued_requests=1)
    redeploy(served, doc)
    img = png_bytes(served["image"])
    with under_load(img, 12) as record:
        time.sleep(4)
    codes = [s for s, _ in record]
    assert set(codes) <= {200, 429}, sorted({str(c) for c in codes})  # no transport error, nothing else
    rejected = [r for s, r in record if s == 429]
    assert rejected and all(r.headers.get("retry-after") and r.json()["error"] for r in rejected)
    assert codes.count(200) > 0  # the next test redeploys the usual queue


def segmenter_replicas() -> int:
    from ray import serve

    states = serve.status().applications["eco-ray"].deployments["Segmenter"].replica_states
    return int(states.get("RUNNING", 0))


def test_segmenter_autoscales_up_under_load_and_back(served):
    from ray import serve

    doc = copy.deepcopy(served["doc"])
    seg = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "Segmenter")
    seg.pop("num_replicas", None)
    seg["ray_actor_options"] = {"num_cpus": 0.5}
    seg["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                                 "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2}
    app, _ = build_app(doc, served["overrides"])
    serve.run(app, name="eco-ray", route_prefix="/")
    assert segmenter_replicas() == 1
    img = png_bytes(served["image"])
    with under_load(img, 12) as record:
        peak, deadline = 1, time.time() + 60
        while time.time() < deadline and peak < 2:
            time.sleep(0.5)
            peak = max(peak, segmenter_replicas())
    assert peak >= 2, "no upscale under 12 concurrent clients"
    deadline = time.time() + 60
    while time.time() < deadline and segmenter_replicas() > 1:
        time.sleep(0.5)
    assert segmenter_replicas() == 1, "no downscale after the load stopped"
    assert record and all(s == 200 for s, _ in record), sorted({str(s) for s, _ in record})


def test_api_key_when_configured(served):
    from ray import serve
    from ray.serve.context import _get_global_client

    from eco_ray.serve.app import Ingress

    doc = copy.deepcopy(served["doc"])
    ingress = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "Ingress")
    ingress["user_config"]["api_key_env"] = API_KEY_ENV  # the config names the variable, never the key
    redeploy(served, doc)
    img = png_bytes(served["image"])
    assert post(img).status_code == 401
    r = httpx.post(f"{URL}/v1/segment", content=img, headers={"content-type": "image/png", "x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]
    r = httpx.post(f"{URL}/v1/segment", content=img, headers={"content-type": "image/png", "x-api-key": API_KEY},
                   timeout=60)
    assert r.status_code == 200
    assert httpx.get(f"{URL}/healthz", timeout=30).status_code == 200  # liveness stays open
    assert httpx.get(f"{URL}/openapi.json", timeout=30).status_code == 404  # docs close when a key is set
    # what Serve's REST API shows (GET /api/serve/applications/): the deployed configs, without the key
    details = json.dumps(_get_global_client().get_serve_details(), default=str)
    assert API_KEY_ENV in details and API_KEY not in details
    assert serve.status().applications["eco-ray"].deployments["Ingress"].status == "HEALTHY"
    with pytest.raises(ValueError, match="REST API"):  # a key in user_config (readable through Serve) is refused
        Ingress.func_or_class.reconfigure(Ingress.func_or_class.__new__(Ingress.func_or_class), {"api_key": "x"})
