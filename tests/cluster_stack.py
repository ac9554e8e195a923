"""The cluster path's real services on loopback, shared by the tests that need them: PostgreSQL (127.0.0.1:5432,
trust auth, database `test`; tests skip, saying why, where none answers) and the shipped deploy/mlflow-server.sh
on it (fixtures ``postgres_dbs`` and ``mlflow_server`` in conftest.py, one of each per test session)."""

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PG = "postgresql://postgres@127.0.0.1:5432"
# SQLAlchemy 2.1 defaults postgresql:// to psycopg 3; name the installed driver explicitly
SQLA = "postgresql+psycopg2://postgres@127.0.0.1:5432"


def postgres_or_skip():
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


ADMIN = ("eco-admin", f"pw-{uuid.uuid4().hex}")
SERVICE_HOST = "mlflow.eco-ray.svc:5000"  # the name the pods use (deploy/kuberay/*.yaml)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(postgres_dbs: dict, artifacts: Path, port: int) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_DB": postgres_dbs["mlflow"], "MLFLOW_AUTH_DB": postgres_dbs["mlflow_auth"],
            "MLFLOW_ARTIFACTS": artifacts.as_uri(), "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{port},{SERVICE_HOST}",
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0], "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
            "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}


