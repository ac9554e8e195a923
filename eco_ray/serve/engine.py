"""The gated parent, Ray-free: decode + check an image, pick each image's exit (gate + per-request control), run
the parent once per batch with rows leaving the encoder at their exits, encode the result in its task's response
format (a segmenter's panoptic segments, a detector's COCO detections: ``eco_ray.tasks``).

A request's exit is decided by the one rule, ``eco_ray.tradeoff.choose``, over the gate's scores, with the
costs of the measure the gate was fitted with (``cost`` in its record: GFLOPs, latency or layers), so a
served image gets exactly the exit the derived table's evaluation gave it; a per-request target restricts
the exits allowed: a cost budget (``max_gflops`` or ``max_latency_ms``, the one Budget type; the cheapest exit
when none fits, and the response says the target was missed) or ``max_quality_drop`` (the quality gate's
prediction, in the task's metric: PQ or AP).

Ray Serve (eco_ray/serve/app.py) wraps this in deployments; tests and benchmarks can call it directly.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from eco_ray.budget import Budget, BudgetError
from eco_ray.data.collate import pixel_values
from eco_ray.derive.table import relative_costs
from eco_ray.metrics.panoptic import CategorySet
from eco_ray.model.gates import gate_scores
from eco_ray.model.postprocess import OVERLAP_THRESHOLD
from eco_ray.tasks import get_task
from eco_ray.tradeoff import choose

logger = logging.getLogger("ray.serve")

IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
# what the bytes must be, whatever the declared type says: Pillow would otherwise decode any of its ~40 formats
# (TIFF, GIF, ICO, PPM, EPS through Ghostscript, ...) for any client that asks
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MASK_FORMATS = ("png", "rle")


class InputError(ValueError):
    """A request the service refuses: ``status`` is the HTTP status (4xx), the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # crosses process boundaries (Serve replica -> ingress) intact
        return InputError, (self.status, str(self))


@dataclass
class Limits:
    max_image_bytes: int = 10_000_000
    max_pixels: int = 4_000_000  # width x height of the decoded image


def decode_image(data: bytes, content_type: str | None, limits: Limits) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8, or an InputError with the right 4xx status. Only PNG, JPEG and WebP are
    decoded (by what the bytes are, not what the request says they are); the pixel count is checked from the
    header before any pixel is decoded."""
    import warnings

    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in IMAGE_TYPES:
        raise InputError(415, f"content type {content_type or '(none)'!r} is not an accepted image type; send one "
                              f"of {list(IMAGE_TYPES)} or multipart/form-data with a 'file' part")
    if not data:
        raise InputError(400, "empty body: no image bytes")
    if len(data) > limits.max_image_bytes:
        raise InputError(413, f"image of {len(data)} bytes exceeds the limit of {limits.max_image_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
                w, h = probe.size
                if w * h > limits.max_pixels:
                    raise InputError(413, f"image of {w}x{h} pixels exceeds the limit of {limits.max_pixels} pixels")
                probe.verify()  # structure and checksums, without decoding the pixels
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                img.load()  # a truncated file fails here
                rgb = np.asarray(img.convert("RGB"))
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(413, f"image exceeds the pixel limit ({e})") from None
    except UnidentifiedImageError:
        raise _not_accepted(data) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as e:
        raise InputError(400, f"not a decodable image: {type(e).__name__}: {e}") from None
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise InputError(400, f"decoded to an unusable shape {rgb.shape}")
    return rgb


def _not_accepted(data: bytes) -> InputError:
    """415 for an image of another format (identified from its header only: nothing is decoded), 400 for bytes
    that are no image at all."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            fmt = other.format
    except Exception:  # noqa: BLE001 - whatever Pillow makes of garbage: it is no image
        return InputError(400, "not a decodable image: the bytes are no image format")
    return InputError(415, f"{fmt} images are not accepted; send {', '.join(IMAGE_FORMATS)}")


# a beta at which any cost difference outweighs any quality difference: choose() then takes the cheapest
# allowed exit (how a quality target becomes the one rule's decision)
CHEAPEST = 1e6
CONTROLS = ("max_gflops", "max_latency_ms", "max_quality_drop", "beta", "exit")


@dataclass
class RequestControl:
    """Per-request compute control, at most one of: a per-image cost budget (``max_gflops``, or
    ``max_latency_ms`` against this replica's measured latency of each exit), a quality target
    (``max_quality_drop``: the cheapest exit whose quality the quality gate predicts within that much PQ (AP
    for a detector) of full depth's; the gate predicts quality relative to the deepest exit, so a drop is what it can judge), a
    trade-off ``beta`` (a quality gate only), a forced ``exit`` (e.g. the full-depth baseline). A cost budget
    no exit meets is served by the cheapest exit, and the response says the target was missed."""

    budget: Budget | None = None
    beta: float | None = None
    exit: int | None = None
    max_quality_drop: float | None = None

    def __post_init__(self):
        given = [n for n, v in (("budget", self.budget), ("beta", self.beta), ("exit", self.exit),
                                ("max_quality_drop", self.max_quality_drop)) if v is not None]
        if len(given) > 1:
            raise InputError(422, f"give at most one of {', '.join(CONTROLS)}; got {', '.join(given)}")
        if self.max_quality_drop is not None and not 0 <= self.max_quality_drop <= 1:
            raise InputError(422, f"max_quality_drop is a quality difference (PQ or AP) in [0, 1], got "
                                  f"{self.max_quality_drop}")

    @property
    def explicit(self) -> bool:
        """Whether the request carries its own control (what a load cap of precedence ``request`` leaves alone)."""
        return any(v is not None for v in (self.budget, self.beta, self.exit, self.max_quality_drop))

    def target(self) -> dict | None:
        """The request's target as its response reports it (None: no target)."""
        if self.budget is not None:
            return {"name": self.budget.name, "limit": self.budget.limit}
        if self.max_quality_drop is not None:
            return {"name": "max_quality_drop", "limit": self.max_quality_drop}
        return None

    @classmethod
    def parse(cls, params: dict) -> RequestControl:
        def number(name, kind=float):
            raw = params.get(name)
            if raw is None or raw == "":
                return None
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                raise InputError(422, f"{name}={raw!r} is not a number") from None
            if not math.isfinite(value) or value < 0:
                raise InputError(422, f"{name} must be a finite number >= 0, got {raw!r}")
            return value

        given = {name: number(name, int if name == "exit" else float) for name in CONTROLS}
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) > 1:
            raise InputError(422, f"give at most one of {', '.join(CONTROLS)}; got {', '.join(given)}")
        try:
            budget = next((Budget.named(k, v) for k, v in given.items() if k in ("max_gflops", "max_latency_ms")),
                          None)
        except BudgetError as e:
            raise InputError(422, str(e)) from None
        return cls(budget, given.get("beta"), given.get("exit"), given.get("max_quality_drop"))


@dataclass(frozen=True)
class LoadCap:
    """The load-adaptive cap a batch runs under (eco_ray/serve/load.py): at ``level`` > 0 a request whose exit
    would be deeper than ``exit_cap`` is served by the rule among the exits from ``floor_exit`` to the cap; it
    applies to the requests without a control of their own, or to every request (``all_requests``)."""

    level: int
    exit_cap: int
    floor_exit: int
    all_requests: bool = False

    def applies_to(self, c: RequestControl) -> bool:
        return self.level > 0 and (self.all_requests or not c.explicit)


@dataclass
class Engine:
    """A parent, a gate and the per-exit costs, ready to serve batches of the parent's task."""

    parent: torch.nn.Module
    gate: torch.nn.Module | None  # None: a parent alone (``eco-ray evaluate --exit``), every request forces its exit
    categories: CategorySet
    gflops: list[float]  # encoder GFLOPs per exit, shallow to deep (what a budget and a response count)
    relative_cost: list[float]  # the gate's own cost measure, relative to the deepest exit (what beta weighs)
    default_beta: float  # for a quality gate without a per-request beta
    versions: dict = field(default_factory=dict)
    threshold: float = 0.5
    mask_threshold: float = 0.5
    overlap_threshold: float = OVERLAP_THRESHOLD
    # ms for one image at each exit on this machine, the whole predict() path: measured at start
    # (measure_latency), then kept current from the single-image batches served (what max_latency_ms reads)
    latency_ms: list[float] | None = None
    task_name: str = "panoptic"  # what the parent does: its predictions and response format (eco_ray.tasks)

    def __post_init__(self):
        self.task = get_task(self.task_name)

    @property
    def exits(self) -> list[int]:
        return list(self.parent.exits)

    def allowed_exits(self, c: RequestControl) -> np.ndarray:
        """The exits a request's control admits, or an InputError (422) for a control this engine cannot honour
        (checked for each request before it joins a batch, so one bad request never costs the others their
        forward pass). A cost budget no exit meets admits the cheapest exit (the response says so)."""
        if c.exit is not None:
            if c.exit not in self.exits:
                raise InputError(422, f"exit={c.exit} is not one of the model's exits {self.exits}")
            return np.asarray(self.exits) == c.exit
        if self.gate is None:
            raise InputError(422, f"no gate is deployed with this parent: give exit (one of {self.exits})")
        if (c.beta is not None or c.max_quality_drop is not None) and not self.gate.uses_beta:
            raise InputError(422, f"{'beta' if c.beta is not None else 'max_quality_drop'} needs a quality gate; the "
                                  f"deployed gate is a classifier trained for one beta (use max_gflops)")
        if c.budget is None:
            return np.ones(len(self.exits), bool)
        costs = self._costs(c.budget)
        allowed = np.asarray([c.budget.admits_value(v) for v in costs])
        if not allowed.any():  # the cheapest (a measured latency table need not rise with depth)
            allowed[int(np.argmin(costs))] = True
        return allowed

    def _costs(self, budget: Budget) -> list[float]:
        if budget.metric == "latency_ms":
            if self.latency_ms is None:
                raise InputError(422, "max_latency_ms: this replica has not measured its exits' latency "
                                      "(latency_repeats is 0); use max_gflops")
            return self.latency_ms
        return self.gflops

    def choose_exits(self, gate_features: torch.Tensor, controls: list[RequestControl],
                     met: list | None = None, load: LoadCap | None = None, bound: list | None = None) -> list[int]:
        """Each image's exit: forced, or the rule over the gate's scores among the exits its control allows;
        then, for a request the load cap applies to whose exit is deeper than the cap, the rule again among the
        exits from the floor to the cap. ``met`` (one entry per request) receives whether the request's target
        is met by the exit it gets (None: no target), ``bound`` whether the cap changed its exit."""
        n = len(controls)
        allowed = np.stack([self.allowed_exits(c) for c in controls])
        met = met if met is not None else [None] * n
        bound = bound if bound is not None else [False] * n
        scores = gate_scores(self.gate, gate_features) if self.gate is not None else None
        betas = np.asarray([self.default_beta if c.beta is None else c.beta for c in controls], np.float64)
        for i, c in enumerate(controls):
            if c.max_quality_drop is not None:  # the cheapest exit predicted within the drop of full depth
                allowed[i] &= scores[i] >= scores[i, -1] - c.max_quality_drop  # the deepest always is
                betas[i] = CHEAPEST
        index = self._rule(scores, betas, allowed)
        if load is not None and load.level > 0:
            exits = np.asarray(self.exits)
            band = (exits >= load.floor_exit) & (exits <= load.exit_cap)
            over = [i for i, c in enumerate(controls) if load.applies_to(c) and self.exits[index[i]] > load.exit_cap]
            if over:
                rows = allowed[over] & band
                rows[~rows.any(1)] = exits == load.exit_cap  # nothing the control allows is in the band: the cap
                index[over] = self._rule(scores[over] if scores is not None else None, betas[over], rows)
                for i in over:
                    bound[i] = True
        for i, c in enumerate(controls):
            j = int(index[i])
            if c.budget is not None:
                met[i] = c.budget.admits_value(self._costs(c.budget)[j])
            elif c.max_quality_drop is not None:
                met[i] = bool(scores[i, j] >= scores[i, -1] - c.max_quality_drop)
        return [self.exits[int(j)] for j in index]

    def _rule(self, scores: np.ndarray | None, betas: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """The one rule over each row's allowed exits (without a gate every request forced one exit)."""
        if self.gate is None:
            return np.argmax(allowed, axis=1)
        return np.asarray(choose(scores, self.relative_cost, betas if self.gate.uses_beta else 0.0, allowed))

    @torch.no_grad()
    def predict(self, images: list[np.ndarray], controls: list[RequestControl], load: LoadCap | None = None,
                bound: list | None = None) -> list[tuple[object, int, bool | None]]:
        """One batch: every image resized to the model's input, exits chosen per image, one parent pass in
        which rows leave the encoder at their exit -> (the task's prediction, exit, target met) each: a
        segmenter's (id map at the model's input size, segments; ``resize_ids`` takes a map to its image's size),
        a detector's COCO detections in the image's own pixels."""
        size = self.parent.config.image_size
        x = pixel_values([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])
        met: list = [None] * len(controls)
        bound = bound if bound is not None else [False] * len(controls)  # filled: rows the load cap moved
        out = self.parent.forward_gated(x, lambda feats: self.choose_exits(feats, controls, met, load, bound))
        preds = self.task.predictions(out, self, [im.shape[:2] for im in images])
        return [(p, int(k), m) for p, k, m in zip(preds, out.exit_per_image.tolist(), met)]

    def measure_latency(self, repeats: int = 3) -> list[float]:
        """Time one image at every exit through :meth:`predict` (median of ``repeats`` after one warm-up) on
        this machine, and serve ``max_latency_ms`` from it."""
        size = self.parent.config.image_size
        image = np.full((size, size, 3), 127, np.uint8)
        table = []
        for k in self.exits:
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                self.predict([image], [RequestControl(exit=k)])
                times.append((time.perf_counter() - t0) * 1e3)
            table.append(float(np.median(times[1:])))
        self.latency_ms = table
        return table

    def respond(self, images: list[np.ndarray], controls: list[RequestControl], options: list[dict],
                load: LoadCap | None = None) -> list[dict]:
        """:meth:`predict`, each image's result in its task's response format at the image's own size
        (``options``: each request's ``Task.response_options``), with the exit, its cost, the versions, the
        timing, the target and whether it was met, and the load cap where one is in force."""
        t0 = time.perf_counter()
        bound = [False] * len(controls)
        preds = self.predict(images, controls, load, bound)
        batch_ms = (time.perf_counter() - t0) * 1e3
        predicted = list(self.latency_ms) if self.latency_ms is not None else None  # what the decision read
        if self.latency_ms is not None and len(images) == 1:  # the table follows what one image costs now
            j = self.exits.index(preds[0][1])
            self.latency_ms[j] = round(0.8 * self.latency_ms[j] + 0.2 * batch_ms, 3)
        gflops_of = dict(zip(self.exits, self.gflops))
        results = []
        for im, (pred, k, met), opts, c, moved in zip(images, preds, options, controls, bound):
            result = {**self.task.response(pred, im.shape[:2], self, opts), "exit": k,
                      "encoder_gflops": gflops_of[k], "versions": self.versions,
                      "timing_ms": {"batch": round(batch_ms, 2), "batch_size": len(images)}}
            if load is not None:
                result["load"] = {"level": load.level, "exit_cap": load.exit_cap, "floor_exit": load.floor_exit,
                                  "capped": moved}
            if c.target() is not None:
                result["target"] = {**c.target(), "met": met}
                if c.budget is not None and c.budget.metric == "latency_ms":  # predicted, then measured
                    result["target"]["predicted_ms"] = predicted[self.exits.index(k)]
                    result["target"]["met"] = bool(met and batch_ms <= c.budget.limit)
            results.append(result)
        return results


def resize_ids(id_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An id map at ``shape`` (nearest neighbour: ids are labels, not intensities)."""
    h, w = shape
    if id_map.shape == (h, w):
        return id_map
    return np.asarray(Image.fromarray(id_map.astype(np.int32), mode="I").resize((w, h), Image.NEAREST)).astype(np.int64)


def encode_panoptic(id_map: np.ndarray, segments: list[dict], shape: tuple[int, int], categories: CategorySet,
                    fmt: str) -> dict:
    """Panoptic result at the image's own size: segments (category, isthing, area, bbox, score) and the id
    map as a PNG (COCO panoptic colour encoding id = R + 256 G + 256^2 B, base64) or per-segment COCO RLE."""
    from pycocotools import mask as mask_utils

    from eco_ray.data.coco_panoptic import id2rgb

    h, w = shape
    id_map = resize_ids(id_map, shape)
    names = {c.id: c for c in categories.categories}
    out_segments = []
    for s in segments:
        m = id_map == s["id"]
        area = int(m.sum())
        if area == 0:
            continue
        ys, xs = np.nonzero(m)
        cat = names[s["category_id"]]
        seg = {"id": s["id"], "category_id": s["category_id"], "category": cat.name, "isthing": bool(cat.isthing),
               "area": area, "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                      int(ys.max() - ys.min() + 1)], "score": round(float(s["score"]), 4)}
        if fmt == "rle":
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            seg["rle"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        out_segments.append(seg)
    result = {"height": h, "width": w, "segments": out_segments, "mask_format": fmt}
    if fmt == "png":
        buf = io.BytesIO()
        Image.fromarray(id2rgb(id_map)).save(buf, format="PNG")
        result["id_map_png"] = base64.b64encode(buf.getvalue()).decode("ascii")
    return result


def load_engine(parent_uri: str, gate_uri: str, tracking_uri: str, default_beta: float | None = None,
                threshold: float = 0.5, mask_threshold: float = 0.5, overlap_threshold: float = OVERLAP_THRESHOLD,
                task: str | None = None) -> tuple[Engine, dict]:
    """(engine, gate record): parent and gate from MLflow URIs or directories; the gate must fit the parent.
    ``task``: the task the caller serves (None: the parent's own)."""
    from eco_ray.model.io import load_gate, load_parent
    from eco_ray.tracking import describe_model_uri, resolve_model_dir

    parent_dir = resolve_model_dir(parent_uri, tracking_uri)
    parent, pmeta = load_parent(parent_dir, task)
    gate, gmeta = load_gate(resolve_model_dir(gate_uri, tracking_uri))
    parent_task, gate_task = pmeta.get("task", "panoptic"), gmeta.get("task", "panoptic")
    if gate_task != parent_task:
        raise ValueError(f"the gate {gate_uri} was fitted for {gate_task}, but {parent_uri} is a {parent_task} parent")
    fitted_on = (gmeta.get("parent") or {}).get("weights_sha256")
    if not fitted_on:
        logger.warning("eco-ray: the gate %s records no parent weights hash: its pairing with %s is checked by "
                       "exits and input size only", gate_uri, parent_uri)
    else:  # a gate scores the gate input of the parent it was fitted on, not of another one
        with open(Path(parent_dir) / "model.safetensors", "rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
        if actual != fitted_on:
            raise ValueError(f"the gate {gate_uri} was fitted on the parent with weights {fitted_on[:12]}..., but "
                             f"{parent_uri} has weights {actual[:12]}...")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return engine_from(parent, pmeta, gate, gmeta, {"parent": describe_model_uri(parent_uri, tracking_uri),
                                                    "gate": describe_model_uri(gate_uri, tracking_uri)},
                       default_beta, threshold, mask_threshold, overlap_threshold), gmeta


def engine_from(parent, pmeta: dict, gate, gmeta: dict, versions: dict | None = None,
                default_beta: float | None = None, threshold: float = 0.5, mask_threshold: float = 0.5,
                overlap_threshold: float = OVERLAP_THRESHOLD) -> Engine:
    """An engine from loaded models and their records (tests and benchmarks build one in process)."""
    if list(gate.exits) != list(parent.exits):
        raise ValueError(f"gate exits {gate.exits} do not match the parent's {parent.exits}")
    # the gate was fitted on the gate input its derived table recorded: the parent computes that one
    parent.config.gate_input = gmeta.get("gate_input", "stride32")
    expected = parent.config.gate_dim
    if gate.in_dim != expected:
        raise ValueError(f"the gate takes {gate.in_dim} input features, but the parent's {parent.config.gate_input!r} "
                         f"gate input has {expected}")
    costs = gmeta["costs"]
    measure = gmeta.get("cost", "gflops")
    if measure not in costs:
        raise ValueError(f"the gate was fitted with cost {measure!r} but records only {sorted(costs)}")
    # never falling with depth (the decision rule needs ordered costs; older gates saved raw timings)
    relative = relative_costs(np.maximum.accumulate(np.asarray(costs[measure], np.float64))).tolist()
    beta = gmeta.get("beta", 0.05) if default_beta is None else default_beta
    versions = {**(versions or {}), "gate_kind": gate.kind, "gate_beta": gmeta.get("beta"), "gate_cost": measure}
    task = get_task(pmeta.get("task", "panoptic"))
    return Engine(parent.eval(), gate.eval(), task.category_set(pmeta["categories"]), list(costs["gflops"]),
                  relative, float(beta), versions, threshold, mask_threshold, overlap_threshold, task_name=task.name)


def parent_engine(parent, pmeta: dict, versions: dict | None = None, threshold: float = 0.5,
                  mask_threshold: float = 0.5, overlap_threshold: float = OVERLAP_THRESHOLD) -> Engine:
    """An engine of a parent alone: every request gives its exit (a static-depth baseline, ``eco-ray evaluate
    --exit``). Exit GFLOPs are counted on the parent at its input size."""
    from eco_ray.model.cost import count_exit_gflops

    table = count_exit_gflops(parent, parent.config.image_size)
    gflops = [next(e["encoder_gflops"] for e in table["exits"] if e["exit"] == k) for k in parent.exits]
    task = get_task(pmeta.get("task", "panoptic"))
    return Engine(parent.eval(), None, task.category_set(pmeta["categories"]), gflops,
                  relative_costs(np.maximum.accumulate(np.asarray(gflops, np.float64))).tolist(), 0.0,
                  {**(versions or {}), "gate_kind": None}, threshold, mask_threshold, overlap_threshold,
                  task_name=task.name)
