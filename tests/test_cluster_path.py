"""The cluster path's services for real: the shipped deploy/mlflow-server.sh (an `mlflow server` with basic auth and a
Host allow-list, on PostgreSQL), its refusals, and the read-only user the serving pods get. The sweep and
selection through this server with the Optuna study in PostgreSQL run in tests/test_multinode.py's Ray job.

The services are conftest.py's session fixtures (tests/cluster_stack.py). Skips, saying why, when no PostgreSQL
answers on 127.0.0.1:5432 (trust auth, database `test`)."""

import subprocess
import uuid

import pytest
from mlflow import MlflowClient

from cluster_stack import ADMIN, ROOT, SERVICE_HOST, free_port, server_env

pytestmark = pytest.mark.slow


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
        env = server_env(postgres_dbs, tmp_path, free_port())
        env["MLFLOW_DB"] = url
        r = subprocess.run(["bash", str(ROOT / "deploy" / "mlflow-server.sh")], env=env, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and "PGPASSWORD" in r.stderr and "hunter2" not in r.stderr, url


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
