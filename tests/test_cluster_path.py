"""The cluster path for real: an `mlflow server` on PostgreSQL (HTTP tracking, registry, artifacts) and the
Optuna study in PostgreSQL (RDB storage), driven by the same sweep and select code as the embedded default.

Skips, saying why, when no PostgreSQL answers on 127.0.0.1:5432 (trust auth, database `test`)."""

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from eco_ray.budget import Budget
from eco_ray.config import load_config
from eco_ray.context import RunContext
from eco_ray.resources import resource_path
from eco_ray.sweep import SweepConfig, run_sweep, select

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PG = "postgresql://postgres@127.0.0.1:5432"
# SQLAlchemy 2.1 defaults postgresql:// to psycopg 3; name the installed driver explicitly
SQLA = "postgresql+psycopg2://postgres@127.0.0.1:5432"


def _postgres_or_skip():
    try:
        import psycopg2
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install -e .[test])")
    try:
        conn = psycopg2.connect(f"{PG}/test", connect_timeout=3)
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL server reachable at 127.0.0.1:5432 ({str(e).strip().splitlines()[0]})")
    conn.autocommit = True
    return conn


@pytest.fixture(scope="module")
def postgres_dbs():
    """Two fresh databases per test run (MLflow and Optuna each keep an `alembic_version` table, so they
    cannot share one), dropped afterwards."""
    conn = _postgres_or_skip()
    names = {role: f"eco_ray_{role}_{uuid.uuid4().hex[:8]}" for role in ("mlflow", "optuna")}
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f"CREATE DATABASE {name}")
    yield {role: f"{SQLA}/{name}" for role, name in names.items()}
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


@pytest.fixture(scope="module")
def mlflow_server(postgres_dbs, tmp_path_factory):
    art = tmp_path_factory.mktemp("mlflow-artifacts")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_dbs["mlflow"], "--artifacts-destination",
         str(art), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    import httpx

    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_sweep_and_select_through_an_mlflow_server_and_postgres_study(tiny_derived, tmp_path, postgres_dbs,
                                                                      mlflow_server):
    import ray

    cfg = load_config(SweepConfig, overrides=[
        "trials=4", "concurrency=2", f"space={resource_path('search_spaces', 'default')}",
        f"storage={postgres_dbs['optuna']}"])
    ctx = RunContext.create(tmp_path, mlflow_server)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s = run_sweep(cfg, derived=tiny_derived["manifest"]["path"], ctx=ctx, name="pg1")
    finally:
        ray.shutdown()
    assert s.complete == 4
    study = optuna.load_study(study_name="eco-ray-pg1", storage=postgres_dbs["optuna"])  # in Postgres
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 4
    client = MlflowClient(mlflow_server)
    kids = client.search_runs([client.get_run(s.run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{s.run_id}'")
    assert len(kids) == 4
    # artifacts went through the server's proxy, and the registry works over HTTP
    assert {"gate/model.safetensors"} <= {a.path for a in client.list_artifacts(kids[0].info.run_id, "gate")}
    best = max(t.metrics["pq"] for t in s.trials)
    r = select("pg1", Budget.named("min_pq", 0.0), ctx=ctx)
    assert client.get_model_version_by_alias("eco-gate", "production").version == r.version
    from eco_ray.model.io import load_gate
    from eco_ray.tracking import resolve_model_dir

    gate, meta = load_gate(resolve_model_dir("models:/eco-gate@production", mlflow_server))
    assert meta["derived_key"] == tiny_derived["manifest"]["key"] and best >= r.chosen["pq"]
