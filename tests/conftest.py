import os
import subprocess
import time
import uuid

import pytest

from cluster_stack import ADMIN, ROOT, SQLA, free_port, postgres_or_skip, server_env

from eco_ray.data.synth import SynthConfig, write_dataset

# Ray Train's controller polls its workers every 2 s and its preemption watcher every 5 s: a run's end waits
# for both, several seconds per training in a suite of short trainings. Set before any Ray starts, so the
# local clusters and the loopback cluster's nodes (which inherit this environment) poll faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small generated dataset shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, SynthConfig(size=64, seed=3), {"train": 48, "val": 16}, workers=2)
    return root


@pytest.fixture(scope="session")
def tiny_derived(synth_root, tmp_path_factory):
    """A derived dataset (Step B) of a random tiny parent on the small generated dataset, made once on a
    real local Ray. A random parent scores low, so a low query threshold keeps predictions non-empty."""
    import time

    import ray
    import torch

    from eco_ray.config import load_config
    from eco_ray.context import RunContext
    from eco_ray.data import CocoPanopticDataset
    from eco_ray.derive.config import DeriveConfig
    from eco_ray.derive.run import run_derive
    from eco_ray.model.config import load_model_config
    from eco_ray.model.early_exit import EarlyExitMask2Former
    from eco_ray.model.io import save_parent

    base = tmp_path_factory.mktemp("derive")
    torch.manual_seed(0)
    ds = CocoPanopticDataset.from_root(synth_root, "train")
    cfg = load_model_config("tiny", [f"num_labels={len(ds.categories)}"])
    parent_dir = save_parent(EarlyExitMask2Former(cfg), base / "parent", extra={"categories": ds.categories.to_coco()})
    derive_cfg = load_config(DeriveConfig, overrides=[
        "chunk_size=10", "batch_size=4", f"threshold={DERIVE_THRESHOLD}", "latency_repeats=2"])
    tracking = f"sqlite:///{base}/mlflow.db"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    ctx = RunContext.create(base, tracking)
    manifest = run_derive(derive_cfg, parent=str(parent_dir), data_root=synth_root, ctx=ctx)
    first_seconds = time.perf_counter() - t0
    if started:
        ray.shutdown()
    return {"base": base, "parent_dir": parent_dir, "cfg": derive_cfg, "tracking": tracking, "manifest": manifest,
            "first_seconds": first_seconds, "root": synth_root, "ctx": ctx}


DERIVE_THRESHOLD = 0.05


@pytest.fixture(scope="session")
def postgres_dbs():
    """Fresh databases per test run (MLflow, its users and Optuna each keep an `alembic_version` table, so
    they cannot share one), dropped afterwards."""
    conn = postgres_or_skip()
    names = {role: f"eco_ray_{role}_{uuid.uuid4().hex[:8]}" for role in ("mlflow", "mlflow_auth", "optuna")}
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f"CREATE DATABASE {name}")
    yield {role: f"{SQLA}/{name}" for role, name in names.items()}
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


@pytest.fixture(scope="session")
def mlflow_server(postgres_dbs, tmp_path_factory):
    """deploy/mlflow-server.sh on loopback; clients authenticate as the admin it bootstraps, through the
    environment variables MLflow's client reads (as the pods get them from a Secret)."""
    import httpx

    port = free_port()
    env = server_env(postgres_dbs, tmp_path_factory.mktemp("mlflow-artifacts"), port)
    # its log to a file: a pipe nobody reads would block the server once full, in a session-long fixture
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "deploy" / "mlflow-server.sh")], env=env,
                                stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {log.read_text(errors='replace')[-2000:]}")
        try:  # ready once an authenticated call answers: the auth app bootstraps the admin on first use
            if httpx.post(f"{url}/api/2.0/mlflow/experiments/search", json={"max_results": 1}, auth=ADMIN,
                          timeout=30).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        os.killpg(proc.pid, 15)
        pytest.fail("mlflow server did not come up within 120 s")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = ADMIN
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.killpg(proc.pid, 15)  # the script's process group: bash, mlflow and its workers
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


