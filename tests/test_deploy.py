"""The KubeRay manifests: structure, agreement with the local configs, and the cluster pipeline config."""

import importlib
import re
from pathlib import Path

import yaml

from eco_ray.kuberay import RAYSERVICE, cluster_serve_config, render_rayservice
from eco_ray.serve.run import load_serve_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
IMAGE_ROOT = "/home/ray/eco-ray/"  # where deploy/Dockerfile puts the repository


def _ray_base_version() -> str:
    m = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py311", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert m, "deploy/Dockerfile must build on a rayproject/ray:<version>-py311 image"
    return m.group(1)


def _pod_specs(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def _check_cluster(cluster: dict) -> None:
    assert cluster["rayVersion"] == _ray_base_version()
    for spec in _pod_specs(cluster):
        for c in spec["containers"]:
            assert c["image"].endswith("/eco-ray:latest") and c["resources"]["limits"]["cpu"]
            env = {e["name"]: e for e in c.get("env", [])}
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://")
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert cluster["authOptions"]["mode"] == "token"  # the dashboard and job API are reachable in the cluster
    for spec in _pod_specs(cluster):
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the server requires a user
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "eco-ray-mlflow"


def test_rayservice_serve_config_is_the_local_one_rendered():
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    local = load_serve_config()
    assert embedded == cluster_serve_config(local)
    assert embedded["http_options"]["host"] == "0.0.0.0" and local["http_options"]["host"] == "127.0.0.1"
    assert RAYSERVICE.read_text() == render_rayservice(), "run `eco-ray kuberay render`"
    app = embedded["applications"][0]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    _check_cluster(manifest["spec"]["rayClusterConfig"])
    # every node's proxy drops client timeouts, and every replica can read the API key the Ingress requires
    from eco_ray.serve.proxy import CALLBACK, CALLBACK_ENV

    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    assert ingress["user_config"]["api_key_env"] and local_ingress_key(local) is None
    for spec in _pod_specs(manifest["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env[CALLBACK_ENV]["value"] == CALLBACK
        assert env[ingress["user_config"]["api_key_env"]]["valueFrom"]["secretKeyRef"]["name"] == "eco-ray-api-key"


def local_ingress_key(doc: dict):
    return next(d for d in doc["applications"][0]["deployments"] if d["name"] == "Ingress")["user_config"][
        "api_key_env"]


def test_render_detects_a_drifted_serve_config(tmp_path):
    doc = load_serve_config()
    doc["applications"][0]["deployments"][1]["autoscaling_config"]["max_replicas"] = 9
    changed = tmp_path / "serve.yaml"
    changed.write_text(yaml.safe_dump(doc))
    assert render_rayservice(changed) != RAYSERVICE.read_text()
    rendered = yaml.safe_load(yaml.safe_load(render_rayservice(changed))["spec"]["serveConfigV2"])
    assert rendered["applications"][0]["deployments"][1]["autoscaling_config"]["max_replicas"] == 9


def test_rayjob_runs_the_pipeline_with_the_cluster_config(monkeypatch):
    from eco_ray.pipeline import load_pipeline_config
    from eco_ray.resources import resolve_resource

    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob-pipeline.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    cluster = job["spec"]["rayClusterSpec"]
    _check_cluster(cluster)
    args = job["spec"]["entrypoint"].split()
    assert args[:3] == ["eco-ray", "pipeline", "--config"] and args[3].startswith(IMAGE_ROOT)
    config = DEPLOY.parent / args[3][len(IMAGE_ROOT):]
    assert config.is_file()
    # the env the config reads is set in every pod, from a Secret
    for spec in _pod_specs(cluster):
        names = {e["name"] for e in spec["containers"][0]["env"]}
        assert {"MLFLOW_TRACKING_URI", "OPTUNA_STORAGE"} <= names
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql+psycopg2://optuna@db:5432/optuna")
    cfg = load_pipeline_config(config)  # builds and validates every stage's config
    assert cfg.sweep.storage.startswith("postgresql") and cfg.train.num_workers > 1
    # the space the job names is found in the installed package, whatever the job's working directory
    assert resolve_resource("search_spaces", cfg.sweep.space).is_file()
    # run_dir lies on the volume every pod mounts
    mounts = {m["mountPath"] for spec in _pod_specs(cluster) for m in spec["containers"][0]["volumeMounts"]}
    assert any(cfg.run_dir.startswith(m) for m in mounts)


def test_network_policy_keeps_the_control_plane_to_ray_pods_and_the_operator():
    policy = yaml.safe_load((DEPLOY / "kuberay" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob-pipeline.yaml").read_text())
    service = yaml.safe_load(RAYSERVICE.read_text())
    open_ports = set()
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if "from" not in rule:
            open_ports |= ports  # reachable by any pod
            continue
        for peer in rule["from"]:
            labels = peer["podSelector"]["matchLabels"]
            # all ports only from Ray pods; others only to the dashboard, and only the operator or the submitter
            assert labels == {"ray.io/is-ray-node": "yes"} or (ports and ports <= {8265, 52365})
            if "batch.kubernetes.io/job-name" in labels:
                assert labels["batch.kubernetes.io/job-name"] == job["metadata"]["name"]
    assert open_ports == {embedded_serve_port(service)}
    for cluster in (job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"]):
        exposed = {p["containerPort"] for spec in _pod_specs(cluster) for c in spec["containers"]
                   for p in c.get("ports", [])}
        assert exposed - open_ports <= {6379, 8265, 10001}  # the rest is reachable only as the policy says


def embedded_serve_port(service: dict) -> int:
    return yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"]
