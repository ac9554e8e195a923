"""``eco-ray pipeline``: the main job, every stage on one machine, each stage reused when its inputs repeat.

    data -> train (Step A) -> derive (Step B) -> sweep (Step C + Tune) -> select -> serve

Every stage has an *input key*: a hash of its own settings and of the key (or output) of the stage before it.
``<run_dir>/pipeline/<name>/state.json`` records, per stage, the key it ran with and what it produced; a stage
whose key is unchanged and whose output still exists is skipped. ``--from STAGE`` reruns that stage and every
later one. Each stage is a plain call of the library function behind its own CLI command, with that command's
config dataclass, so the pipeline YAML uses the same keys as ``eco-ray train/derive/sweep --set``.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eco_ray.config import ConfigError, load_config

STAGES = ("data", "train", "derive", "sweep", "select", "serve")
BUDGETS = ("max_gflops", "max_latency_ms", "min_pq", "max_relative_gflops")


@dataclass
class PipelineConfig:
    """The main job. ``train``, ``derive`` and ``sweep`` hold ``key: value`` settings of TrainConfig,
    DeriveConfig and SweepConfig (the same keys as ``--set`` of those commands)."""

    name: str = "default"  # state and summary under <run_dir>/pipeline/<name>
    run_dir: str = "runs"
    # data: the generated benchmark (eco_ray/data/synth.py SynthConfig keys under `synth`)
    data_root: str | None = None  # an existing COCO-panoptic root instead of generating one (skips `data`)
    train_images: int = 6000
    val_images: int = 300
    synth: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=lambda: {
        "steps": 5000, "exit_sampling": "deepest_plus_one", "eval_every": 2500, "checkpoint_every": 600})
    derive: dict[str, Any] = field(default_factory=lambda: {"max_images": 2000})
    sweep: dict[str, Any] = field(default_factory=lambda: {"trials": 40})
    # select: one budget. max_relative_gflops is a share of the full-depth encoder GFLOPs (0.7 = save 30%)
    budget: str = "max_relative_gflops"
    limit: float = 0.7
    registered_gate: str = "eco-gate"
    alias: str = "production"
    # serve: start the app, send `requests` validation images, stop (or keep serving); 0 skips the check
    serve_config: str | None = None  # default deploy/serve_config.yaml
    host: str = "127.0.0.1"
    port: int = 8000
    requests: int = 8

    def validate(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if not self.limit > 0 or (self.budget == "max_relative_gflops" and self.limit > 1):
            raise ValueError(f"limit must be > 0 (and <= 1 for max_relative_gflops), got {self.limit}")
        if self.train_images < 1 or self.val_images < 1 or self.requests < 0:
            raise ValueError("train_images and val_images must be >= 1 and requests >= 0")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")


def load_pipeline_config(path: str | Path | None = None, overrides=()) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)


def _dotlist(prefix: str, mapping: dict) -> list[str]:
    """Nested settings -> ``key=value`` overrides (lists in OmegaConf's dotlist syntax)."""
    out = []
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _dotlist(key + ".", v)
        else:
            out.append(f"{key}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}")
    return out


class Pipeline:
    """The stages as methods; ``run`` strings them together and records state after each one."""

    def __init__(self, cfg: PipelineConfig, *, tracking_uri: str | None = None, address: str | None = None,
                 from_stage: str | None = None, keep_serving: bool = False, log=None):
        from eco_ray.data.synth import SynthConfig
        from eco_ray.derive.run import DeriveConfig
        from eco_ray.registry import default_tracking_uri
        from eco_ray.sweep.run import SweepConfig
        from eco_ray.train.config import load_train_config

        if from_stage is not None and from_stage not in STAGES:
            raise ConfigError(f"--from must be one of {list(STAGES)}, got {from_stage!r}")
        self.cfg, self.address, self.keep_serving = cfg, address, keep_serving
        self.from_index = STAGES.index(from_stage) if from_stage else len(STAGES)
        self.run_dir = Path(cfg.run_dir).resolve()
        self.dir = self.run_dir / "pipeline" / cfg.name
        self.state_path = self.dir / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        # every stage's config is built (and validated) now, before any work: a bad key fails at once
        self.synth = load_config(SynthConfig, None, _dotlist("", cfg.synth))
        self.data_root = Path(cfg.data_root).resolve() if cfg.data_root else self.run_dir / "data"
        self.train_cfg = load_train_config(None, _dotlist("", {**cfg.train, "data_root": str(self.data_root),
                                                               "run_dir": str(self.run_dir)}))
        self.derive_cfg = load_config(DeriveConfig, None, _dotlist("", {**cfg.derive, "data_root": str(self.data_root),
                                                                         "run_dir": str(self.run_dir)}))
        self.sweep_cfg = load_config(SweepConfig, None, _dotlist("", {"derived": "<set by the derive stage>",
                                                                       **cfg.sweep, "run_dir": str(self.run_dir)}))
        self.tracking_uri = tracking_uri or default_tracking_uri(self.run_dir)  # creates run_dir: after the checks
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- state
    def _fresh(self, stage: str, key: str) -> dict | None:
        """The recorded output of ``stage`` if it ran with ``key`` and ``--from`` does not force it."""
        entry = self.state.get(stage)
        if STAGES.index(stage) >= self.from_index or not entry or entry.get("key") != key:
            return None
        return entry["output"]

    def _record(self, stage: str, key: str, output: dict, seconds: float) -> dict:
        self.state[stage] = {"key": key, "output": output, "seconds": round(seconds, 1),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=float))
        tmp.replace(self.state_path)  # atomic: a killed pipeline never leaves a half-written state
        return output

    def _stage(self, stage: str, key: str, run, still_there=lambda out: True) -> dict:
        out = self._fresh(stage, key)
        if out is not None and still_there(out):
            self.log(f"[pipeline] {stage}: reused (same inputs, key {key[:12]})")
            self.timings[stage] = 0.0
            return out
        self.log(f"[pipeline] {stage}: running")
        t0 = time.perf_counter()
        out = run()
        self.timings[stage] = time.perf_counter() - t0
        self.log(f"[pipeline] {stage}: done in {self.timings[stage]:.0f} s")
        return self._record(stage, key, out, self.timings[stage])

    # ------------------------------------------------------------------------------------------ stages
    def data(self) -> dict:
        from eco_ray.data.synth import ensure_dataset
        from eco_ray.registry import content_hash

        if self.cfg.data_root:  # a dataset the user brought: its annotations are the key
            from eco_ray.train.ray_train import dataset_hash

            key = dataset_hash(self.data_root)
            return self._record("data", key, {"root": str(self.data_root), "generated": False, "key": key}, 0.0)
        splits = {"train": self.cfg.train_images, "val": self.cfg.val_images}
        key = content_hash({"synth": asdict(self.synth), "splits": splits, "root": str(self.data_root)})

        def run():
            summary, reused = ensure_dataset(self.data_root, self.synth, splits, overwrite=True,
                                             progress=lambda s, d, n: self.log(f"  {s}: {d}/{n} images"))
            return {"root": str(self.data_root), "generated": True, "key": key, "splits": summary["splits"]}

        return self._stage("data", key, run, lambda out: (Path(out["root"]) / "eco_ray_synth.json").is_file())

    def train(self, data: dict) -> dict:
        from eco_ray.registry import content_hash
        from eco_ray.train.ray_train import run_training

        key = content_hash({"data": data["key"], "train": asdict(self.train_cfg)})

        def run():
            name = f"{self.cfg.name}-{key[:10]}"
            base = self.run_dir / "train" / name
            if (base / "summary.json").is_file() and STAGES.index("train") < self.from_index:
                return json.loads((base / "summary.json").read_text())
            if (base / "run.json").is_file():
                if STAGES.index("train") >= self.from_index:  # forced: a new run beside the old one
                    name = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
                else:  # a stopped pipeline: continue its training from the last checkpoint
                    self.log(f"[pipeline] train: resuming the stopped run {name}")
                    return run_training(resume=name, run_dir=str(self.run_dir), address=self.address)
            return run_training(self.train_cfg, name=name, address=self.address, tracking_uri=self.tracking_uri)

        return self._stage("train", key, run, lambda out: Path(out["parent_dir"]).is_dir())

    def derive(self, train: dict) -> dict:
        from eco_ray.derive.run import run_derive
        from eco_ray.registry import content_hash

        self.derive_cfg.parent = train["model_uri"]
        key = content_hash({"parent": train["model_uri"], "run": train["run_id"], "derive": asdict(self.derive_cfg)})

        def run():
            m = run_derive(self.derive_cfg, tracking_uri=self.tracking_uri, address=self.address)
            return {k: m[k] for k in ("path", "key", "exits", "costs", "splits", "parent", "timings", "mlflow_run_id")}

        return self._stage("derive", key, run, lambda out: (Path(out["path"]) / "manifest.json").is_file())

    def sweep(self, derived: dict) -> dict:
        from eco_ray.registry import content_hash
        from eco_ray.sweep.run import run_sweep, sweep_dir

        self.sweep_cfg.derived = derived["path"]
        space = Path(self.sweep_cfg.space)
        key = content_hash({"derived": derived["key"], "sweep": asdict(self.sweep_cfg),
                            "space": space.read_text() if space.is_file() else str(space)})

        def run():
            name = f"{self.cfg.name}-{key[:10]}"
            if (sweep_dir(str(self.run_dir), name) / "sweep.json").is_file():
                if STAGES.index("sweep") >= self.from_index:
                    name = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
                else:  # a stopped pipeline: run only the missing trials
                    s = run_sweep(resume=name, run_dir=str(self.run_dir), address=self.address)
                    return _sweep_output(s)
            return _sweep_output(run_sweep(self.sweep_cfg, name=name, tracking_uri=self.tracking_uri,
                                           address=self.address))

        return self._stage("sweep", key, run, lambda out: Path(out["path"]).is_dir())

    def select(self, derived: dict, sweep: dict) -> dict:
        from eco_ray.registry import content_hash
        from eco_ray.sweep.select import select

        budget, limit = self.cfg.budget, self.cfg.limit
        full = derived["costs"]["exits"][-1]["encoder_gflops"]
        if budget == "max_relative_gflops":
            budget, limit = "max_gflops", limit * full
        key = content_hash({"sweep": sweep["name"], "budget": budget, "limit": limit,
                            "model": self.cfg.registered_gate, "alias": self.cfg.alias})

        def run():
            r = select(sweep["name"], budget, limit, run_dir=str(self.run_dir), tracking_uri=self.tracking_uri,
                       registered_model=self.cfg.registered_gate, alias=self.cfg.alias)
            return {"model_uri": r["model_uri"], "version": r["version"], "why": r["why"], "budget": r["budget"],
                    "chosen": r["chosen"]}

        return self._stage("select", key, run, lambda out: self._alias_points_to(out["version"]))

    def _alias_points_to(self, version) -> bool:
        from mlflow import MlflowClient

        try:
            mv = MlflowClient(self.tracking_uri).get_model_version_by_alias(self.cfg.registered_gate, self.cfg.alias)
        except Exception:  # noqa: BLE001 - no alias or no model: the stage must run
            return False
        return str(mv.version) == str(version)

    def serve(self, train: dict, select: dict) -> dict:
        """Start the Serve app, send real requests, stop it (serving is never "reused": it is a check)."""
        import ray
        from ray import serve

        from eco_ray.serve.run import start

        t0 = time.perf_counter()
        url = start(self.cfg.serve_config, parent_uri=train["model_uri"], gate_uri=select["model_uri"],
                    tracking_uri=self.tracking_uri, host=self.cfg.host, port=self.cfg.port, address=self.address,
                    blocking=False)
        _wait_healthy(url, timeout=120)
        from eco_ray.data import CocoPanopticDataset

        ds = CocoPanopticDataset.from_root(self.data_root, "val")
        replies = []
        for i in range(min(max(self.cfg.requests, 1), len(ds))):
            body = (ds.paths.images / ds.image_meta(i)["file_name"]).read_bytes()
            replies.append(_post(f"{url}/v1/segment?mask_format=rle", body))
        full = _post(f"{url}/v1/segment?exit={train_exits(train)[-1]}&mask_format=rle",
                     (ds.paths.images / ds.image_meta(0)["file_name"]).read_bytes()) if len(ds) else None
        out = {"url": url, "requests": len(replies), "seconds": round(time.perf_counter() - t0, 1),
               "exits_used": [r["exit"] for r in replies],
               "encoder_gflops_mean": sum(r["encoder_gflops"] for r in replies) / max(1, len(replies)),
               "latency_ms_mean": sum(r["timing_ms"]["total"] for r in replies) / max(1, len(replies)),
               "segments_per_image": [len(r["segments"]) for r in replies],
               "full_depth_check": {"exit": full["exit"], "encoder_gflops": full["encoder_gflops"]} if full else None}
        self.timings["serve"] = out["seconds"]
        if not self.keep_serving:
            serve.shutdown()
            ray.shutdown()
        return out


    # -------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        t0 = time.perf_counter()
        data = self.data()
        train = self.train(data)
        derived = self.derive(train)
        sweep = self.sweep(derived)
        selected = self.select(derived, sweep)
        if self.cfg.requests > 0 or self.keep_serving:
            self.log("[pipeline] serve: starting the Serve app and sending requests")
            served = self.serve(train, selected)
        else:
            self.log("[pipeline] serve: skipped (requests=0)")
            served = None
            _shutdown_ray()
        summary = summarize(self, data, train, derived, sweep, selected, served, time.perf_counter() - t0)
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        return summary


def train_exits(train: dict) -> list[int]:
    return sorted(int(k) for k in train["val_pq_per_exit"])


def _sweep_output(s: dict) -> dict:
    return {k: s.get(k) for k in ("name", "path", "run_id", "complete", "feasible", "failed", "front", "static",
                                  "plot", "trials_per_minute", "seconds", "objective_cost")}


def _post(url: str, body: bytes, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url}: HTTP {e.code}: {e.read()[:300]!r}") from None


def _wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Serve app at {url} did not become healthy within {timeout:.0f} s")
        time.sleep(1.0)


def summarize(p: Pipeline, data, train, derived, sweep, selected, served, seconds: float) -> dict:
    """Static full-depth model vs. the selected ECO model, on the validation split, plus where things are."""
    exits = derived["exits"]
    val = derived["splits"]["val"]["static"]
    full_exit = exits[-1]
    static = {"exit": full_exit, **{k: val[str(full_exit)][k] for k in ("pq", "pq_things", "pq_stuff")},
              "encoder_gflops_mean": derived["costs"]["exits"][-1]["encoder_gflops"]}
    chosen = selected["chosen"]
    # the validation split's figures (val_*): the sweep selected on held-out training images, never on these
    eco = {k: chosen.get(f"val_{k}", chosen.get(k)) for k in ("pq", "pq_things", "pq_stuff", "encoder_gflops_mean",
                                                              "latency_ms_mean")}
    saved = 1.0 - eco["encoder_gflops_mean"] / static["encoder_gflops_mean"]
    # the static exit that spends no more than the ECO model: the honest comparison at equal compute
    affordable = [c for c in derived["costs"]["exits"] if c["encoder_gflops"] <= eco["encoder_gflops_mean"] + 1e-12]
    same_compute = None
    if affordable:
        k = affordable[-1]["exit"]
        same_compute = {"exit": k, "pq": val[str(k)]["pq"], "encoder_gflops_mean": affordable[-1]["encoder_gflops"]}
    db = p.tracking_uri
    return {
        "name": p.cfg.name, "seconds": round(seconds, 1), "stage_seconds": {k: round(v, 1) for k, v in p.timings.items()},
        "static_full_depth": static, "eco_selected": eco, "static_at_or_below_eco_compute": same_compute,
        "encoder_gflops_saved": saved, "pq_lost": static["pq"] - eco["pq"], "selection": selected,
        "parent": {"model_uri": train["model_uri"], "run_id": train["run_id"], "steps": train["steps"],
                   "train_seconds": train["seconds"]},
        "derived": derived["path"], "sweep": {"name": sweep["name"], "plot": sweep["plot"], "front": len(sweep["front"])},
        "mlflow": {"tracking_uri": db, "ui": f"mlflow ui --backend-store-uri {db}" if db.startswith("sqlite") else db},
        "serving": served, "state": str(p.state_path),
    }


def format_summary(s: dict) -> str:
    st, eco = s["static_full_depth"], s["eco_selected"]
    lines = [
        f"eco-ray pipeline {s['name']!r} finished in {s['seconds'] / 60:.1f} min "
        f"(stages, s: {', '.join(f'{k} {v:.0f}' for k, v in s['stage_seconds'].items())})",
        "",
        f"{'validation split':<34}{'PQ':>7}{'things':>8}{'stuff':>7}{'enc. GFLOPs':>13}",
        f"{'static, full depth (exit ' + str(st['exit']) + ')':<34}{st['pq']:>7.3f}{st['pq_things']:>8.3f}"
        f"{st['pq_stuff']:>7.3f}{st['encoder_gflops_mean']:>13.4f}",
        f"{'ECO selected (' + s['selection']['model_uri'].removeprefix('models:/') + ')':<34}{eco['pq']:>7.3f}{eco['pq_things'] or 0:>8.3f}"
        f"{eco['pq_stuff'] or 0:>7.3f}{eco['encoder_gflops_mean']:>13.4f}",
    ]
    sc = s.get("static_at_or_below_eco_compute")
    if sc:
        lines.append(f"{'static at <= that compute (exit ' + str(sc['exit']) + ')':<34}{sc['pq']:>7.3f}{'':>15}"
                     f"{sc['encoder_gflops_mean']:>13.4f}")
    lines += [
        "",
        f"encoder GFLOPs saved: {s['encoder_gflops_saved']:.1%}; PQ lost: {s['pq_lost']:+.4f} "
        f"(selected under {s['selection']['budget']}: {s['selection']['why']})",
        f"parent: {s['parent']['model_uri']} ({s['parent']['steps']} steps, {s['parent']['train_seconds'] / 60:.1f} min)",
        f"MLflow: {s['mlflow']['tracking_uri']}   UI: {s['mlflow']['ui']}",
        f"sweep {s['sweep']['name']}: Pareto front of {s['sweep']['front']} points, plot {s['sweep']['plot']}",
        (f"serving: {s['serving']['url']} answered {s['serving']['requests']} requests; exits used "
         f"{s['serving']['exits_used']}, mean {s['serving']['encoder_gflops_mean']:.4f} encoder GFLOPs, "
         f"{s['serving']['latency_ms_mean']:.0f} ms") if s["serving"] else "serving: not checked (requests=0)",
        f"state: {s['state']}",
    ]
    return "\n".join(lines)


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
