"""``eco-ray serve``: start the Serve app of a Serve config (default: the shipped one, which
deploy/serve_config.yaml links to) on a local Ray or a cluster, against an MLflow store, and print the URL."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from eco_ray.cluster import init_ray
from eco_ray.config import ConfigError
from eco_ray.resources import resolve_resource

DEFAULT_CONFIG = "serve_config"  # the shipped one, eco_ray/resources/serve/serve_config.yaml


def load_serve_config(path: str | Path | None = None) -> dict:
    """A Serve config file (or the shipped one), checked to hold the Ingress and Segmenter deployments."""
    path = resolve_resource("serve", path or DEFAULT_CONFIG)
    try:
        doc = yaml.safe_load(path.read_text())
        app = doc["applications"][0]
        deployments = {d["name"]: d for d in app["deployments"]}
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"{path}: not a Serve config with one application and its deployments ({e})") from None
    for name in ("Ingress", "Segmenter"):
        if name not in deployments:
            raise ConfigError(f"{path}: no deployment named {name!r}")
    return doc


def is_pinned(uri: str) -> bool:
    """Whether ``uri`` names fixed files: anything but ``models:/name@alias`` and ``models:/name/latest``."""
    return not uri.startswith("models:/") or ("@" not in uri and not uri.endswith("/latest"))


def pin_model_uri(uri: str, tracking_uri: str) -> str:
    """``models:/name@alias`` or ``models:/name/latest`` -> ``models:/name/N``, the version it points at now; other
    URIs as they are. Pinned when the app is deployed, every replica (also one that autoscaling starts an hour
    later) loads the same model; moving the alias changes nothing until the app is deployed again."""
    from eco_ray.tracking import registry_version

    if is_pinned(uri):
        return uri
    v = registry_version(uri, tracking_uri)
    return f"models:/{v.name}/{v.version}"


def build_app(doc: dict, overrides: dict | None = None, pin: bool = True, check: bool = True):
    """The application with each deployment's options (autoscaling, user_config, ...) from the config; the
    model URIs pinned to the versions they point at now (``pin``), and loaded once here (``check``): a parent
    and gate that cannot be resolved, loaded or paired fail before anything is deployed, never on the replicas
    of a rolling update (whose failure would leave the deployment unavailable)."""
    from eco_ray.serve.app import Ingress, Segmenter

    doc = copy.deepcopy(doc)
    deployments = {d["name"]: d for d in doc["applications"][0]["deployments"]}
    seg_opts = {k: v for k, v in deployments["Segmenter"].items() if k != "name"}
    user = {**seg_opts.get("user_config", {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if pin:
        tracking = user.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        for key in ("parent_uri", "gate_uri"):
            pinned = pin_model_uri(user[key], tracking) if tracking else user[key]
            if pinned != user[key]:
                user[f"{key}_requested"], user[key] = user[key], pinned
    seg_opts["user_config"] = user
    if check:
        from eco_ray.serve.engine import load_engine

        tracking = user.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking:
            raise ConfigError("the Segmenter needs user_config.tracking_uri or $MLFLOW_TRACKING_URI")
        from eco_ray.serve.load import LoadPolicy, LoadPolicyError

        try:
            engine, _ = load_engine(user["parent_uri"], user["gate_uri"], tracking)
        except (ValueError, OSError) as e:
            raise ConfigError(f"the models cannot be served: {str(e).splitlines()[0]}") from None
        try:  # the operator's load policy, against the exits of the models it will cap
            policy = LoadPolicy.parse(user.get("adaptive"), engine.exits)
        except LoadPolicyError as e:
            raise ConfigError(f"Segmenter user_config: {e}") from None
        ongoing = seg_opts.get("max_ongoing_requests", Segmenter._deployment_config.max_ongoing_requests)
        for knob in ("queue_high", "shed_held"):  # a replica never holds more than max_ongoing_requests
            value = getattr(policy, knob)
            if policy.enabled and value is not None and value > ongoing:
                raise ConfigError(f"Segmenter user_config: adaptive.{knob} ({value}) is above the Segmenter's "
                                  f"max_ongoing_requests ({ongoing}): the replica never holds that many")
    ing_opts = {k: v for k, v in deployments["Ingress"].items() if k != "name"}
    return Ingress.options(**ing_opts).bind(Segmenter.options(**seg_opts).bind()), user


def start(config: str | None, *, parent_uri: str | None, gate_uri: str | None, ctx, host: str, port: int,
          blocking: bool = True) -> str:
    from ray import serve

    doc = load_serve_config(config)
    # pinned and loaded here: models that cannot be served fail before Ray starts
    app, user = build_app(doc, {"parent_uri": parent_uri, "gate_uri": gate_uri, "tracking_uri": ctx.tracking_uri})
    from eco_ray.serve.proxy import CALLBACK, CALLBACK_ENV

    os.environ.setdefault(CALLBACK_ENV, CALLBACK)  # the proxy processes inherit it from the Ray we start
    if ctx.address:  # a running cluster's proxies read their own environment, not ours
        import sys

        print(f"eco-ray serve: on an existing cluster, the proxy's guard (body cap, JSON errors, no client timeout "
              f"override) needs {CALLBACK_ENV}={CALLBACK} in the environment the cluster was started with "
              f"(the RayService manifest sets it)", file=sys.stderr)
    init_ray(ctx.address, log_to_driver=False)
    http = doc.get("http_options") or {}
    # proxy_location as the config says (EveryNode, HeadOnly, Disabled); Serve's own default when it is absent
    http_options = {"host": host, "port": port,
                    **({"request_timeout_s": http["request_timeout_s"]} if http.get("request_timeout_s") else {})}
    serve.start(**({"proxy_location": doc["proxy_location"]} if doc.get("proxy_location") else {}),
                http_options=http_options)
    serve.run(app, name=doc["applications"][0].get("name", "eco-ray"), route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    if blocking:
        serve_until_interrupted(url, served_route(user["parent_uri"], user.get("tracking_uri") or ctx.tracking_uri))
    return url


def served_route(parent_uri: str, tracking_uri: str) -> str:
    """The endpoint that serves the parent's task: ``segment`` or ``detect``."""
    from eco_ray.model.io import parent_task
    from eco_ray.tasks import get_task
    from eco_ray.tracking import resolve_model_dir

    return get_task(parent_task(resolve_model_dir(parent_uri, tracking_uri))).route


def serve_until_interrupted(url: str, route: str = "segment") -> None:
    """Keep the (already running) app up until Ctrl-C, then shut Serve down."""
    import time

    from ray import serve

    print(f"eco-ray serving on {url}  (POST {url}/v1/{route}, GET {url}/v1/models); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
