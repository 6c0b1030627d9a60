"""Autoscaling smoke test: deploy/ray/serve.yaml's application (as `serve run` builds it), load
raises the replicas from 1 to 2 and idleness brings them back. Timings are generous on purpose."""

from __future__ import annotations

import threading

import httpx
import pytest
import yaml

from tests.scale_serving import running_replicas, wait_for
from tests.serving import free_port
from tests.test_scale_config import SERVE_YAML

pytest.importorskip("ray")


def test_load_adds_a_replica_and_idleness_removes_it(ray_client, tiny_models):
    from ray import serve

    from verispec.scale.deployment import app_builder

    (app,) = yaml.safe_load(SERVE_YAML.read_text())["applications"]
    args = {**app["args"], "target": tiny_models["llama"], "draft": tiny_models["llama-draft"], "audit_url": "none",
            "autoscale": "1,2", "max_running": 2, "max_waiting": 8, "replica_cpus": 0.5,
            "upscale_delay_s": 1, "downscale_delay_s": 3}  # fmt: skip
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        serve.run(app_builder(args), name=app["name"], route_prefix=app["route_prefix"])
        assert running_replicas() == 1
        stop = threading.Event()

        def client(n: int) -> None:
            while not stop.is_set():
                body = {"model": "llama", "prompt": f"t{n + 3} t{n + 5} t9", "max_tokens": 48, "temperature": 0}
                assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code in (200, 503)

        clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
        for c in clients:
            c.start()
        try:
            wait_for(lambda: running_replicas() == 2, 180, "a second replica under load", every_s=1)
        finally:
            stop.set()
            for c in clients:
                c.join(120)
        wait_for(lambda: running_replicas() == 1, 180, "back to one replica when idle", every_s=1)
    finally:
        serve.shutdown()
