"""The Ray Serve deployment: one `VerispecReplica` per replica, each the whole FastAPI app of
`verispec serve` around its own engine, with the options Ray needs derived
from verispec's settings.

`app_builder` is the import path of `deploy/ray/serve.yaml` (`serve run` / `serve deploy`, and
KubeRay's RayService); `verispec serve --replicas` builds the same application.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from verispec.config import Settings, load_settings
from verispec.flags import quiet_libraries

log = logging.getLogger("verispec.scale")

APP_NAME = "verispec"
DEPLOYMENT = "verispec"
ROUTER = "verispec.scale.router:SessionRouter"


def settings_payload(settings: Settings) -> dict[str, Any]:
    """The settings a user gave (defaults left to each replica), as plain values a replica can take:
    secrets as their values (they travel inside the Ray cluster, as the replica needs them), paths
    as strings."""
    values = settings.model_dump(exclude_defaults=True)
    for name, value in values.items():
        if isinstance(value, SecretStr):
            values[name] = value.get_secret_value()
        elif isinstance(value, Path):
            values[name] = str(value)
        elif isinstance(value, tuple):
            values[name] = list(value)
    for name in ("replicas", "autoscale", "ray_address"):  # the deployment's shape, not a replica's
        values.pop(name, None)
    from verispec.assemble import portable_model_refs  # a replica's working folder is not this one

    return portable_model_refs(values)


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve's options for the deployment, from verispec's settings.

    A replica takes `max_running` requests into one verifier pass and queues `max_waiting` more;
    Ray sends it no more than both together (`max_ongoing_requests`), and the autoscaler aims at
    `max_running` ongoing requests per replica: the batch a replica runs at full width. Requests
    beyond every replica's room wait in Ray's queue up to one replica's worth per replica, then get
    503 with Retry-After (the proxy's middleware shapes it as OpenAI's).
    """
    room = settings.max_running + settings.max_waiting
    bounds = settings.autoscale_bounds
    most = bounds[1] if bounds else (settings.replicas or 1)
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": room,
        "max_queued_requests": room * most,
        "ray_actor_options": {"num_cpus": settings.replica_cpus},
        "graceful_shutdown_timeout_s": settings.grace_s,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        # A verify session's rounds go to the replica that holds it (verispec.scale.sessions).
        "request_router_config": {"request_router_class": ROUTER},
    }
    if bounds:
        low, high = bounds
        options["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": high,
            "target_ongoing_requests": settings.max_running,
            "upscale_delay_s": settings.upscale_delay_s,
            "downscale_delay_s": settings.downscale_delay_s,
            # Ongoing requests as replicas report them every 2 s, averaged over the upscale delay.
            "metrics_interval_s": 2.0,
            "look_back_period_s": max(4.0, settings.upscale_delay_s),
        }
    else:
        options["num_replicas"] = settings.replicas or 1
    return options


class VerispecReplica:
    """One replica: verispec's FastAPI app with its engine, wired to what the replicas share.

    Ray routes to a replica once its constructor and the app's start-up have run, and the app's
    start-up loads and warms the models (`create_app(..., cluster=...)`), so a replica is only
    ever routed to when it can answer at once. `check_health` tells Ray when it no longer can.
    """

    def __init__(self, settings: dict[str, Any]):
        from ray import serve

        from verispec.assemble import build_engine
        from verispec.scale.shared import ReplicaMetrics, SharedCanary
        from verispec.server.app import Cluster, create_app
        from verispec.server.logs import configure

        quiet_libraries()
        config = load_settings(settings)
        configure(config.log_format, config.log_level)
        context = serve.get_replica_context()
        replica = context.replica_id.unique_id
        self._metrics = ReplicaMetrics(f"metrics:{context.app_name}", replica)
        judge = f"canary:{context.app_name}:{_canary_digest(config)}"
        cluster = Cluster(replica, self._metrics, functools.partial(SharedCanary, judge, replica))
        self._app = create_app(config, build_engine, cluster)
        self._state = self._app.state.verispec
        self._metrics.start(self._state.metrics.registry)
        log.info("replica %s of %s", replica, context.app_name)

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        serving = self._state.serving
        if serving.load_error:
            raise RuntimeError(serving.load_error)
        if serving.service is not None and not serving.service.scheduler.alive:
            raise RuntimeError("the engine thread has stopped")


def _canary_digest(settings: Settings) -> str:
    """A new canary (another candidate, other test settings) gets a new judge."""
    fields = ("canary_draft", "canary_fraction", "canary_min_requests", "canary_alpha", "canary_margin")
    return hashlib.sha256(repr([getattr(settings, f) for f in fields]).encode()).hexdigest()[:12]


def build_application(settings: Settings):
    """The Serve application for these settings."""
    from ray import serve

    deployment = serve.deployment(serve.ingress()(VerispecReplica))
    return deployment.options(**deployment_options(settings)).bind(settings_payload(settings))


def app_builder(args: dict[str, Any]):
    """`serve run` / `serve deploy` entry point (`import_path: verispec.scale.deployment:app_builder`).

    `args` are verispec's settings, by the same names as in a config file (`max_running`,
    `autoscale: "1,4"`, ...), optionally with `config: PATH` for a config file on every node.
    """
    args = dict(args or {})
    config = args.pop("config", None)
    settings = load_settings(args, Path(config) if config else None)
    return build_application(settings)
