"""Ray Serve with 2 replicas of the tiny pair on the session's Ray cluster: exact output through the
openai client, every replica's metrics, a replica killed under load, one canary verdict."""

from __future__ import annotations

import json
import threading
import uuid

import httpx
import pytest

from tests.scale_serving import deployment, replicas_in_metrics, running_replicas, wait_for
from tests.test_audit_store import POSTGRES_URL
from tests.test_server import chat_target  # noqa: F401  (fixture: the tiny llama with a chat template)
from verispec.assemble import build_engine
from verispec.config import SamplingParams, load_settings

ray = pytest.importorskip("ray")

PROMPTS = ["t4 t7 t10 t13 t16", "t5 t9 t13 t17 t21", "t3 t5 t7 t9 t11"]


@pytest.fixture(scope="module")
def replicas(ray_client, chat_target, tiny_models, tmp_path_factory):  # noqa: F811
    proc = deployment(
        ray_client,
        ["--replicas", "2", "--target", chat_target, "--draft", tiny_models["llama-draft"], "--max-new-tokens", "16",
         "--audit-url", POSTGRES_URL, "--audit-content", "--max-running", "4", "--max-waiting", "8"],
        log_dir=tmp_path_factory.mktemp("logs"),
    )  # fmt: skip
    wait_for(lambda: len(replicas_in_metrics(proc.url)) == 2, 60, "both replicas in /metrics", every_s=0.5)
    yield proc
    proc.stop()


def test_openai_client_gets_the_output_of_verispec_generate(replicas, chat_target, tiny_models):  # noqa: F811
    openai = pytest.importorskip("openai")
    # The engine `verispec generate` builds from the same flags, in this process (a CLI run per prompt costs seconds).
    engine = build_engine(load_settings({"target": chat_target, "draft": tiny_models["llama-draft"]}))

    def _generate(prompt: str, tokens: int) -> str:
        return "".join(d.text for d in engine.stream(prompt, SamplingParams(max_new_tokens=tokens)))

    client = openai.OpenAI(base_url=replicas.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    for prompt in PROMPTS:
        expected = _generate(prompt, 12)
        for _ in range(2):  # both replicas, whichever Ray picks
            done = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
            assert done.choices[0].text == expected
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream) == expected
    # Chat: the template's text continued, as `verispec generate` continues it.
    templated = "t4 t7 t10 t9"  # chat_target's template: the message, a space, then t9
    expected = _generate(templated, 10)
    messages = [{"role": "user", "content": "t4 t7 t10"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == expected
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == expected


def test_metrics_carry_every_replica(replicas):
    for i in range(6):
        httpx.post(replicas.url + "/v1/completions", json={"model": "chat-llama", "prompt": PROMPTS[i % 3], "max_tokens": 4}, timeout=60)

    def served_by_both() -> bool:
        text = httpx.get(replicas.url + "/metrics", timeout=30).text
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("verispec:request_success_total{"):
                replica = line.split('replica="')[1].split('"')[0]
                counts[replica] = counts.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
        return len(counts) == 2 and sum(counts.values()) >= 6

    wait_for(served_by_both, 30, "both replicas' request counts in one /metrics", every_s=0.5)
    text = httpx.get(replicas.url + "/metrics", timeout=30).text
    assert text.count("# TYPE verispec:request_success_total counter") == 1  # one family, a series per replica


def test_a_replica_killed_under_load_loses_no_acknowledged_request(replicas):
    run = uuid.uuid4().hex[:8]
    outcomes: list[tuple[str, str, int, str]] = []  # request id, how it ended, status, detail
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            request_id, stream = f"scale-{run}-{n}-{i}", i % 2 == 0
            i += 1
            body = {"model": "chat-llama", "prompt": PROMPTS[i % 3], "max_tokens": 16, "temperature": 0, "stream": stream}
            with httpx.stream("POST", replicas.url + "/v1/completions", json=body, headers={"x-request-id": request_id}, timeout=60) as r:
                text = "".join(r.iter_lines())
                retry_after = r.headers.get("retry-after", "")
            if r.status_code == 200 and stream and "[DONE]" in text:
                outcomes.append((request_id, "acknowledged", 200, ""))
            elif r.status_code == 200 and stream:  # cut mid-way: must end with the error event
                last = json.loads(text.rsplit("data: ", 1)[1])
                outcomes.append((request_id, "cut", last["error"].get("status", 0), last["error"]["code"]))
            elif r.status_code == 200:
                outcomes.append((request_id, "acknowledged", 200, ""))
            else:
                error = r.json()["error"]  # OpenAI's shape, never a bare 500
                outcomes.append((request_id, "refused", r.status_code, f"{error['code']} retry-after={retry_after}"))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for c in clients:
        c.start()
    wait_for(lambda: len(outcomes) >= 12, 60, "load under way", every_s=0.5)
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"])
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    killed_at = len(outcomes)
    wait_for(lambda: len(outcomes) >= killed_at + 24, 120, "requests after the kill", every_s=0.5)
    stop.set()
    for c in clients:
        c.join(90)
    assert not any(c.is_alive() for c in clients), "a request hung"

    bad = [o for o in outcomes if not (o[1] == "acknowledged" or o[2] == 503 and (o[1] == "cut" or "retry-after=" in o[3] and o[3][-1:].isdigit()))]
    assert not bad, bad
    # The deployment recovers: Ray replaces the replica.
    wait_for(lambda: running_replicas() == 2, 120, "two running replicas again", every_s=0.5)
    # Every acknowledged request has its audit record in PostgreSQL.
    from verispec.audit.store import AuditStore

    acknowledged = [o[0] for o in outcomes if o[1] == "acknowledged"]
    store = AuditStore(POSTGRES_URL)
    try:
        recorded = {r["request_id"] for r in store.query(request_ids=acknowledged)}
    finally:
        store.close()
    missing = [rid for rid in acknowledged if rid not in recorded]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged requests have no record"
    print(f"kill: {len(outcomes)} requests, {len(acknowledged)} acknowledged and recorded, "
          f"{sum(o[1] == 'cut' for o in outcomes)} streams cut with an error event, {sum(o[1] == 'refused' for o in outcomes)} refused")


def test_one_canary_verdict_for_the_whole_deployment(ray_client):
    """Two replicas' canaries feed one judge: the verdict is reached once, counted once, adopted by both."""
    from verispec.scale.shared import SharedCanary

    name = f"canary:test-{uuid.uuid4().hex[:8]}"
    decided, adopted = [], []
    sides = [
        SharedCanary(name, replica, 0.5, min_requests=5, on_decision=decided.append, on_adopted=adopted.append)
        for replica in ("a", "b")
    ]
    for i in range(8):  # the candidate accepts far more: each replica alone has too few requests to judge
        side = sides[i % 2]
        side.record("current", 10, 2 + i % 2, 20, 1.0)
        side.record("candidate", 10, 9, 20, 1.0)
    wait_for(lambda: all(s.state != s.RUNNING for s in sides), 30, "both replicas to see the verdict", every_s=0.5)
    assert [d.verdict for d in decided] == ["promote"] and [d.verdict for d in adopted] == ["promote"]
    assert [s.adopted().verdict for s in sides] == ["promote", "promote"]
    assert all(s.adopted() is None for s in sides)  # applied once
    ray.kill(ray.get_actor(name, namespace="verispec"))
