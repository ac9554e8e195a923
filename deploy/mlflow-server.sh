#!/usr/bin/env bash
# The MLflow tracking server the cluster uses: metadata in PostgreSQL, artifacts (weights, plots, derived
# tables) in object storage, served through the server so that pods need no object-store credentials.
#
#   MLFLOW_DB=postgresql://mlflow:PASSWORD@postgres.eco-ray.svc:5432/mlflow \
#   MLFLOW_ARTIFACTS=s3://my-bucket/eco-ray/mlflow \
#   bash deploy/mlflow-server.sh
#
# Pods then set MLFLOW_TRACKING_URI=http://mlflow.eco-ray.svc:5000 (the manifests do). For s3:// the server
# needs boto3 and AWS credentials (or IRSA); gs:// needs google-cloud-storage. Locally the test suite runs this
# same command against PostgreSQL on 127.0.0.1 (tests/test_cluster_path.py).
set -euo pipefail
: "${MLFLOW_DB:?set MLFLOW_DB to a postgresql:// URL}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS to an s3://, gs:// or file:// location}"
exec mlflow server \
  --backend-store-uri "$MLFLOW_DB" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --serve-artifacts \
  --host 0.0.0.0 --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}"
