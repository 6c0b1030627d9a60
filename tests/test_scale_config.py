"""The Ray Serve deployment's configuration and the proxy's fault middleware, without a cluster:
one serve config for `serve run` and KubeRay, options derived from the settings, metrics merged
per replica, every failure of a replica answered in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from verispec.cli import main
from verispec.config import load_settings
from verispec.scale.deployment import deployment_options, settings_payload
from verispec.scale.faults import ReplicaFaults

ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = ROOT / "deploy" / "ray" / "serve.yaml"
RAYSERVICE = ROOT / "deploy" / "k8s" / "rayservice.yaml"


def test_rayservice_carries_the_serve_config_unchanged():
    service = yaml.safe_load(RAYSERVICE.read_text())
    assert service["kind"] == "RayService"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_YAML.read_text())


def test_serve_config_is_valid_for_ray_serve_and_verispec():
    schema = pytest.importorskip("ray.serve.schema")
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    (app,) = config.applications
    assert app.import_path == "verispec.scale.deployment:app_builder"
    settings = load_settings(dict(app.args))  # every arg is a verispec setting with a valid value
    options = deployment_options(settings)
    assert options["autoscaling_config"]["target_ongoing_requests"] == settings.max_running
    assert options["max_ongoing_requests"] == settings.max_running + settings.max_waiting


def test_options_follow_the_settings():
    fixed = deployment_options(load_settings({"replicas": 3, "max_running": 4, "max_waiting": 2, "replica_cpus": 0.5}))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 6 and fixed["max_queued_requests"] == 18
    assert fixed["ray_actor_options"] == {"num_cpus": 0.5}
    scaled = deployment_options(load_settings({"autoscale": "0,5", "max_running": 8, "upscale_delay_s": 2}))
    auto = scaled["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (0, 1, 5)
    assert auto["target_ongoing_requests"] == 8 and auto["upscale_delay_s"] == 2


def test_replicas_get_the_given_settings_secrets_included():
    settings = load_settings({"replicas": 2, "api_keys": "alice:sk-a", "max_running": 3, "stop": ["\n\n"]})
    payload = settings_payload(settings)
    assert payload == {"api_keys": "alice:sk-a", "max_running": 3, "stop": ["\n\n"]}
    again = load_settings(json.loads(json.dumps(payload)))  # as it travels: plain values
    assert again.api_keys.get_secret_value() == "alice:sk-a" and again.max_running == 3 and not again.on_ray


def test_replicas_and_autoscale_exclude_each_other(capsys):
    assert main(["serve", "--replicas", "2", "--autoscale", "1,2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["serve", "--autoscale", "3,1"]) == 2
    assert "MIN <= MAX" in capsys.readouterr().err


def test_metrics_of_replicas_merge_with_a_replica_label():
    pytest.importorskip("ray")
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from verispec.scale.shared import merge_expositions

    texts = {}
    for replica, n in (("a", 2), ("b", 5)):
        registry = CollectorRegistry()
        Counter("verispec:requests", "requests", ["model_name"], registry=registry).labels("m").inc(n)
        texts[replica] = generate_latest(registry)
    merged = merge_expositions(texts).decode()
    assert merged.count("# TYPE verispec:requests_total counter") == 1
    assert 'verispec:requests_total{model_name="m",replica="a"} 2.0' in merged
    assert 'verispec:requests_total{model_name="m",replica="b"} 5.0' in merged


# -- the proxy's middleware, around stand-ins for what Ray's proxy does when a replica fails --------


def _call(app, body: bytes = b'{"prompt": "x"}', path: str = "/v1/completions") -> tuple[int, dict, bytes]:
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the client stays connected

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": []}
    asyncio.run(ReplicaFaults(app)(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body", False)  # always ended
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def _replica(responses: list):
    """Ray's proxy app in front of replicas: each call takes the next behaviour."""
    bodies = []

    async def app(scope, receive, send):
        bodies.append((await receive())["body"])
        behaviour = responses.pop(0)
        if behaviour == "died":  # what the proxy does when the replica died before answering: nothing
            return
        if behaviour == "cut":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b'data: {"choices":[]}\n\n', "more_body": True})
            return
        status, content_type, body = behaviour
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type), (b"retry-after", b"7")]})
        await send({"type": "http.response.body", "body": body})

    return app, bodies


def test_a_request_whose_replica_died_is_retried_with_its_body():
    app, bodies = _replica(["died", (200, b"application/json", b'{"ok": true}')])
    status, _, body = _call(app)
    assert (status, body) == (200, b'{"ok": true}')
    assert bodies == [b'{"prompt": "x"}'] * 2


def test_replicas_that_keep_dying_get_openai_503_with_retry_after():
    app, _ = _replica(["died", "died", "died"])
    status, headers, body = _call(app)
    assert status == 503 and headers["retry-after"].isdigit()
    assert json.loads(body)["error"]["code"] == "replica_unavailable"


def test_ray_back_pressure_becomes_openai_503_keeping_retry_after():
    app, _ = _replica([(503, b"text/plain", b"Request dropped due to backpressure")])
    status, headers, body = _call(app)
    assert status == 503 and headers["retry-after"] == "7"
    assert json.loads(body)["error"]["code"] == "overloaded"


def test_a_stream_cut_mid_way_ends_with_an_error_event_not_done():
    app, _ = _replica(["cut"])
    status, _, body = _call(app)
    assert status == 200
    events = [e.removeprefix("data: ") for e in body.decode().split("\n\n") if e]
    assert json.loads(events[-1])["error"]["status"] == 503 and "[DONE]" not in body.decode()


def test_the_replicas_own_answers_pass_through():
    app, _ = _replica([(429, b"application/json", b'{"error": {"code": "rate_limit_exceeded"}}')])
    assert _call(app)[:1] == (429,)
    app, bodies = _replica([(500, b"application/json", b'{"error": {"code": "internal_error"}}')])
    status, _, body = _call(app)
    assert status == 500 and b"internal_error" in body and len(bodies) == 1  # its own 500: no retry


def test_a_missing_model_is_refused_before_ray_starts(tmp_path, capsys):
    assert main(["serve", "--replicas", "2", "--target", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "Traceback" not in err


def test_replicas_that_do_not_fit_a_local_instance_are_refused(capsys):
    assert main(["serve", "--replicas", "64", "--replica-cpus", "1024"]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "--replica-cpus" in err
