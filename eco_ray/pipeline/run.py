"""``eco-ray pipeline``: the main job, every stage on one machine or cluster, each stage reused when its inputs
repeat.

    data -> train (Step A) -> derive (Step B) [+ diagnose] -> sweep (Step C + Tune) -> select -> serve

The stages run the task of ``train.task`` (panoptic segmentation or detection), asking it (``eco_ray.tasks``) for
what differs: its annotation files, its metric, its registry names, its Serve route.

Every stage has an *input key*: a hash of its own settings and of the key (or output) of the stage before it.
``<run_dir>/pipeline/<name>/state.json`` records, per stage, the key it ran with and what it produced; a stage
whose key is unchanged and whose output still exists is skipped. ``--from STAGE`` reruns that stage and every
later one. Each stage is a plain call of the library function behind its own CLI command, with that command's
config section, and hands its output (the parent URI, the table path, the sweep name) to the next as an
argument.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict
from pathlib import Path

from eco_ray.config import ConfigError, content_hash
from eco_ray.context import RunContext
from eco_ray.files import write_json as _write_json
from eco_ray.pipeline.config import STAGES, PipelineConfig
from eco_ray.tasks import get_task


class Pipeline:
    """The stages as methods; ``run`` strings them together and records state after each one."""

    def __init__(self, cfg: PipelineConfig, ctx: RunContext, *, from_stage: str | None = None,
                 keep_serving: bool = False, log=None):
        if from_stage is not None and from_stage not in STAGES:
            raise ConfigError(f"--from must be one of {list(STAGES)}, got {from_stage!r}")
        self.cfg, self.ctx, self.keep_serving = cfg, ctx, keep_serving
        self.from_index = STAGES.index(from_stage) if from_stage else len(STAGES)
        self.dir = ctx.pipeline_dir(cfg.name)
        self.state_path = self.dir / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.data_root = Path(cfg.data.root).resolve() if cfg.data.root else ctx.data_dir
        self.task = get_task(cfg.train.task)
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- state
    def _forced(self, stage: str) -> bool:
        return STAGES.index(stage) >= self.from_index

    def _fresh(self, stage: str, key: str) -> dict | None:
        """The recorded output of ``stage`` if it ran with ``key`` and ``--from`` does not force it."""
        entry = self.state.get(stage)
        if self._forced(stage) or not entry or entry.get("key") != key or "output" not in entry:
            return None
        return entry["output"]

    def _record(self, stage: str, key: str, output: dict, seconds: float) -> dict:
        self.state[stage] = {"key": key, "output": output, "seconds": round(seconds, 1),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_json(self.state_path, self.state)
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

    def _run_name(self, stage: str, key: str, exists) -> tuple[str, bool]:
        """(name, resume): the stage's run is named by its key; a stopped one continues, a forced stage starts
        a new one beside it."""
        name = f"{self.cfg.name}-{key[:10]}"
        if exists(name):
            if self._forced(stage):
                return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}", False
            return name, True
        return name, False

    # ------------------------------------------------------------------------------------------ stages
    def data(self) -> dict:
        from eco_ray.data.synth import ensure_dataset

        if self.cfg.data.root:  # a dataset the user brought: its annotations are the key
            from eco_ray.train.ray_train import dataset_hash

            key = dataset_hash(self.data_root, self.task.name)
            return self._record("data", key, {"root": str(self.data_root), "generated": False, "key": key}, 0.0)
        d = self.cfg.data
        splits = {"train": d.train_images, "val": d.val_images}
        key = content_hash({"synth": asdict(d.synth), "splits": splits, "root": str(self.data_root)})

        def run():
            summary, _ = ensure_dataset(self.data_root, d.synth, splits, overwrite=True,
                                        progress=lambda s, n_done, n: self.log(f"  {s}: {n_done}/{n} images"))
            return {"root": str(self.data_root), "generated": True, "key": key, "splits": summary["splits"]}

        request = {"config": asdict(d.synth), "splits": splits}

        def still_there(out) -> bool:  # as generated: another pipeline on this run_dir may have made other data
            stamp = Path(out["root"]) / "eco_ray_synth.json"
            return stamp.is_file() and json.loads(stamp.read_text()).get("request") == request

        return self._stage("data", key, run, still_there)

    def train(self, data: dict) -> dict:
        from eco_ray.train.config import train_config_key
        from eco_ray.train.ray_train import resume_training, run_training

        key = content_hash({"data": data["key"], "train": train_config_key(self.cfg.train)})

        def run():
            name, resume = self._run_name("train", key, lambda n: (self.ctx.train_dir(n) / "run.json").is_file())
            base = self.ctx.train_dir(name)
            if resume and (base / "summary.json").is_file():
                return json.loads((base / "summary.json").read_text())
            if resume:  # a stopped pipeline: continue its training from the last checkpoint
                self.log(f"[pipeline] train: resuming the stopped run {name}")
                return resume_training(name, self.ctx)
            return run_training(self.cfg.train, data_root=data["root"], ctx=self.ctx, name=name)

        return self._stage("train", key, run, lambda out: Path(out["parent_dir"]).is_dir())

    def derive(self, train: dict) -> dict:
        from eco_ray.derive.run import run_derive

        settings = asdict(self.cfg.derive)
        if self.cfg.train.task == "panoptic":  # detection's label setting: a panoptic pipeline's key is as it was
            settings.pop("label_block")
        key = content_hash({"parent": train["model_uri"], "run": train["run_id"], "derive": settings})

        def run():
            m = run_derive(self.cfg.derive, parent=train["model_uri"], data_root=self.data_root, ctx=self.ctx)
            return {k: m[k] for k in ("path", "key", "exits", "costs", "splits", "parent", "timings", "mlflow_run_id")}

        out = self._stage("derive", key, run, lambda o: (Path(o["path"]) / "manifest.json").is_file())
        # logged with the table's MLflow run when the table was made now; a reused table's run has it already
        self.diagnosis = self._diagnose(out, log_to_mlflow=self.timings["derive"] > 0)
        return out

    def _diagnose(self, derived: dict, log_to_mlflow: bool) -> dict | None:
        """The verdict on the table (no model pass, about a second): will a gate beat static depth here?"""
        from eco_ray.diagnose import DiagnoseError
        from eco_ray.diagnose import diagnose_table

        try:
            d, plot = diagnose_table(derived["path"], self.ctx, out_dir=self.dir, log_to_mlflow=log_to_mlflow)
        except DiagnoseError as e:
            self.log(f"[pipeline] diagnose: skipped ({e})")
            return None
        self.log(f"[pipeline] diagnose: {d.verdict} - {d.reasons[1] if len(d.reasons) > 1 else d.reasons[0]}")
        best = d.cross_view_oracle_lead
        return {"verdict": d.verdict, "cross_view_oracle_lead": best.lead, "cross_view_oracle_lead_ci95": best.lead_ci95,
                "beta": best.beta, "label_noise_share": d.label_noise_share, "plot": str(plot),
                "json": str(self.dir / "diagnosis.json")}

    def sweep(self, derived: dict) -> dict:
        from eco_ray.resources import resolve_resource
        from eco_ray.sweep import resume_sweep, run_sweep

        space = resolve_resource("search_spaces", self.cfg.sweep.space_for(self.task.name))
        key = content_hash({"derived": derived["key"], "sweep": asdict(self.cfg.sweep), "space": space.read_text()})

        def run():
            name, resume = self._run_name("sweep", key, lambda n: (self.ctx.sweep_dir(n) / "sweep.json").is_file())
            if resume:  # a stopped pipeline: run only the missing trials
                return _sweep_output(resume_sweep(name, self.ctx, storage=self.cfg.sweep.storage))
            return _sweep_output(run_sweep(self.cfg.sweep, derived=derived["path"], ctx=self.ctx, name=name))

        return self._stage("sweep", key, run, lambda out: Path(out["path"]).is_dir())

    def select(self, derived: dict, sweep: dict) -> dict:
        from eco_ray.derive.table import CostTable
        from eco_ray.sweep import select

        s = self.cfg.select
        gate_name = s.registered_gate or self.task.gate_name
        budget = s.to_budget()
        if budget.relative:
            budget = budget.absolute(CostTable(derived["costs"]).full_depth().get(budget.metric))
        key = content_hash({"sweep": sweep["name"], "budget": str(budget), "model": gate_name, "alias": s.alias})
        # registering is idempotent by this token: recorded before the registry call, so a select killed after
        # registering (before moving the alias) registers nothing new when the pipeline is run again
        pending = self.state.get("select_pending", {})
        token = pending["token"] if pending.get("key") == key and not self._forced("select") else uuid.uuid4().hex
        self.state["select_pending"] = {"key": key, "token": token}
        _write_json(self.state_path, self.state)

        def run():
            r = select(sweep["name"], budget, ctx=self.ctx, registered_model=gate_name, alias=s.alias, token=token)
            return {"model_uri": r.model_uri, "version": r.version, "why": r.why, "budget": r.budget,
                    "chosen": r.chosen}

        out = self._stage("select", key, run, lambda o: self._alias_points_to(o["version"]))
        self.state.pop("select_pending", None)
        _write_json(self.state_path, self.state)
        return out

    def _alias_points_to(self, version) -> bool:
        gate_name = self.cfg.select.registered_gate or self.task.gate_name
        return self.ctx.tracker().alias_version(gate_name, self.cfg.select.alias) == str(version)

    def serve(self, train: dict, select: dict) -> dict:
        """Start the Serve app, send real requests, stop it (serving is never "reused": it is a check)."""
        import ray
        from ray import serve

        from eco_ray.serve.run import start

        t0 = time.perf_counter()
        sv = self.cfg.serve
        url = start(sv.config, parent_uri=train["model_uri"], gate_uri=select["model_uri"], ctx=self.ctx,
                    host=sv.host, port=sv.port, blocking=False)
        _wait_healthy(url, timeout=120)
        ds = self.task.open_dataset(self.data_root, "val")
        endpoint = f"{url}/v1/{self.task.route}?{self.task.compact_query}"
        replies = [_post(endpoint, ds.image_path(i).read_bytes()) for i in range(min(max(sv.requests, 1), len(ds)))]
        full = _post(f"{endpoint}exit={train_exits(train)[-1]}", ds.image_path(0).read_bytes()) if len(ds) else None
        items = self.task.response_items
        out = {"url": url, "route": f"/v1/{self.task.route}", "requests": len(replies),
               "seconds": round(time.perf_counter() - t0, 1), "exits_used": [r["exit"] for r in replies],
               "encoder_gflops_mean": sum(r["encoder_gflops"] for r in replies) / max(1, len(replies)),
               "latency_ms_mean": sum(r["timing_ms"]["total"] for r in replies) / max(1, len(replies)),
               f"{items}_per_image": [len(r[items]) for r in replies],
               "full_depth_check": {"exit": full["exit"], "encoder_gflops": full["encoder_gflops"]} if full else None}
        self.timings["serve"] = out["seconds"]
        if not self.keep_serving:
            serve.shutdown()
            ray.shutdown()
        return out

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        from eco_ray.pipeline.summary import summarize

        t0 = time.perf_counter()
        self.diagnosis = None
        data = self.data()
        train = self.train(data)
        derived = self.derive(train)
        sweep = self.sweep(derived)
        selected = self.select(derived, sweep)
        if self.cfg.serve.requests > 0 or self.keep_serving:
            self.log("[pipeline] serve: starting the Serve app and sending requests")
            served = self.serve(train, selected)
        else:
            self.log("[pipeline] serve: skipped (requests=0)")
            served = None
            _shutdown_ray()
        summary = summarize(self, data, train, derived, sweep, selected, served, time.perf_counter() - t0)
        _write_json(self.dir / "summary.json", summary)
        return summary


def train_exits(train: dict) -> list[int]:
    return sorted(int(k) for k in train[f"val_{train.get('metric', 'pq')}_per_exit"])


def _sweep_output(s) -> dict:
    j = s.to_json(with_trials=False)
    return {k: j.get(k) for k in ("name", "path", "run_id", "complete", "feasible", "failed", "front", "static",
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


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
