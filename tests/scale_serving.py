"""`verispec serve --replicas/--autoscale` on the session's Ray cluster, for the Ray Serve tests."""

from __future__ import annotations

import httpx

from tests.serving import ServerProcess, wait_for  # noqa: F401  (the Ray tests wait with it too)


def deployment(ray_address: str, args: list[str], log_dir, timeout_s: float = 240.0) -> ServerProcess:
    """A deployment on the shared cluster, returned once /readyz answers through Ray's proxy."""
    proc = ServerProcess([*args, "--ray-address", ray_address, "--replica-cpus", "0.5"], log_dir=log_dir)
    return proc.wait_ready(timeout_s)


def replicas_in_metrics(url: str) -> set[str]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split('replica="')[1].split('"')[0] for line in text.splitlines() if 'replica="' in line}


def running_replicas(app: str = "verispec") -> int:
    """Replicas Ray Serve reports RUNNING (the test process must be connected to the cluster)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    deployment = status.deployments.get("verispec")
    return deployment.replica_states.get("RUNNING", 0) if deployment is not None else 0
