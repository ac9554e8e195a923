"""KubeRay manifests that must agree with the local configs: the RayService's ``serveConfigV2`` is rendered from
the shipped Serve config (``eco-ray kuberay render``), never edited by hand, so serving on a cluster runs the
same deployments, autoscaling and user_config as ``eco-ray serve`` locally. The manifests live in the
repository's deploy/ (a platform team's files, not package data)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from eco_ray.config import ConfigError

RAYSERVICE = Path("deploy") / "kuberay" / "rayservice.yaml"  # relative to the repository root
API_KEY_ENV = "ECO_RAY_API_KEY"  # set in every serving pod from the Secret eco-ray-api-key
# what differs on a cluster, and why; a path step that is a string after "deployments" names a deployment
CLUSTER_OVERRIDES = {
    ("http_options", "host"): "0.0.0.0",  # the proxy listens on the pod's address, not loopback
    ("deployments", "Ingress", "user_config", "api_key_env"): API_KEY_ENV,  # a cluster API is never open
}


def cluster_serve_config(serve_doc: dict) -> dict:
    doc = copy.deepcopy(serve_doc)
    for path, value in CLUSTER_OVERRIDES.items():
        if path[0] == "deployments":
            nodes = [d for app in doc.get("applications", []) for d in app.get("deployments", [])
                     if d.get("name") == path[1]]
            if not nodes:
                raise ConfigError(f"the Serve config has no deployment {path[1]!r} to override for the cluster")
            path = path[2:]
        else:
            nodes = [doc]
        for node in nodes:
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
    return doc


def render_rayservice(serve_config: str | Path | None = None, rayservice: str | Path = RAYSERVICE) -> str:
    """The RayService manifest with ``spec.serveConfigV2`` replaced by the cluster form of the Serve config;
    the comments above ``apiVersion`` (the header) are kept."""
    from eco_ray.serve.run import load_serve_config

    serve_doc = cluster_serve_config(load_serve_config(serve_config))
    text = Path(rayservice).read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#") and
                     text.index(line) < text.index("apiVersion"))
    manifest = yaml.safe_load(text)
    if manifest.get("kind") != "RayService" or "spec" not in manifest:
        raise ConfigError(f"{rayservice} is not a RayService manifest")
    manifest["spec"]["serveConfigV2"] = _Literal(yaml.safe_dump(serve_doc, sort_keys=False))
    return header + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=110)


class _Literal(str):
    """A string written as a YAML block scalar (``|``), as KubeRay's examples write serveConfigV2."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))
