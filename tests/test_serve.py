"""Ray Serve over real HTTP on localhost: segmentation round trip, per-request budgets, every bad-input case
(4xx, the service keeps answering), a gate swap under continuous requests, autoscaling 1 -> 2+ -> 1."""

import base64
import copy
import io
import os
import threading
import time

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


def png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


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
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
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
    assert models["exits"] == [2, 3, 4, 5, 6] and models["operating_points"]
    assert httpx.get(f"{URL}/healthz", timeout=30).json() == {"status": "ok"}


def test_budgets_change_the_exit(served):
    img = png_bytes(served["image"])
    assert post(img, exit=2).json()["exit"] == 2
    assert post(img, exit=6).json()["exit"] == 6
    assert post(img, max_gflops=served["costs"][0]).json()["exit"] == 2
    assert post(img, beta=0).json()["exit"] >= post(img, beta=100).json()["exit"] == 2


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
        (post(img, max_gflops=served["costs"][0] / 10), 422),
        (post(img, exit=9), 422),
        (post(img, exit=2, beta=0.1), 422),
        (post(img, mask_format="bmp"), 422),
        (httpx.post(f"{URL}/v1/segment", files={"other": ("x.png", img, "image/png")}, timeout=30), 400),
    ]
    for response, status in cases:
        assert response.status_code == status, (status, response.text)
        assert response.json()["error"]
    assert post(img).status_code == 200  # still serving


def test_gate_swap_under_continuous_requests_loses_none(served):
    from ray import serve

    img = png_bytes(served["image"])
    statuses, gates_seen, stop = [], set(), threading.Event()

    def client():
        while not stop.is_set():
            r = post(img)
            statuses.append(r.status_code)
            if r.status_code == 200:
                gates_seen.add(r.json()["versions"]["gate"]["uri"])

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    app, _ = build_app(served["doc"], {**served["overrides"], "gate_uri": served["gates"]["g2"], "revision": 1})
    serve.run(app, name="eco-ray", route_prefix="/")
    deadline = time.time() + 60
    while time.time() < deadline and not any(g.endswith("g2") for g in gates_seen):
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    assert {g.rsplit("/", 1)[-1] for g in gates_seen} == {"g1", "g2"}


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
    img, stop, statuses = png_bytes(served["image"]), threading.Event(), []

    def client():
        while not stop.is_set():
            statuses.append(post(img).status_code)

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    peak, deadline = 1, time.time() + 60
    while time.time() < deadline and peak < 2:
        time.sleep(0.5)
        peak = max(peak, segmenter_replicas())
    stop.set()
    for t in threads:
        t.join()
    assert peak >= 2, "no upscale under 12 concurrent clients"
    deadline = time.time() + 60
    while time.time() < deadline and segmenter_replicas() > 1:
        time.sleep(0.5)
    assert segmenter_replicas() == 1, "no downscale after the load stopped"
    assert statuses and all(s == 200 for s in statuses)


def test_api_key_when_configured(served):
    from ray import serve

    doc = copy.deepcopy(served["doc"])
    ingress = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "Ingress")
    ingress["user_config"]["api_key"] = "s3cret"
    app, _ = build_app(doc, served["overrides"])
    serve.run(app, name="eco-ray", route_prefix="/")
    img = png_bytes(served["image"])
    assert post(img).status_code == 401
    r = httpx.post(f"{URL}/v1/segment", content=img, headers={"content-type": "image/png", "x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]
    r = httpx.post(f"{URL}/v1/segment", content=img, headers={"content-type": "image/png", "x-api-key": "s3cret"},
                   timeout=60)
    assert r.status_code == 200
    assert httpx.get(f"{URL}/healthz", timeout=30).status_code == 200  # liveness stays open
