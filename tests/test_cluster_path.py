"""The cluster path for real: the shipped deploy/mlflow-server.sh (an `mlflow server` with basic auth and a Host
allow-list, on PostgreSQL: HTTP tracking, registry, artifacts) and the Optuna study in PostgreSQL (RDB storage),
driven by the same sweep and select code as the embedded default.

Skips, saying why, when no PostgreSQL answers on 127.0.0.1:5432 (trust auth, database `test`)."""

import os
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
    """Fresh databases per test run (MLflow, its users and Optuna each keep an `alembic_version` table, so
    they cannot share one), dropped afterwards."""
    conn = _postgres_or_skip()
    names = {role: f"eco_ray_{role}_{uuid.uuid4().hex[:8]}" for role in ("mlflow", "mlflow_auth", "optuna")}
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f"CREATE DATABASE {name}")
    yield {role: f"{SQLA}/{name}" for role, name in names.items()}
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


ADMIN = ("eco-admin", f"pw-{uuid.uuid4().hex}")
SERVICE_HOST = "mlflow.eco-ray.svc:5000"  # the name the pods use (deploy/kuberay/*.yaml)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(postgres_dbs: dict, artifacts: Path, port: int) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_DB": postgres_dbs["mlflow"], "MLFLOW_AUTH_DB": postgres_dbs["mlflow_auth"],
            "MLFLOW_ARTIFACTS": artifacts.as_uri(), "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{port},{SERVICE_HOST}",
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0], "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
            "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}


@pytest.fixture(scope="module")
def mlflow_server(postgres_dbs, tmp_path_factory):
    """deploy/mlflow-server.sh on loopback; clients authenticate as the admin it bootstraps, through the
    environment variables MLflow's client reads (as the pods get them from a Secret)."""
    import httpx

    port = _free_port()
    env = _server_env(postgres_dbs, tmp_path_factory.mktemp("mlflow-artifacts"), port)
    proc = subprocess.Popen(["bash", str(ROOT / "deploy" / "mlflow-server.sh")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {proc.stderr.read().decode()[-2000:]}")
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
    proc.wait(timeout=30)


def test_mlflow_server_script_refuses_anonymous_clients_and_foreign_hosts(mlflow_server):
    import httpx

    search = f"{mlflow_server}/api/2.0/mlflow/experiments/search"
    assert httpx.post(search, json={"max_results": 1}, auth=ADMIN, timeout=10).status_code == 200
    anonymous = httpx.post(search, json={"max_results": 1}, timeout=10)
    assert anonymous.status_code == 401
    assert httpx.get(f"{mlflow_server}/health", timeout=10).status_code == 200  # probes need no credentials
    assert httpx.post(search, json={"max_results": 1}, auth=(ADMIN[0], "wrong"), timeout=10).status_code == 401
    # the cluster's service name, allowed by the script's MLFLOW_ALLOWED_HOSTS, is served ...
    service = httpx.post(search, json={"max_results": 1}, auth=ADMIN, headers={"Host": SERVICE_HOST}, timeout=10)
    assert service.status_code == 200
    # ... and a Host not in MLFLOW_ALLOWED_HOSTS (a DNS-rebinding page, say) is refused even with credentials
    foreign = httpx.post(search, json={"max_results": 1}, auth=ADMIN, headers={"Host": "evil.example:80"},
                         timeout=10)
    assert foreign.status_code == 403


def test_mlflow_server_script_refuses_a_password_in_a_database_url(tmp_path, postgres_dbs):
    for url in ("postgresql+psycopg2://mlflow:hunter2@db:5432/mlflow", "postgresql://:hunter2@db/mlflow",
                "postgresql://mlflow:hun/ter2@db/mlflow", "postgresql://mlflow@db/mlflow?password=hunter2"):
        env = _server_env(postgres_dbs, tmp_path, _free_port())
        env["MLFLOW_DB"] = url
        r = subprocess.run(["bash", str(ROOT / "deploy" / "mlflow-server.sh")], env=env, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and "PGPASSWORD" in r.stderr and "hunter2" not in r.stderr, url


def test_sweep_and_select_through_an_mlflow_server_and_postgres_study(tiny_derived, tmp_path, postgres_dbs,
                                                                      mlflow_server, monkeypatch):
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

    monkeypatch.setenv("ECO_RAY_CACHE_DIR", str(tmp_path / "cache"))
    local = resolve_model_dir("models:/eco-gate@production", mlflow_server)
    gate, meta = load_gate(local)
    assert meta["derived_key"] == tiny_derived["manifest"]["key"] and best >= r.chosen["pq"]
    # a remote model is downloaded once into the cache, whole, and reused (not one new temp dir per resolve)
    assert resolve_model_dir(f"models:/eco-gate/{r.version}", mlflow_server) == local
    entries = list((tmp_path / "cache" / "artifacts").iterdir())
    assert len(entries) == 1 and local.is_relative_to(entries[0])


def test_a_read_only_serving_user_loads_models_but_cannot_move_an_alias(mlflow_server, tmp_path, monkeypatch):
    """The credentials the serving pods get (docs/deploy.md): READ on the registered models and on the
    experiment that holds their files, nothing else."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from eco_ray.tracking import resolve_model_dir

    admin, client = get_app_client("basic-auth", tracking_uri=mlflow_server), MlflowClient(mlflow_server)
    name, experiment = f"perm-{uuid.uuid4().hex[:8]}", f"perm-exp-{uuid.uuid4().hex[:8]}"
    exp_id = client.create_experiment(experiment)
    run = client.create_run(exp_id)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    client.log_artifacts(run.info.run_id, str(tmp_path / "model"), "model")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "production", version.version)
    user = ("eco-serve", f"pw-{uuid.uuid4().hex}")
    admin.create_user(*user)
    admin.grant_user_permission(user[0], "registered_model", name, "READ")
    admin.grant_user_permission(user[0], "experiment", exp_id, "READ")

    nobody = ("eco-nobody", f"pw-{uuid.uuid4().hex}")  # a user without grants: the server's default is none
    admin.create_user(*nobody)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", nobody[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", nobody[1])
    with pytest.raises(Exception, match="PERMISSION_DENIED|Permission denied|403"):
        resolve_model_dir(f"models:/{name}@production", mlflow_server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    monkeypatch.setenv("ECO_RAY_CACHE_DIR", str(tmp_path / "cache"))
    local = resolve_model_dir(f"models:/{name}@production", mlflow_server)  # the alias and the files: readable
    assert (local / "config.json").read_text() == "{}"
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
        MlflowClient(mlflow_server).set_registered_model_alias(name, "production", version.version)
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|Permission denied"):
        mlflow.MlflowClient(mlflow_server).create_run(exp_id)
