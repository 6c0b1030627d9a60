"""`verispec serve --replicas N | --autoscale MIN,MAX [--ray-address ADDR]`: the deployment on Ray Serve.

Starts a local Ray instance (or joins `--ray-address`), starts Serve's HTTP proxy on --host and
--port with verispec's fault middleware, runs the application and waits until every replica is
warm, then serves until SIGINT or SIGTERM, when it takes the application down again (and the local
Ray instance, if it started one).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from verispec.config import Settings
from verispec.errors import UserError
from verispec.scale.deployment import APP_NAME, build_application, deployment_options

log = logging.getLogger("verispec.scale")

PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_MIDDLEWARES = "verispec.scale.faults:proxy_middlewares"


def require_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError(
            "--replicas, --autoscale and --ray need Ray: pip install 'verispec[scale]' (Ray Serve and Ray Data)"
        ) from None
    return ray, serve


def connect(ray_address: str | None, env: dict[str, str] | None = None) -> bool:
    """Join `ray_address`, or start a local Ray instance; True when this process started it."""
    ray, _ = require_ray()
    env = {PROXY_CALLBACK: PROXY_MIDDLEWARES, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    os.environ.update(env)  # a local instance's processes inherit it (the HTTP proxy reads the callback)
    try:
        ray.init(
            address=ray_address, namespace="verispec", runtime_env={"env_vars": env}, include_dashboard=False,
            logging_level=logging.WARNING, configure_logging=False,
        )  # fmt: skip
    except ConnectionError as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {ray_address}: {exc}; check --ray-address (a cluster with token "
            "authentication also needs its token here: RAY_AUTH_TOKEN or ~/.ray/auth_token, see `ray get-auth-token`)"
        ) from None
    return ray_address is None


def serve_on_ray(settings: Settings) -> int:
    ray, serve = require_ray()
    if settings.port == 0:  # Ray's proxy needs a port of its own choosing: pick a free one now
        with socket.socket() as probe:
            probe.bind((settings.host, 0))
            settings = settings.model_copy(update={"port": probe.getsockname()[1]})
    options = deployment_options(settings)
    shape = (
        f"{options['num_replicas']} replicas" if "num_replicas" in options
        else "{min_replicas}..{max_replicas} replicas, autoscaled".format(**options["autoscaling_config"])
    )  # fmt: skip
    if settings.audit_url.startswith("sqlite") and settings.ray_address:
        log.warning(
            "audit trail in SQLite (%s) with a Ray cluster: replicas on other machines write their own files; "
            "give --audit-url postgresql://... so every replica writes to one store", settings.audit_url,
        )
    if settings.ray_address is None:
        _check_fits_here(settings, options)
    from verispec.assemble import check_models

    check_models(settings)  # a missing model or a mismatched draft: refused here, not by every replica in turn
    local = connect(settings.ray_address)
    serve_was_running = _serve_running(ray)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        started = time.perf_counter()
        log.warning("starting %s of %s on Ray Serve; loading the models in each", shape, APP_NAME)
        serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
        log.warning(
            "ready in %.0fs: %s at http://%s:%d (OpenAI API under /v1, /readyz, /metrics of every replica)",
            time.perf_counter() - started, shape, settings.host, settings.port,
        )
        stop.wait()
    except RuntimeError as exc:  # a deployment that failed to start: say why, no traceback
        raise UserError(f"the deployment failed to start: {exc}") from None
    finally:
        _take_down(ray, serve, shutdown_serve=local or not serve_was_running, wait_s=settings.grace_s + 30)
    return 0


def _check_fits_here(settings: Settings, options: dict) -> None:
    """A local Ray instance has this machine's CPUs: replicas that cannot all be placed would leave
    the deployment waiting forever, so say so now."""
    auto = options.get("autoscaling_config")
    replicas = auto["initial_replicas"] if auto else options["num_replicas"]
    cpus = os.cpu_count() or 1
    if replicas * settings.replica_cpus > cpus:
        raise UserError(
            f"{replicas} replicas x {settings.replica_cpus:g} CPUs (--replica-cpus) do not fit this machine's {cpus} CPUs; "
            "lower --replica-cpus (e.g. 0.5 lets two replicas share a core) or join a larger cluster with --ray-address"
        )
    if auto and auto["max_replicas"] * settings.replica_cpus > cpus:
        log.warning(
            "--autoscale up to %d replicas x %g CPUs exceeds this machine's %d CPUs: Ray will stop adding replicas "
            "before the maximum", auto["max_replicas"], settings.replica_cpus, cpus,
        )


def _serve_running(ray) -> bool:
    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    except ValueError:
        return False
    return True


def _take_down(ray, serve, shutdown_serve: bool, wait_s: float) -> None:
    """Delete the application (replicas get --grace-s to finish their requests), the actors its
    replicas shared, and Serve itself where this command started it; never wait forever on a
    cluster that has gone away."""
    from verispec.scale.shared import NAMESPACE  # imports Ray, as this command has by now

    def take_down() -> None:
        serve.delete(APP_NAME)
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == NAMESPACE and f":{APP_NAME}" in actor["name"]:
                ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE))
        if shutdown_serve:
            serve.shutdown()

    log.warning("taking the deployment down")
    worker = threading.Thread(target=take_down, name="verispec-take-down", daemon=True)
    worker.start()
    worker.join(wait_s)
    if worker.is_alive():
        log.warning("the Ray cluster did not take the deployment down within %.0fs; leaving it", wait_s)
    ray.shutdown()
