#!/usr/bin/env bash
# The MLflow tracking server the cluster uses: metadata in PostgreSQL, artifacts (weights, plots, derived
# tables) in object storage served through the server, so that pods need no object-store credentials.
#
#   MLFLOW_DB=postgresql+psycopg2://mlflow@postgres.eco-ray.svc:5432/mlflow \
#   MLFLOW_ARTIFACTS=s3://my-bucket/eco-ray/mlflow \
#   MLFLOW_ALLOWED_HOSTS=mlflow.eco-ray.svc:5000,mlflow.eco-ray.svc,mlflow:5000 \
#   MLFLOW_AUTH_DB=postgresql+psycopg2://mlflow@postgres.eco-ray.svc:5432/mlflow_auth \
#   MLFLOW_AUTH_ADMIN_USERNAME=... MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=... \
#   bash deploy/mlflow-server.sh
#
# What is exposed and how it is protected:
# - every request must carry HTTP basic credentials (MLflow's basic-auth app): nobody without them can read
#   runs, move `eco-gate@production` or replace artifacts. The admin is created on first start from
#   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD (from a Kubernetes Secret); clients send
#   MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (from a Secret too). /health stays open for probes.
#   MLFLOW_FLASK_SERVER_SECRET_KEY signs the auth app's CSRF tokens: the same value on every replica.
# - only the Host headers in MLFLOW_ALLOWED_HOSTS are served (MLflow's DNS-rebinding check): list the names
#   the pods use; any other gets 403.
# - no password is written to disk: the database URLs carry none (libpq reads PGPASSWORD from the
#   environment), and the auth config written below holds only the permission default and the auth DB URL.
# The server needs `pip install "mlflow[auth]" psycopg2-binary`.
# Pods then set MLFLOW_TRACKING_URI=http://mlflow.eco-ray.svc:5000 (the manifests do). For s3:// the server
# needs boto3 and AWS credentials (or IRSA); gs:// needs google-cloud-storage. The test suite runs this script
# on loopback against PostgreSQL on 127.0.0.1 (tests/test_cluster_path.py).
set -euo pipefail
: "${MLFLOW_DB:?set MLFLOW_DB to a postgresql:// URL (no password in it: use PGPASSWORD)}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS to an s3://, gs:// or file:// location}"
: "${MLFLOW_ALLOWED_HOSTS:?set MLFLOW_ALLOWED_HOSTS to the Host headers clients use, e.g. mlflow.eco-ray.svc:5000}"
: "${MLFLOW_AUTH_DB:?set MLFLOW_AUTH_DB to the database of the users and permissions (no password in it)}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME (from a Secret)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (from a Secret)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (from a Secret; the same on every replica)}"
for url in "$MLFLOW_DB" "$MLFLOW_AUTH_DB"; do
  # user:password@ or :password@ (SQLAlchemy's split: the password may hold a /), or password= in the query
  if [[ "$url" =~ ://[^:/@]*:[^@]*@ || "$url" =~ [?\&]password= ]]; then
    echo "mlflow-server.sh: a database URL carries a password; pass it as PGPASSWORD instead" >&2
    exit 2
  fi
done
# the auth config holds no secret (the admin's credentials stay in the environment); it outlives this shell,
# which `exec`s the server so that the server gets the pod's signals
auth_dir=$(mktemp -d)
cat > "$auth_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = $MLFLOW_AUTH_DB
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
exec mlflow server \
  --app-name basic-auth \
  --backend-store-uri "$MLFLOW_DB" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --serve-artifacts \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}"
