"""Ray Serve application: an HTTP ingress (FastAPI) in front of autoscaled gated-segmenter replicas.

- ``POST /v1/segment``: an image (raw bytes with an image content type, or multipart with a ``file``
  part) -> the panoptic result, the exit used, the encoder GFLOPs spent, model versions and timing.
  Query parameters: ``max_gflops`` | ``beta`` | ``exit`` (per-request compute control), ``mask_format``
  (``png`` or ``rle``).
- ``GET /v1/models``: the deployed parent and gate and the gate's operating points; ``GET /healthz``.
- Requests are batched (``@serve.batch``) on the segmenter; a batch runs as one parent pass in which
  each row leaves the encoder at its own exit and the heads run once on the whole batch.
- Models come from MLflow by URI/alias in the segmenter's ``user_config``; ``serve deploy`` of an updated
  config (e.g. a new ``revision`` after ``eco-ray select`` moved the alias) reloads them in place: the new
  models are loaded first and swapped in one assignment, so in-flight requests finish on the old ones.
- Every bad input is a 4xx with a JSON body ``{"error": ...}``; nothing a client sends kills a replica.

(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotation of the
ingress methods to inject the request.)
"""


import asyncio
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from eco_ray.model.postprocess import OVERLAP_THRESHOLD
from eco_ray.serve.engine import MASK_FORMATS, InputError, Limits, RequestControl, decode_image

api = FastAPI(title="eco-ray", description="Early-exit Mask2Former: per-image encoder depth under a compute budget")


@serve.deployment(name="Segmenter", max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class Segmenter:
    def __init__(self):
        from ray.serve.metrics import Counter

        self.engine = None
        self.gate_meta: dict = {}
        self.config: dict = {}
        self.exits_used = Counter("eco_exits_used", description="images served per encoder exit", tag_keys=("exit",))
        self.gflops_spent = Counter("eco_encoder_gflops_spent", description="encoder GFLOPs spent on served images")

    def reconfigure(self, config: dict) -> None:
        import torch

        from eco_ray.serve.engine import load_engine

        torch.set_num_threads(int(config.get("torch_threads", 1)))
        tracking = config.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking:
            raise ValueError("the Segmenter needs user_config.tracking_uri or $MLFLOW_TRACKING_URI")
        engine, gate_meta = load_engine(config["parent_uri"], config["gate_uri"], tracking,
                                        config.get("default_beta"), float(config.get("threshold", 0.5)),
                                        float(config.get("mask_threshold", 0.5)),
                                        float(config.get("overlap_threshold", OVERLAP_THRESHOLD)))
        engine.versions["revision"] = config.get("revision", 0)
        # one assignment: a batch already running keeps the engine it started with
        self.engine, self.gate_meta, self.config = engine, gate_meta, dict(config)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _segment_batch(self, items: list[tuple]) -> list:
        engine = self.engine
        images, controls, formats = zip(*items)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                None, engine.segment, list(images), list(controls), list(formats))
        except InputError:
            # one request's control was invalid: score the batch one by one so the others still succeed
            results = []
            for item in items:
                try:
                    results.append(engine.segment([item[0]], [item[1]], [item[2]])[0])
                except InputError as e:
                    results.append(e)
        for r in results:
            if isinstance(r, dict):
                self.exits_used.inc(1, tags={"exit": str(r["exit"])})
                self.gflops_spent.inc(r["encoder_gflops"])
        return results

    async def segment(self, image, control: RequestControl, mask_format: str):
        return await self._segment_batch((image, control, mask_format))

    def describe(self) -> dict:
        e = self.engine
        return {"versions": e.versions, "exits": e.exits, "encoder_gflops_per_exit": e.gflops,
                "default_beta": e.default_beta, "gate_kind": e.versions.get("gate_kind"),
                "gate_cost": e.versions.get("gate_cost"),
                "operating_points": self.gate_meta.get("operating_points", []),
                "parent_uri": self.config.get("parent_uri"), "gate_uri": self.config.get("gate_uri")}


@serve.deployment(name="Ingress", max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, segmenter):
        self.segmenter = segmenter
        self.limits = Limits()
        self.api_key: str | None = None

    def reconfigure(self, config: dict) -> None:
        self.limits = Limits(int(config.get("max_image_bytes", Limits.max_image_bytes)),
                             int(config.get("max_pixels", Limits.max_pixels)))
        self.api_key = config.get("api_key") or None

    def _check_key(self, request: Request) -> None:
        if self.api_key and request.headers.get("x-api-key") != self.api_key:
            raise InputError(401, "missing or wrong X-API-Key header")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._check_key(request)
        except InputError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return await self.segmenter.describe.remote()

    @api.post("/v1/segment")
    async def segment(self, request: Request):
        t0 = time.perf_counter()
        try:
            self._check_key(request)
            control = RequestControl.parse(dict(request.query_params))
            mask_format = request.query_params.get("mask_format", "png")
            if mask_format not in MASK_FORMATS:
                raise InputError(422, f"mask_format must be one of {list(MASK_FORMATS)}, got {mask_format!r}")
            data, ctype = await self._read_image_body(request, self.limits)
            image = decode_image(data, ctype, self.limits)
            result = await self.segmenter.segment.remote(image, control, mask_format)
            if isinstance(result, InputError):
                raise result
        except InputError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        result["timing_ms"]["total"] = round((time.perf_counter() - t0) * 1e3, 2)
        return result

    @staticmethod
    async def _read_image_body(request: Request, limits: Limits) -> tuple[bytes, str]:
        ctype = request.headers.get("content-type", "")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_image_bytes + 1_000_000:
            raise InputError(413, f"request of {declared} bytes exceeds the limit of {limits.max_image_bytes} bytes")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form()
            except Exception as e:  # malformed multipart body
                raise InputError(400, f"malformed multipart body: {e}") from None
            part = form.get("file")
            if part is None or not hasattr(part, "read"):
                raise InputError(400, "multipart body without a 'file' part")
            return await part.read(), part.content_type or ""
        body = await request.body()
        return body, ctype


def app_builder(args: dict) -> serve.Application:
    """``serve run eco_ray.serve.app:app_builder`` (or deploy/serve_config.yaml): args are unused; models and
    limits come from each deployment's user_config."""
    return Ingress.bind(Segmenter.bind())
