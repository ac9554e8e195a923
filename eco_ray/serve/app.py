"""Ray Serve application: an HTTP ingress (FastAPI) in front of autoscaled replicas of the gated parent (the
``Segmenter`` deployment, which serves a segmenter or a detector: the task of the models it is given).

- ``POST /v1/segment`` (a segmenter) and ``POST /v1/detect`` (a detector): an image (raw bytes with an image
  content type, or multipart with a ``file`` part) -> the panoptic result or the COCO detections, the exit
  used, the encoder GFLOPs spent, model versions and timing. Query parameters: ``max_gflops`` |
  ``max_latency_ms`` | ``max_quality_drop`` | ``beta`` | ``exit`` (per-request compute control, the same for
  both tasks; a cost target no exit meets is served and reported as missed); for a segmenter ``mask_format``
  (``png`` or ``rle``), for a detector ``min_score`` and ``image_id`` (copied into each detection). The route of
  the other task answers 404, naming the right one.
- ``GET /v1/models``: the deployed parent and gate (pinned versions), their operating points, and the error
  of a model swap that failed; ``GET /healthz``: the ingress and a Segmenter replica answer.
- Requests are batched (``@serve.batch``) on the segmenter; a batch runs as one parent pass in which
  each row leaves the encoder at its own exit and the heads run once on the whole batch.

What a client can send, and what it gets (every non-2xx has a JSON body ``{"error", "request_id"}``):
- the body is counted as it streams in, whatever Content-Length says (chunked bodies too): 413 past the limit;
- only PNG, JPEG and WebP bytes are decoded (415 otherwise), and the pixel count is checked from the header
  before decoding (413: no decompression bombs);
- a bad control (422) is refused before its request joins a batch; the Segmenter's queue is bounded, and a
  full one answers 429 with Retry-After; a Segmenter that does not answer in time (a replica lost, being
  replaced) answers 503 with Retry-After; anything unexpected is a 503 whose request id is in the log;
- models come from MLflow, pinned to fixed versions when the app is deployed (eco_ray/serve/run.py), so every
  replica, also one autoscaling starts later, serves the same ones; ``serve deploy`` of a new user_config
  (a bumped ``revision``) swaps them in place, and a swap that fails keeps the old models serving;
- an API key, if any, comes from an environment variable named in the config (a Kubernetes Secret), never
  from the config itself (Serve's REST API shows every user_config), and is compared in constant time.

(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotation of the
ingress methods to inject the request.)
"""


import asyncio
import hmac
import logging
import os
import time
import uuid

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from eco_ray.model.postprocess import OVERLAP_THRESHOLD
from eco_ray.serve.engine import InputError, Limits, RequestControl, decode_image
from eco_ray.serve.http import RETRY_AFTER_S, error_response as _error, read_image_body

logger = logging.getLogger("ray.serve")
SEGMENT_TIMEOUT_S = 30.0  # the ingress's wait for a Segmenter before it answers 503
STUCK_BATCH_S = 300.0  # user_config.stuck_batch_s: a batch running longer than this hangs (set it well above
# the slowest batch of the served model: about 0.3 s for `small` at 128 px on one CPU core)
LATENCY_REPEATS = 3  # user_config.latency_repeats: timed runs per exit at start (0: no max_latency_ms)
GAUGE_REFRESH_S = 1.0  # how often a replica reads its load level and sets the gauges (Ray's fastest report)

api = FastAPI(title="eco-ray", description="Early-exit Mask2Former: per-image encoder depth under a compute budget",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):  # unknown path, wrong method
    return _error(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):  # anything the endpoints did not catch themselves
    request_id = uuid.uuid4().hex[:16]
    logger.error("eco-ray request %s failed", request_id, exc_info=exc)
    return _error(503, f"the request could not be served ({type(exc).__name__}); request id {request_id}",
                  request_id, retry_after=RETRY_AFTER_S)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _error(422, f"invalid request: {exc.errors()[:3]}")


PINS_ACTOR, PINS_NAMESPACE = "eco-ray-model-pins", "eco-ray"


@ray.remote(num_cpus=0, max_restarts=-1)
class ModelPins:
    """The model versions each (URIs, revision) was pinned to, for the cluster's lifetime (on the head node,
    which the autoscaler never removes)."""

    def __init__(self):
        self.pins: dict = {}

    def get(self, key: str) -> dict | None:
        return self.pins.get(key)

    def setdefault(self, key: str, value: dict) -> dict:
        return self.pins.setdefault(key, value)


def pinned_model_uris(config: dict, tracking_uri: str) -> dict:
    """The parent and gate URIs of ``config`` as fixed versions, the same for every replica of one revision:
    the first replica to resolve ``@alias`` / ``latest`` records the versions in a named actor, and replicas
    started later (autoscaling, a restart, a rolling update) load those, also after the alias moved (or was
    deleted); a new ``revision`` resolves anew. (``eco-ray serve`` pins before it deploys; this covers ``serve
    deploy`` and the RayService, which deploy the config file as it is.) Returns the keys to update: pinned URIs
    and the ``*_requested`` ones."""
    import json

    from eco_ray.serve.run import is_pinned, pin_model_uri

    uris = {k: config[k] for k in ("parent_uri", "gate_uri")}
    if all(is_pinned(u) for u in uris.values()):
        return {}
    key = json.dumps([uris, config.get("revision", 0), tracking_uri])
    pins = None
    if ray.is_initialized():  # a replica; not a Segmenter built in a plain process (tests, benchmarks)
        try:
            pins = ModelPins.options(name=PINS_ACTOR, namespace=PINS_NAMESPACE, lifetime="detached",
                                     get_if_exists=True, resources={"node:__internal_head__": 0.001}).remote()
            pinned = ray.get(pins.get.remote(key), timeout=30)
        except Exception as e:  # noqa: BLE001 - without the record, serve what the alias points at now
            logger.warning("eco-ray: model pins unavailable (%s): resolving the aliases on this replica", e)
            pins, pinned = None, None
    else:
        pinned = None
    if pinned is None:
        pinned = {k: pin_model_uri(u, tracking_uri) for k, u in uris.items()}
        if pins is not None:
            pinned = ray.get(pins.setdefault.remote(key, pinned), timeout=30)
    return {**pinned, **{f"{k}_requested": u for k, u in uris.items() if pinned[k] != u}}


class ServingMetrics:
    """What a Segmenter replica exports to Prometheus (through Ray's metrics agent, as ``ray_<name>``; Serve
    adds the deployment, replica and application tags): images and GFLOPs served, the full-depth GFLOPs those
    images would have cost (their difference is the compute saved), the adaptive level, the requests held, the
    time in the replica per exit and the targets missed."""

    LATENCY_BOUNDS_MS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.full_depth_gflops = 0.0
        self.images = Counter("eco_images_served", description="images served, by the encoder exit they left at",
                              tag_keys=("exit",))
        self.gflops = Counter("eco_encoder_gflops_served", description="encoder GFLOPs spent on served images")
        self.gflops_full = Counter("eco_encoder_gflops_full_depth",
                                   description="encoder GFLOPs the served images would have cost at full depth")
        self.missed = Counter("eco_targets_missed", description="requests whose target no exit met",
                              tag_keys=("target",))
        self.shed = Counter("eco_requests_shed", description="requests refused (429) by the load policy")
        self.level = Gauge("eco_load_level", description="the load-adaptive level (0: every exit served)")
        self.held = Gauge("eco_requests_held", description="requests on the replica, queued or in a batch")
        self.latency = Histogram("eco_request_latency_ms", description="time in the replica (queue + batch), by exit",
                                 boundaries=self.LATENCY_BOUNDS_MS, tag_keys=("exit",))

    def served(self, result, ms: float) -> None:
        if not isinstance(result, dict):  # an InputError returned to the ingress, a failure: nothing served
            return
        try:
            exit_tag = {"exit": str(result["exit"])}
            self.images.inc(1, tags=exit_tag)
            self.gflops.inc(result["encoder_gflops"])
            self.gflops_full.inc(self.full_depth_gflops)
            self.latency.observe(ms, tags=exit_tag)
            target = result.get("target")
            if target is not None and target.get("met") is False:
                self.missed.inc(1, tags={"target": target["name"]})
        except Exception:  # noqa: BLE001 - a metric never costs a client the answer it was served
            logger.exception("eco-ray: recording the serving metrics failed")

    def observe(self, level: int, held: int) -> None:
        try:
            self.level.set(level)
            self.held.set(held)
        except Exception:  # noqa: BLE001 - as above
            logger.exception("eco-ray: recording the serving metrics failed")


@serve.deployment(name="Segmenter", max_ongoing_requests=16, max_queued_requests=64,
                  ray_actor_options={"num_cpus": 1}, health_check_period_s=10, health_check_timeout_s=30)
class Segmenter:
    def __init__(self):
        from eco_ray.serve.load import LoadController, LoadPolicy

        # the engine and the load controller for its exits, swapped together in one assignment: a batch reads
        # the pair once (Serve runs reconfigure, the health check and describe in threads beside the batches)
        self.serving: tuple = (None, LoadController(LoadPolicy(), [0]))
        self.gate_meta: dict = {}
        self.config: dict = {}
        self.swap_error: str | None = None
        self.batch_started: float | None = None  # monotonic time the running batch began
        self.held = 0  # requests on this replica, queued for a batch or in one (the load signal)
        self.metrics = ServingMetrics()
        self._ticker = None

    @property
    def engine(self):
        return self.serving[0]

    @property
    def load(self):
        return self.serving[1]

    def reconfigure(self, config: dict) -> None:
        """Load the models of ``config`` and swap them in. A replica that already serves keeps its models when
        the new ones cannot be loaded (the error is reported by /v1/models); a new replica fails to start."""
        import torch

        from eco_ray.serve.engine import load_engine
        from eco_ray.serve.load import LoadController, LoadPolicy

        try:
            torch.set_num_threads(int(config.get("torch_threads", 1)))
            tracking = config.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
            if not tracking:
                raise ValueError("the Segmenter needs user_config.tracking_uri or $MLFLOW_TRACKING_URI")
            config = {**config, **pinned_model_uris(config, tracking)}
            repeats = config.get("latency_repeats", LATENCY_REPEATS)
            if isinstance(repeats, bool) or not isinstance(repeats, int) or not 0 <= repeats <= 50:
                raise ValueError(f"latency_repeats must be a whole number from 0 to 50, got {repeats!r}")
            engine, gate_meta = load_engine(config["parent_uri"], config["gate_uri"], tracking,
                                            config.get("default_beta"), float(config.get("threshold", 0.5)),
                                            float(config.get("mask_threshold", 0.5)),
                                            float(config.get("overlap_threshold", OVERLAP_THRESHOLD)))
            policy = LoadPolicy.parse(config.get("adaptive"), engine.exits)
            if repeats > 0:  # on this replica's own hardware, before it serves: what max_latency_ms reads
                engine.measure_latency(repeats)
        except Exception as e:  # noqa: BLE001 - any failure to load: keep what serves
            if self.engine is None:
                raise
            self.swap_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.error("eco-ray: model swap to revision %s failed, still serving revision %s: %s",
                         config.get("revision"), self.config.get("revision"), self.swap_error)
            return
        engine.versions["revision"] = config.get("revision", 0)
        load = LoadController(policy, engine.exits, time.monotonic())
        self.metrics.full_depth_gflops = engine.gflops[-1]
        self.gate_meta, self.config, self.swap_error = gate_meta, dict(config), None
        self.serving = (engine, load)  # a batch already running keeps the pair it started with

    async def check_health(self) -> None:
        """Serve's health check: a replica whose batch has run for longer than any batch can (a hung forward
        pass, a wedged thread) is replaced."""
        self._ensure_ticker()
        started = self.batch_started
        if started is not None and time.monotonic() - started > float(self.config.get("stuck_batch_s",
                                                                                     STUCK_BATCH_S)):
            raise RuntimeError(f"a batch has been running for {time.monotonic() - started:.0f} s")

    def _ensure_ticker(self) -> None:
        """Read the load level every GAUGE_REFRESH_S on the event loop: it relaxes while idle, and Ray drops a
        gauge that is not set again within two metrics report intervals."""
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            self._observe_load()
            await asyncio.sleep(GAUGE_REFRESH_S)

    def _observe_load(self, load=None):
        """The load cap in force now (None: adaptive depth off), the gauges set to what it saw."""
        from eco_ray.serve.engine import LoadCap

        load = load if load is not None else self.load
        level, cap = load.observe(self.held, time.monotonic())
        self.metrics.observe(level, self.held)
        if not load.policy.enabled:
            return None
        return LoadCap(level, cap, load.floor_exit, load.policy.precedence == "load")

    @staticmethod
    def _run_batch(engine, items: list[tuple], cap) -> list:
        """One batch on ``engine`` (in an executor thread): each request's result, or its InputError."""
        results: list = [None] * len(items)
        run = []
        for i, (_, control, _) in enumerate(items):
            try:  # checked on arrival, but a swap may have come since (e.g. to latency_repeats: 0)
                engine.allowed_exits(control)
                run.append(i)
            except InputError as e:
                results[i] = e  # that request's answer; the others still run
        if run:
            images, controls, options = zip(*(items[i] for i in run))
            for i, r in zip(run, engine.respond(list(images), list(controls), list(options), cap)):
                results[i] = r
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _infer_batch(self, items: list[tuple]) -> list:
        engine, load = self.serving
        cap = self._observe_load(load)
        self.batch_started = time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._run_batch, engine, items, cap)
        finally:
            self.batch_started = None

    async def infer(self, image, control: RequestControl, options: dict, task: str):
        """One image of the route of ``task`` (``options``: its response options, checked by the ingress)."""
        if task != self.engine.task_name:
            route = self.engine.task.route
            return InputError(404, f"this service serves a {self.engine.task_name} model: POST /v1/{route}")
        try:
            self.engine.allowed_exits(control)  # a bad control never joins (and never costs) a batch
        except InputError as e:
            return e
        self._ensure_ticker()
        if self.load.sheds(self.held, time.monotonic()):
            self.metrics.shed.inc(1)
            return InputError(429, f"the replica holds {self.held} requests at its shallowest allowed depth: retry "
                                   f"later")
        t0 = time.monotonic()
        self.held += 1
        result = None
        try:
            result = await self._infer_batch((image, control, options))
        finally:  # a failed or cancelled request's time counts too: the slowest are the signal
            self.held -= 1
            ms = (time.monotonic() - t0) * 1e3
            self.load.record_latency(ms, time.monotonic())
            self.metrics.served(result, ms)
            self._observe_load()
        return result

    def describe(self) -> dict:
        e = self.engine
        self._observe_load()
        return {"task": e.task_name, "route": f"/v1/{e.task.route}", "versions": e.versions, "exits": e.exits, "encoder_gflops_per_exit": e.gflops,
                "latency_ms_per_exit": e.latency_ms, "load": {**self.load.state(), "held": self.held},
                "default_beta": e.default_beta, "gate_kind": e.versions.get("gate_kind"),
                "gate_cost": e.versions.get("gate_cost"),
                "operating_points": self.gate_meta.get("operating_points", []),
                "parent_uri": self.config.get("parent_uri"), "gate_uri": self.config.get("gate_uri"),
                "requested": {k: self.config.get(f"{k}_requested") for k in ("parent_uri", "gate_uri")},
                "revision": self.config.get("revision", 0), "swap_error": self.swap_error}

    def ping(self) -> bool:
        return self.engine is not None


@serve.deployment(name="Ingress", max_ongoing_requests=64, max_queued_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, segmenter):
        self.segmenter = segmenter
        self.limits = Limits()
        self.api_key: str | None = None
        self.docs = True
        self.timeout_s = SEGMENT_TIMEOUT_S

    def reconfigure(self, config: dict) -> None:
        if config.get("api_key"):
            raise ValueError("api_key in user_config would be readable through Serve's REST API: put the key in an "
                             "environment variable of the replicas (a Kubernetes Secret) and name it in api_key_env")
        self.limits = Limits(int(config.get("max_image_bytes", Limits.max_image_bytes)),
                             int(config.get("max_pixels", Limits.max_pixels)))
        env = config.get("api_key_env")
        self.api_key = os.environ.get(env) if env else None
        if env and not self.api_key:
            raise ValueError(f"api_key_env names {env!r}, but the replica has no such environment variable")
        docs = config.get("docs", "auto")
        self.docs = (not self.api_key) if docs in (None, "auto") else bool(docs)
        self.timeout_s = float(config.get("segment_timeout_s", SEGMENT_TIMEOUT_S))

    def _check_key(self, request: Request) -> None:
        if self.api_key and not hmac.compare_digest(request.headers.get("x-api-key", "").encode(),
                                                     self.api_key.encode()):
            raise InputError(401, "missing or wrong X-API-Key header")

    @api.get("/healthz")
    async def healthz(self):
        """Liveness of the ingress and of (one replica of) the Segmenter."""
        from ray.serve.exceptions import BackPressureError

        try:
            await self._call(self.segmenter.ping.remote(), 10)
        except BackPressureError:  # alive, only busy: a load balancer must not take it out
            return {"status": "busy"}
        except Exception as e:  # noqa: BLE001 - any other failure: not healthy
            return _error(503, f"the segmenter does not answer ({type(e).__name__})", retry_after=RETRY_AFTER_S)
        return {"status": "ok"}

    @staticmethod
    async def _call(response, timeout_s: float):
        """A Segmenter call's result within ``timeout_s``; past it the call is cancelled (not only the wait for
        it), so an abandoned request does not keep a replica busy."""
        try:
            return await asyncio.wait_for(response, timeout=timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._check_key(request)
            return await self._call(self.segmenter.describe.remote(), self.timeout_s)
        except InputError as e:
            return _error(e.status, str(e))
        except Exception as e:  # noqa: BLE001
            return self._unavailable(e)

    @api.get("/openapi.json")
    async def openapi(self):
        return api.openapi() if self.docs else _error(404, "Not Found")

    @api.get("/docs")
    async def docs_page(self):
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="eco-ray") if self.docs else \
            _error(404, "Not Found")

    @api.post("/v1/segment")
    async def segment(self, request: Request):
        """A segmenter's panoptic result."""
        return await self._answer(request, "panoptic")

    @api.post("/v1/detect")
    async def detect(self, request: Request):
        """A detector's COCO detections."""
        return await self._answer(request, "detection")

    async def _answer(self, request: Request, task: str):
        from eco_ray.tasks import get_task

        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        try:
            self._check_key(request)
            control = RequestControl.parse(dict(request.query_params))
            options = get_task(task).response_options(request.query_params)
            data, ctype = await read_image_body(request, self.limits)
            image = decode_image(data, ctype, self.limits)
            result = await self._call(self.segmenter.infer.remote(image, control, options, task), self.timeout_s)
            if isinstance(result, InputError):
                raise result
        except InputError as e:
            return _error(e.status, str(e), request_id, retry_after=RETRY_AFTER_S if e.status == 429 else None)
        except Exception as e:  # noqa: BLE001 - never a traceback or a hang: a JSON 429/503 and the log line
            return self._unavailable(e, request_id)
        result["timing_ms"]["total"] = round((time.perf_counter() - t0) * 1e3, 2)
        result["request_id"] = request_id
        return result

    def _unavailable(self, e: Exception, request_id: str | None = None) -> JSONResponse:
        from ray.serve.exceptions import BackPressureError

        request_id = request_id or uuid.uuid4().hex[:16]
        if isinstance(e, BackPressureError):
            return _error(429, "the segmenter's queue is full: retry later", request_id, retry_after=RETRY_AFTER_S)
        if isinstance(e, asyncio.TimeoutError):
            return _error(503, f"no segmenter answered within {self.timeout_s:g} s", request_id,
                          retry_after=RETRY_AFTER_S)
        logger.exception("eco-ray request %s failed", request_id)
        return _error(503, f"the request could not be served ({type(e).__name__}); request id {request_id}",
                      request_id, retry_after=RETRY_AFTER_S)


def app_builder(args: dict) -> serve.Application:
    """``serve run eco_ray.serve.app:app_builder`` (or the shipped Serve config): args are unused; models and
    limits come from each deployment's user_config."""
    return Ingress.bind(Segmenter.bind())
