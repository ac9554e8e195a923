"""The Ray-free parts of serving: decoding and refusing what clients send, request controls, the proxy's
header filter and body cap. (tests/test_serve.py drives the same through real HTTP.)"""

import io

import numpy as np
import pytest
from PIL import Image

from eco_ray.serve.engine import InputError, Limits, RequestControl, decode_image


def encoded(fmt: str, size=(32, 24), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


def test_only_png_jpeg_and_webp_are_decoded_whatever_the_declared_type():
    limits = Limits(10_000_000, 1_000_000)
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert decode_image(encoded(fmt), "image/png", limits).shape == (24, 32, 3)
    for fmt in ("GIF", "TIFF", "BMP", "ICO", "PPM"):
        with pytest.raises(InputError) as e:
            decode_image(encoded(fmt), "image/png", limits)
        assert e.value.status == 415, fmt
    with pytest.raises(InputError) as e:
        decode_image(encoded("PNG"), "image/tiff", limits)
    assert e.value.status == 415


def test_pixels_are_counted_before_decoding():
    with pytest.raises(InputError) as e:  # 400 M pixels in a few kB: refused from the header
        decode_image(encoded("PNG", (20000, 20000), "1"), "image/png", Limits())
    assert e.value.status == 413
    with pytest.raises(InputError) as e:
        decode_image(encoded("PNG", (300, 300)), "image/png", Limits(10_000_000, 300 * 299))
    assert e.value.status == 413
    for bad, status in ((b"", 400), (encoded("PNG")[:40], 400), (b"\x89PNG\r\n\x1a\n" + bytes(100), 400),
                        (b"hello", 400)):
        with pytest.raises(InputError) as e:
            decode_image(bad, "image/png", Limits())
        assert e.value.status == status, bad[:12]


def test_request_controls():
    assert RequestControl.parse({}).budget is None
    c = RequestControl.parse({"max_gflops": "0.05"})
    assert str(c.budget) == "max_gflops=0.05"
    for params, status in (({"max_gflops": "abc"}, 422), ({"beta": "-1"}, 422), ({"exit": "2", "beta": "0.1"}, 422),
                           ({"max_gflops": "nan"}, 422), ({"max_gflops": "inf"}, 422)):
        with pytest.raises(InputError) as e:
            RequestControl.parse(params)
        assert e.value.status == status, params


def _asgi(guard, messages, headers=()):
    """Run an ASGI request through ``guard``: the client sends ``messages``; returns what the client got."""
    import asyncio

    sent, incoming = [], list(messages)

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(guard({"type": "http", "headers": list(headers)}, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, next(m["headers"] for m in sent if m["type"] == "http.response.start")


def buffering_app(seen: dict):
    """An app that reads the whole body before it answers, as Serve's proxy does."""
    async def app(scope, receive, send):
        seen["headers"], seen["bytes"] = scope["headers"], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                await send({"type": "http.response.start", "status": 499, "headers": []})
                await send({"type": "http.response.body", "body": b"client gone"})
                return
            seen["bytes"] += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})
    return app


def test_the_proxy_caps_the_body_and_drops_headers_a_client_may_not_set():
    import json

    from eco_ray.serve.proxy import ProxyGuard, middlewares

    assert middlewares()[0].cls is ProxyGuard
    seen = {}
    guard = ProxyGuard(buffering_app(seen), max_body_bytes=1000)
    chunks = [{"type": "http.request", "body": b"x" * 300, "more_body": True} for _ in range(50)]
    status, body, _ = _asgi(guard, chunks)  # chunked, no Content-Length: counted as it arrives
    assert status == 413 and "proxy's limit" in json.loads(body)["error"] and seen["bytes"] <= 1000
    status, body, _ = _asgi(guard, chunks, [(b"content-length", b"15000")])  # refused before reading
    assert status == 413 and json.loads(body)["request_id"]
    small = [{"type": "http.request", "body": b"x" * 900, "more_body": False}]
    headers = [(b"x-request-timeout-seconds", b"0"), (b"X-Request-Disconnect-Disabled", b"?1"),
               (b"content-type", b"image/png")]
    assert _asgi(guard, small, headers)[0] == 200
    assert seen["headers"] == [(b"content-type", b"image/png")] and seen["bytes"] == 900


def test_the_proxys_own_errors_get_the_json_body():
    import json

    from eco_ray.serve.proxy import ProxyGuard

    async def plain_error(scope, receive, send):  # as Serve's proxy answers its timeout or backpressure
        await send({"type": "http.response.start", "status": 408,
                    "headers": [(b"content-type", b"text/plain"), (b"x-request-id", b"abc"), (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": b"Request timed out", "more_body": True})
        await send({"type": "http.response.body", "body": b" after 60 s."})

    status, body, headers = _asgi(ProxyGuard(plain_error), [{"type": "http.request", "body": b""}])
    assert status == 408 and json.loads(body) == {"error": "Request timed out after 60 s.", "request_id": "abc"}
    assert (b"retry-after", b"2") in headers and (b"content-type", b"application/json") in headers
    assert dict(headers)[b"content-length"] == str(len(body)).encode()


def test_a_proxy_that_fails_or_answers_nothing_still_gives_json():
    import json

    from eco_ray.serve.proxy import ProxyGuard

    async def raises(scope, receive, send):  # the proxy's own failure, before any response
        raise RuntimeError("replica lost")

    async def silent(scope, receive, send):  # Serve's proxy sends nothing for some errors
        scope["headers"].append((b"x-request-id", b"rid-1"))  # as its RequestIdMiddleware does

    status, body, headers = _asgi(ProxyGuard(raises), [{"type": "http.request", "body": b""}])
    assert status == 500 and json.loads(body)["error"] and dict(headers)[b"x-request-id"]
    status, body, headers = _asgi(ProxyGuard(silent), [{"type": "http.request", "body": b""}])
    assert status == 502 and json.loads(body)["request_id"] == "rid-1" and dict(headers)[b"x-request-id"] == b"rid-1"


def _engine_with_known_scores(predicted_quality, default_beta=0.05, kind="quality"):
    """A tiny random parent behind a gate whose scores are ``predicted_quality`` (one per exit, relative to the
    deepest exit's as a fitted quality gate's are) for every image: the gate's weights are 0, its bias those."""
    import torch

    from eco_ray.model.config import load_model_config
    from eco_ray.model.early_exit import EarlyExitMask2Former
    from eco_ray.model.gates import ExitClassifierGate, QualityGate
    from eco_ray.serve.engine import engine_from

    torch.manual_seed(0)
    parent = EarlyExitMask2Former(load_model_config("tiny", ["num_labels=3"]))
    gate = QualityGate(parent.config.hidden_dim, parent.exits) if kind == "quality" else \
        ExitClassifierGate(parent.config.hidden_dim, parent.exits)
    layer = gate.net if kind == "quality" else gate.linear
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.as_tensor(predicted_quality))
    cats = [{"id": i + 1, "name": f"c{i}", "isthing": int(i < 2)} for i in range(3)]
    gflops = [0.1 * (i + 1) for i in range(len(parent.exits))]
    meta = {"costs": {"gflops": gflops}, "cost": "gflops", "beta": default_beta, "gate_input": "stride32"}
    return engine_from(parent, {"categories": cats}, gate, meta)


def test_targets_in_the_clients_units_and_missed_targets_said():
    import numpy as np

    # predicted PQ relative to full depth; with beta 0.05 and costs 0.2..1.0 the gate alone takes exit 5
    engine = _engine_with_known_scores([-0.40, -0.20, -0.08, -0.005, 0.0])
    assert engine.exits == [2, 3, 4, 5, 6]
    image = np.full((64, 64, 3), 90, np.uint8)
    table = [10.0, 20.0, 30.0, 40.0, 50.0]

    def served(**params):
        engine.latency_ms = list(table)  # this replica's table, set so that the test is not this machine's timing
        (result,) = engine.respond([image], [RequestControl.parse(params)], [{"mask_format": "rle"}])
        return result["exit"], result.get("target")

    assert served() == (5, None) and served(exit=3) == (3, None) and served(beta=0) == (6, None)
    # budgets cap the exits, the gate decides among them
    assert served(max_latency_ms=1e6)[0] == 5 and served(max_latency_ms=1e6)[1]["met"] is True
    assert served(max_latency_ms=35)[0] == 4 and served(max_gflops=0.25)[0] == 3
    exit_, target = served(max_latency_ms=5)  # none fits: the cheapest, and the response says so
    assert exit_ == 2 and target == {"name": "max_latency_ms", "limit": 5.0, "met": False, "predicted_ms": 10.0}
    assert served(max_gflops=0.001) == (2, {"name": "max_gflops", "limit": 0.001, "met": False})
    table = [30.0, 20.0, 25.0, 40.0, 50.0]  # a measured table need not rise with depth
    assert served(max_latency_ms=5)[0] == 3
    table = [10.0, 20.0, 30.0, 40.0, 50.0]
    # the cheapest exit predicted within the drop of full depth's quality
    assert served(max_quality_drop=0.1) == (4, {"name": "max_quality_drop", "limit": 0.1, "met": True})
    assert served(max_quality_drop=0.0)[0] == 6 and served(max_quality_drop=1.0)[0] == 2
    # a single image served updates its exit's figure; a batch of several does not
    engine.latency_ms = list(table)
    engine.respond([image], [RequestControl()], [{"mask_format": "rle"}])
    assert engine.latency_ms[3] != 40.0 and engine.latency_ms[:3] == table[:3]
    engine.latency_ms = list(table)
    engine.respond([image, image], [RequestControl(), RequestControl()], [{"mask_format": "rle"}] * 2)
    assert engine.latency_ms == table
    # measured on this machine when a replica starts
    assert all(t > 0 for t in engine.measure_latency(repeats=1))
    engine.latency_ms = None
    with pytest.raises(InputError, match="has not measured"):
        engine.allowed_exits(RequestControl.parse({"max_latency_ms": "50"}))
    classifier = _engine_with_known_scores([0.0, 0.0, 0.0, 0.0, 1.0], kind="classify")
    with pytest.raises(InputError, match="max_quality_drop needs a quality gate"):
        classifier.allowed_exits(RequestControl.parse({"max_quality_drop": "0.1"}))
    for params in ({"max_latency_ms": "1", "beta": "0"}, {"max_quality_drop": "x"}, {"max_quality_drop": "2"}):
        with pytest.raises(InputError) as e:
            RequestControl.parse(params)
        assert e.value.status == 422
    with pytest.raises(InputError, match="at most one"):
        RequestControl(exit=6, max_quality_drop=0.1)


def _detector_engine(tmp_path):
    """A tiny random detector and a classification gate, saved as files and loaded as a replica loads them."""
    import torch

    from eco_ray.model.config import load_model_config
    from eco_ray.model.gates import ExitClassifierGate
    from eco_ray.model.io import build_parent, save_gate, save_parent
    from eco_ray.serve.engine import load_engine

    torch.manual_seed(0)
    parent = build_parent(load_model_config("tiny", ["num_labels=2"], task="detection")).eval()
    cats = [{"id": 5, "name": "gem"}, {"id": 9, "name": "key"}]  # as COCO instance files give them
    save_parent(parent, tmp_path / "parent", extra={"categories": cats})
    gate = ExitClassifierGate(parent.config.gate_dim, parent.exits)
    record = {"task": "detection", "costs": {"gflops": [0.1 * (i + 1) for i in range(len(parent.exits))]},
              "cost": "gflops", "beta": 0.05, "gate_input": "stride32"}
    save_gate(gate, tmp_path / "gate", extra=record)
    save_gate(gate, tmp_path / "panoptic-gate", extra={**record, "task": "panoptic"})
    engine, _ = load_engine(str(tmp_path / "parent"), str(tmp_path / "gate"), f"sqlite:///{tmp_path}/mlflow.db")
    return engine, parent


def test_a_detector_is_served_in_cocos_result_format_at_each_images_own_size(tmp_path):
    import torch

    from eco_ray.data.collate import pixel_values
    from eco_ray.model.postprocess import to_detections
    from eco_ray.serve.engine import load_engine
    from eco_ray.tasks import get_task

    engine, parent = _detector_engine(tmp_path)
    assert engine.task_name == "detection" and engine.task.route == "detect"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 160, 3), np.uint8), rng.integers(0, 255, (200, 120, 3), np.uint8)]
    options = [get_task("detection").response_options({}), get_task("detection").response_options(
        {"min_score": "0.2", "image_id": "42"})]
    results = engine.respond(images, [RequestControl(exit=3), RequestControl(exit=6)], options)
    # each image at its forced exit, boxes in its own pixels, equal to the parent's output post-processed
    for im, r, k, opts in zip(images, results, (3, 6), options):
        x = pixel_values([np.asarray(Image.fromarray(im).resize((128, 128), Image.BILINEAR))])
        with torch.no_grad():
            ref = [d for d in to_detections(parent.forward_exits(x, [k])[k], [5, 9], [im.shape[:2]])[0]
                   if d["score"] >= opts["min_score"]]
        assert r["exit"] == k and (r["height"], r["width"]) == im.shape[:2] and "segments" not in r
        assert len(r["detections"]) == len(ref) > 0 or opts["min_score"] > 0
        for d, e in zip(r["detections"], ref):
            assert d["category_id"] == e["category_id"] and d["category"] == {5: "gem", 9: "key"}[e["category_id"]]
            np.testing.assert_allclose(d["bbox"], e["bbox"], atol=0.01)
            assert d["score"] == pytest.approx(e["score"], abs=1e-4)
            x0, y0, w, h = d["bbox"]
            assert -0.01 <= x0 and x0 + w <= im.shape[1] + 0.01 and -0.01 <= y0 and y0 + h <= im.shape[0] + 0.01
    pairs = parent.config.num_queries * 2  # every (query, class) pair when fewer than COCO's 100 exist
    assert len(results[0]["detections"]) == min(100, pairs) and "image_id" not in results[0]["detections"][0]
    assert all(d["image_id"] == 42 and d["score"] >= 0.2 for d in results[1]["detections"])
    # the gate decides without a forced exit; the per-request budgets are the segmenter's
    (r,) = engine.respond(images[:1], [RequestControl.parse({"max_gflops": "0.25"})], options[:1])
    assert r["exit"] in (2, 3) and r["target"] == {"name": "max_gflops", "limit": 0.25, "met": True}
    # bad detection options, and a gate of another task, get clear errors
    for params, says in (({"min_score": "2"}, r"in \[0, 1\]"), ({"min_score": "x"}, "not a number"),
                         ({"image_id": "1.5"}, "not an integer")):
        with pytest.raises(InputError, match=says) as e:
            get_task("detection").response_options(params)
        assert e.value.status == 422
    with pytest.raises(ValueError, match="fitted for panoptic, but .* is a detection parent"):
        load_engine(str(tmp_path / "parent"), str(tmp_path / "panoptic-gate"), f"sqlite:///{tmp_path}/m.db")
    with pytest.raises(ValueError, match="holds a detection parent; this takes a panoptic parent"):
        load_engine(str(tmp_path / "parent"), str(tmp_path / "gate"), f"sqlite:///{tmp_path}/m.db", task="panoptic")
