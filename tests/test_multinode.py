"""The cluster path on a real multi-node Ray cluster: `ray start` on one machine (eco_ray/testing/loopback_cluster.py),
a head with no CPUs and two worker nodes of one logical CPU each, token authentication on, as the KubeRay
manifests configure it. The pipeline is submitted with `ray job submit`, as the RayJob does, against the MLflow
server and a PostgreSQL study; Serve is deployed with `serve deploy`. Nodes are lost by SIGKILL to their raylet
(as a preempted pod is): one in each of Steps A, B and C of the running job, and one under serving load, each
followed by a replacement node (as a node pool brings one).

One worker CPU per node makes every two-worker stage span both nodes. The test process never joins the
cluster as a Ray client: Ray reads its auth mode and token once per process, and this process also starts local
clusters of its own (the reference derive here, the other test modules). It watches the cluster through the
State API and Serve's REST API over HTTP, with the token in each request, and through the run's files.

Skips, saying why, where `ray start` cannot run or no PostgreSQL answers on 127.0.0.1:5432."""

import copy
import json
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import httpx
import numpy as np
import optuna
import pytest
import yaml
from mlflow import MlflowClient

from cluster_stack import ADMIN, free_port
from eco_ray.derive.table import DerivedDataset
from eco_ray.testing import ClusterUnavailable, LoopbackCluster

pytestmark = pytest.mark.slow
WORKER_NODES = ("n1", "n2")
BIN = Path(sys.executable).parent  # ray and serve, the CLIs users submit and deploy with


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mlflow_server):
    """The nodes get what a pod spec gives them: the MLflow server and its credentials (a Secret), the proxy's
    guard, a model cache; the token only in their environment."""
    from eco_ray.serve.proxy import CALLBACK, CALLBACK_ENV

    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_TRACKING_USERNAME": ADMIN[0],
           "MLFLOW_TRACKING_PASSWORD": ADMIN[1], CALLBACK_ENV: CALLBACK,
           "ECO_RAY_CACHE_DIR": str(tmp_path_factory.mktemp("model-cache")),
           # task states reach the State API within 0.1 s (default 1 s): the tests see a chunk while it runs
           "RAY_task_events_report_interval_ms": "100"}
    try:
        c = LoopbackCluster(tmp_path_factory.mktemp("cluster"), token=secrets.token_hex(16), env=env)
        c.start({name: 1 for name in WORKER_NODES})
    except ClusterUnavailable as e:
        pytest.skip(f"no loopback Ray cluster here: {e}")
    c.spare = 0
    yield c
    c.shutdown()


class Replacement(threading.Thread):
    """A replacement worker node joining while the work goes on (as a node pool brings one after a preemption);
    ``seconds``: until the cluster shows it alive."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        cluster.spare += 1
        self.cluster, self.name_, self.seconds, self.error = cluster, f"r{cluster.spare}", None, None
        self.starts = 0
        self.start()

    def run(self):
        t0 = time.time()
        try:
            self.starts = self.cluster.add_node(self.name_, 1).starts
            self.seconds = time.time() - t0
        except Exception as e:  # noqa: BLE001 - reported by joined()
            self.error = e

    def joined(self) -> float:
        self.join(timeout=180)
        assert self.seconds is not None, f"the replacement node did not join: {self.error}"
        return self.seconds


def worker_nodes_of(cluster, rows) -> list[str]:
    """The node names of State API rows (``dead:<id>`` for a node lost since); rows never placed are left out."""
    names = {v: k for k, v in cluster.alive().items()}
    return [names.get(r["node_id"], "dead:" + r["node_id"][:8]) for r in rows if r.get("node_id")]


def wait_until(condition, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


# --------------------------------------------------------------------------------------------- the job
def _job(cluster, entrypoint: list[str]) -> str:
    job_id = f"eco-{uuid.uuid4().hex[:10]}"
    r = subprocess.run([BIN / "ray", "job", "submit", "--address",
                        cluster.dashboard_url, "--submission-id", job_id, "--no-wait", "--", *entrypoint],
                       env=cluster.client_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return job_id


def _job_api(cluster, path: str) -> dict:
    req = urllib.request.Request(f"{cluster.dashboard_url}/api/jobs/{path}",
                                 headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _run_job(cluster, entrypoint: list[str], timeout: float = 900) -> tuple[dict, str]:
    job_id = _job(cluster, entrypoint)
    status = wait_until(lambda: (s := _job_api(cluster, job_id)["status"]) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                        timeout, f"job {job_id}", every=1.0)
    logs = _job_api(cluster, f"{job_id}/logs")["logs"]
    assert status == "SUCCEEDED", logs[-4000:]
    return _job_api(cluster, job_id), logs


def serve_config_for_loopback(port: int, **segmenter) -> dict:
    """The shipped Serve config with its HTTP proxy on the head only: every node of a loopback cluster shares one
    host, so a proxy per node (EveryNode, right for pods) would fight over one port."""
    from eco_ray.serve.run import load_serve_config

    doc = copy.deepcopy(load_serve_config())
    doc["proxy_location"] = "HeadOnly"
    doc["http_options"].update(host="127.0.0.1", port=port)
    for d in doc["applications"][0]["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        if d["name"] == "Segmenter":
            d["user_config"].update(segmenter.pop("user_config", {}))
            d.update(segmenter)
    return doc


def _latest_checkpoint_step(storage: Path) -> int:
    steps = []
    for state in storage.glob("*/checkpoint_*/state.json"):
        try:
            steps.append(json.loads(state.read_text())["step"])
        except (OSError, ValueError, KeyError):
            pass  # being written
    return max(steps, default=0)


def _alive_worker_nodes(cluster, rows) -> list[str]:
    return [n for n in worker_nodes_of(cluster, rows) if not n.startswith("dead")]


# the tiny pipeline of tests/test_pipeline.py, with a training long enough to lose a node in (two workers, one
# per node, checkpoints every 10 steps), derive chunks long enough to be caught running, and six trials
LOSSES = ["train.steps=40", "train.num_workers=2", "train.cpus_per_worker=1", "train.checkpoint_every=10",
          "train.eval_every=40", "train.max_failures=3", "derive.chunk_size=12", "sweep.trials=6"]


def test_the_pipeline_as_a_ray_job_loses_a_node_in_each_step_and_finishes(cluster, tmp_path, postgres_dbs,
                                                                          mlflow_server, monkeypatch):
    """What the RayJob manifest does: the pipeline's entrypoint submitted to the cluster's job server, MLflow the
    tracking server, the Optuna study in PostgreSQL. While it runs, the node of one training worker is lost
    mid-training, the node of a running derive chunk mid-derive and the node of a running trial mid-sweep, each
    followed by a replacement node; the job finishes with the outcome of an undisturbed run. Then resubmitted
    with `--from select`: every stage before it is reused and only the selection runs again."""
    from test_pipeline import TINY

    from eco_ray.config import load_config
    from eco_ray.context import RunContext
    from eco_ray.derive.config import DeriveConfig
    from eco_ray.derive.run import run_derive
    from eco_ray.model.io import load_gate
    from eco_ray.tracking import resolve_model_dir

    run_dir, port = tmp_path / "runs", free_port()
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_config_for_loopback(port)))
    names = {"parent": f"eco-parent-{uuid.uuid4().hex[:6]}", "gate": f"eco-gate-{uuid.uuid4().hex[:6]}"}
    settings = [*(s for s in TINY if not s.startswith(("port=", "train.steps=", "train.num_workers=",
                                                         "train.checkpoint_every=", "train.eval_every=",
                                                         "derive.chunk_size=", "sweep.trials="))), *LOSSES,
                f"port={port}", f"serve.config={tmp_path / 'serve.yaml'}", f"sweep.storage={postgres_dbs['optuna']}",
                f"train.registered_model={names['parent']}", f"select.registered_gate={names['gate']}"]
    entry = [sys.executable, "-m", "eco_ray.cli", "pipeline", "--json", "--set", f"run_dir={run_dir}",
             *sum((["--set", s] for s in settings), [])]
    t0 = time.time()
    job_id = _job(cluster, entry)

    def ended():
        return _job_api(cluster, job_id)["status"] in ("SUCCEEDED", "FAILED", "STOPPED")

    def lose(what: str, busy_nodes) -> dict:
        assert not ended(), f"the job ended before a node could be lost in {what}"
        killed_at = time.time()
        loss = {"node": busy_nodes[0], "dead_after": cluster.kill_node(busy_nodes[0]), "at": killed_at}
        loss["replacement"] = Replacement(cluster)
        return loss

    # Step A: both workers running, one per node, past the second checkpoint
    wait_until(lambda: _latest_checkpoint_step(run_dir / "ray") >= 20 or ended(), 400, "checkpoint 20")
    train_nodes = worker_nodes_of(cluster, cluster.state("actors", class_name="RayTrainWorker", state="ALIVE"))
    assert len(set(train_nodes)) == 2 and "head" not in train_nodes, train_nodes  # one worker per node
    killed_after = _latest_checkpoint_step(run_dir / "ray")
    train_loss = lose("training", train_nodes[1:])
    assert 20 <= killed_after < 40
    # Step B: a chunk running on a node
    busy = wait_until(lambda: _alive_worker_nodes(cluster, cluster.state("tasks", name="_derive_chunk",
                                                                         state="RUNNING")) or ended(),
                      300, "a derive chunk running")
    derive_loss = lose("derive", busy)
    # Step C: a trial running after one finished
    trials = run_dir / "sweeps"
    seen: set = set()

    def trial_running():  # a trial's train() task (`func.train`), not an idle trial actor kept for reuse
        rows = cluster.state("tasks", state="RUNNING")
        seen.update(t["name"] for t in rows)
        return _alive_worker_nodes(cluster, [t for t in rows if t["name"].endswith(".train")])

    busy = wait_until(lambda: ended() or trial_running(), 300, "a trial running")
    assert busy is not True, f"the job ended before a trial was seen running (running tasks seen: {sorted(seen)})"
    finished_before = len(list(trials.glob("*/trials/*/result.json")))
    sweep_loss = lose("the sweep", busy)
    status = wait_until(lambda: (st := _job_api(cluster, job_id)["status"]) in ("SUCCEEDED", "FAILED", "STOPPED")
                        and st, 600, f"job {job_id}", every=1.0)
    job_seconds = time.time() - t0
    logs = _job_api(cluster, f"{job_id}/logs")["logs"]
    assert status == "SUCCEEDED", logs[-4000:]
    joined = [loss["replacement"].joined() for loss in (train_loss, derive_loss, sweep_loss)]

    # the job's outcome and its records
    summary_file = run_dir / "pipeline" / "default" / "summary.json"
    s = json.loads(summary_file.read_text())
    for line in ("[train] step", "[derive] train:", "[sweep]", "[pipeline] serve: starting", "[pipeline] select"):
        assert line in logs, line
    client = MlflowClient(mlflow_server)
    versions = {k: sorted(v.version for v in client.search_model_versions(f"name='{n}'")) for k, n in names.items()}
    assert versions == {"parent": ["1"], "gate": ["1"]}
    assert s["serving"]["requests"] == 3 and s["serving"]["full_depth_check"]["exit"] == s["static_full_depth"]["exit"]
    chosen = s["selection"]["chosen"]
    assert chosen["encoder_gflops_mean"] <= 0.7 * s["static_full_depth"]["encoder_gflops_mean"] + 1e-9
    assert s["eco_selected"]["pq"] == chosen["val_pq"] and "held out of every fit" in s["selection"]["why"]
    state = json.loads((run_dir / "pipeline" / "default" / "state.json").read_text())
    assert list(state) == ["data", "train", "derive", "sweep", "select"]
    exits = state["derive"]["output"]["exits"]
    assert s["static_full_depth"]["exit"] == exits[-1] and set(s["serving"]["exits_used"]) <= set(exits)
    assert 0 <= s["eco_selected"]["pq"] <= 1 and s["eco_selected"]["encoder_gflops_mean"] > 0
    assert s["eco_selected"]["encoder_gflops_mean"] == chosen["val_encoder_gflops_mean"]
    assert len(list((run_dir / "train").iterdir())) == 1  # one training, resumed in place after the loss
    assert ADMIN[1] not in logs and ADMIN[1] not in json.dumps(_job_api(cluster, job_id))  # the Secret stays in env

    # Step A: resumed from the last checkpoint before the loss (the one being written then may not count yet:
    # at most one checkpoint interval is lost), never from 0
    train_run = state["train"]["output"]["run_id"]
    resumed = client.get_metric_history(train_run, "resumed_from_step")
    first_resume = int(min(m.value for m in resumed)) if resumed else 0
    assert resumed and first_resume >= killed_after - 10 and first_resume > 0
    steps = sorted(m.step for m in client.get_metric_history(train_run, "loss"))
    assert steps[-1] == 40 and steps.count(1) == 1
    before = [int(m) for m in re.findall(r"\[train\] step (\d+)/40", logs[:logs.find("resuming from the checkpoint")])]
    retrained = max(max(before, default=0) - first_resume, 0)  # a progress line every 5 s: a lower bound
    train_recovered = min(m.timestamp for m in resumed) / 1000 - train_loss["at"]

    # Step B: a chunk ran again, and the table equals an undisturbed derive of the same parent and data
    attempts = cluster.state("tasks", name="_derive_chunk")
    assert any(t["state"] == "FAILED" for t in attempts) and any(t["attempt_number"] > 0 for t in attempts), \
        "no derive chunk was lost with its node"
    manifest = DerivedDataset.open(state["derive"]["output"]["path"]).manifest
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local Ray: the undisturbed reference
    try:
        ref = run_derive(load_config(DeriveConfig, layers=[manifest["config"]]), parent=state["train"]["output"][
            "parent_dir"], data_root=run_dir / "data", ctx=RunContext.create(tmp_path / "ref-run"),
            out=tmp_path / "ref-derived")
    finally:
        ray.shutdown()
    assert ref["key"] == manifest["key"]
    a, b = DerivedDataset.open(ref["path"]), DerivedDataset.open(state["derive"]["output"]["path"])
    for split in ("train", "val"):
        x, y = a.split(split), b.split(split)
        np.testing.assert_array_equal(x.image_ids, y.image_ids)
        np.testing.assert_array_equal(x.gate_features, y.gate_features)
        for name, values in x.dense_stats().as_dict().items():
            np.testing.assert_array_equal(values, getattr(y.dense_stats(), name), err_msg=f"{split} {name}")

    # Step C: the asked number of trials complete, each in Optuna and MLflow once; a trial lost beyond Tune's
    # retries is failed as interrupted and replaced
    sweep = state["sweep"]["output"]
    study = optuna.load_study(study_name=f"eco-ray-{sweep['name']}", storage=postgres_dbs["optuna"])
    complete = sorted(t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    lost = sorted(t.number for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE)
    assert len(complete) == 6 and lost == sorted(study.user_attrs.get("interrupted_trials", []))
    kids = client.search_runs([client.get_run(sweep["run_id"]).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{sweep['run_id']}'")
    logged = sorted((int(r.data.tags["optuna_trial"]), r.info.status) for r in kids)
    assert logged == sorted([(n, "FINISHED") for n in complete] + [(n, "FAILED") for n in lost])
    rerun = logs.count("lost its worker (a lost node or process): running it again")
    assert rerun + len(lost) >= 1, "no trial was lost with its node"
    ran_on = {n for n in worker_nodes_of(cluster, cluster.state("actors", class_name="ImplicitFunc"))}
    assert len(ran_on) >= 2, ran_on

    # the gates' files went through the server's artifact proxy; the registry and its alias work over HTTP; a
    # remote model is downloaded once into the cache, whole, and reused
    finished = next(r for r in kids if r.info.status == "FINISHED")
    assert "gate/model.safetensors" in {a.path for a in client.list_artifacts(finished.info.run_id, "gate")}
    version = str(state["select"]["output"]["version"])
    assert client.get_model_version_by_alias(names["gate"], "production").version == version
    monkeypatch.setenv("ECO_RAY_CACHE_DIR", str(tmp_path / "cache"))
    local = resolve_model_dir(f"models:/{names['gate']}@production", mlflow_server)
    assert load_gate(local)[1]["derived_key"] == manifest["key"]
    assert resolve_model_dir(f"models:/{names['gate']}/{version}", mlflow_server) == local
    entries = list((tmp_path / "cache" / "artifacts").iterdir())
    assert len(entries) == 1 and local.is_relative_to(entries[0])

    # resubmitted from the selection: everything before it reused
    _, again = _run_job(cluster, entry + ["--set", "requests=0", "--from", "select"])
    for stage in ("data", "train", "derive", "sweep"):
        assert f"[pipeline] {stage}: reused" in again, stage
    assert "[pipeline] select: running" in again and "[pipeline] serve: skipped" in again
    assert sorted(v.version for v in client.search_model_versions(f"name='{names['gate']}'")) == ["1", "2"]
    assert sorted(v.version for v in client.search_model_versions(f"name='{names['parent']}'")) == ["1"]
    s2 = json.loads(summary_file.read_text())
    assert s2["parent"] == s["parent"] and s2["eco_selected"] == s["eco_selected"]  # the same pick again
    print(f"\npipeline job with three lost nodes: {job_seconds:.0f} s, stages {s['stage_seconds']}; replacement "
          f"nodes joined in {', '.join(f'{j:.1f}' for j in joined)} s (`ray start` tries: "
          f"{[loss['replacement'].starts for loss in (train_loss, derive_loss, sweep_loss)]})\n"
          f"  Step A: node dead after {train_loss['dead_after']:.1f} s; resumed from the checkpoint at step "
          f"{first_resume} {train_recovered:.1f} s after the loss (the newest checkpoint when the loss was decided: "
          f"{killed_after}); steps trained twice: at most one checkpoint interval (10), at least {retrained} by the "
          f"progress lines\n"
          f"  Step B: node dead after {derive_loss['dead_after']:.1f} s; "
          f"{sum(t['attempt_number'] > 0 for t in attempts)} chunk(s) run again; the table equals an undisturbed "
          f"derive\n"
          f"  Step C: node dead after {sweep_loss['dead_after']:.1f} s ({finished_before} of 6 trials finished "
          f"before); {rerun} trial(s) run again as the same trial, {len(lost)} failed as interrupted and replaced")


# ------------------------------------------------------------------------------------------- Serve
def test_serving_loses_the_node_of_a_replica_under_load(cluster, tiny_derived, tmp_path):
    from eco_ray.gate.config import GateConfig
    from eco_ray.gate.run import run_gate

    gate = run_gate(tiny_derived["manifest"]["path"], GateConfig(kind="quality", beta=0.05, epochs=30), [0.05],
                    ctx=tiny_derived["ctx"], out=str(tmp_path / "gate"), name="g-nodes").path
    port = free_port()
    doc = serve_config_for_loopback(port, num_replicas=2, user_config={
        "parent_uri": str(tiny_derived["parent_dir"]), "gate_uri": str(gate), "threshold": 0.05,
        "latency_repeats": 0})
    ingress_cfg = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "Ingress")
    ingress_cfg["ray_actor_options"] = {"num_cpus": 0}  # the two worker CPUs hold one Segmenter each
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(doc))
    r = subprocess.run([BIN / "serve", "deploy", str(tmp_path / "serve.yaml"), "--address",
                        cluster.dashboard_url], env=cluster.client_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    image = sorted((tiny_derived["root"] / "val").glob("*.png"))[0].read_bytes()

    def segment():
        return httpx.post(f"{url}/v1/segment", content=image, headers={"content-type": "image/png"}, timeout=60)

    def replicas(deployment="Segmenter"):
        """Nodes of the deployment's RUNNING replicas, from Serve's REST API on the dashboard (with the token)."""
        req = urllib.request.Request(f"{cluster.dashboard_url}/api/serve/applications/",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            doc = json.loads(r.read())
        rows = ((doc.get("applications") or {}).get("eco-ray") or {}).get("deployments", {}).get(deployment, {})
        return worker_nodes_of(cluster, [x for x in rows.get("replicas", []) if x["state"] == "RUNNING"])

    def serving():
        try:
            return segment().status_code == 200 and len(replicas()) == 2
        except httpx.HTTPError:
            return False

    wait_until(serving, 240, "the app to answer with two Segmenter replicas", every=1.0)
    segmenters = replicas()
    ingress = replicas("Ingress")
    assert len(set(segmenters)) == 2 and "head" not in segmenters, segmenters  # one replica per worker node
    victim = next(n for n in segmenters if n not in ingress)
    record, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                r = segment()
                record.append((time.time(), r.status_code, r))
            except httpx.HTTPError as e:  # a transport error or timeout is a failure, never lost
                record.append((time.time(), type(e).__name__, None))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        killed_at = time.time()
        dead_after = cluster.kill_node(victim)
        replacement = Replacement(cluster)  # a node with room for the replacement replica: until it joins,
        # the other replica answers alone
        wait_until(lambda: sum(1 for t, s, _ in record if t > killed_at + dead_after and s == 200) >= 4, 60,
                   "answers from the surviving replica")
        answered_alone = sum(1 for t, s, _ in record if t > killed_at and s == 200)
        joined = replacement.joined()
        wait_until(lambda: len(replicas()) == 2, 120, "the replacement replica", every=0.5)
        replaced = time.time() - killed_at
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    failed = [(s, r) for _, s, r in record if s != 200]
    # every failure is an HTTP answer with a JSON body (the Ingress's 503 for a lost Segmenter, a full queue's
    # 429): no transport error, no timeout, no hang
    assert all(s in (429, 503) and r.json()["error"] for s, r in failed), sorted({str(s) for s, _ in failed})
    assert len(failed) <= len(threads), f"{len(failed)} failed: more than the requests in flight on the lost node"
    assert set(replicas()) != set(segmenters)  # the replacement runs on another node
    subprocess.run([BIN / "serve", "shutdown", "-y", "--address", cluster.dashboard_url],
                   env=cluster.client_env(), capture_output=True, timeout=120)
    print(f"lost node under serving: dead after {dead_after:.1f} s, {len(failed)} of {len(record)} requests failed "
          f"(statuses {sorted({s for s, _ in failed})}), {answered_alone} answered by the surviving replica, "
          f"replacement node joined in {joined:.1f} s ({replacement.starts} `ray start`), two replicas again "
          f"{replaced:.1f} s after the loss")


def test_the_clusters_token_never_reached_disk(cluster):
    """The token lives only in the environment: not in a node's logs, session files or the job's records."""
    roots = [cluster.root, *(n.temp_dir for n in cluster.nodes.values())]
    token = cluster.token.encode()
    leaked = []
    for root in roots:
        for path in Path(root).rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and token in path.read_bytes():
                    leaked.append(str(path))
            except OSError:
                continue  # a socket, or a file removed meanwhile
    assert not leaked, leaked
