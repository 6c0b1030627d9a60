"""Ray Serve with 2 replicas of the tiny pair on the session's Ray cluster: exact output through the
openai client, verify sessions whose rounds reach their replica, every replica's metrics, a replica
killed under load, one canary verdict; the session router's choices, without a cluster."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import types
import uuid

import httpx
import pytest

from tests.conftest import make_engine
from tests.scale_serving import deployment, replicas_in_metrics, running_replicas, wait_for
from tests.test_audit_store import POSTGRES_URL
from tests.test_server import chat_target  # noqa: F401  (fixture: the tiny llama with a chat template)
from verispec.assemble import build_engine
from verispec.config import SamplingParams, load_settings
from verispec.scale.sessions import new_session_id, owner

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


def test_verify_rounds_reach_the_replica_that_holds_their_session(replicas, chat_target, tiny_models):  # noqa: F811
    """Edge clients' sessions open on whichever replica Ray picks; every later round goes to that
    replica, two clients at a time: each round finds its session, and the greedy output is the
    target's own."""
    from verispec.edge import EdgeClient

    reference = make_engine(chat_target, proposer="none")  # what `verispec generate --proposer none` runs
    prompts = [f"t{3 + i} t{7 + 2 * i} t{11 + i} t{5 + 3 * i}" for i in range(16)]
    expected = {p: reference.generate(p, SamplingParams(max_new_tokens=12)) for p in prompts}
    held: dict[str | None, list[str]] = {}  # replica -> the sessions it held

    def run(share: list[str]) -> None:
        edge = EdgeClient.with_draft(replicas.url, tiny_models["llama-draft"], model="chat-llama", depth=2)
        answers: list[dict] = []
        try:
            for prompt in share:
                if len(held) == 2 and sum(map(len, held.values())) >= 6:  # both replicas hold sessions
                    return
                answers.clear()
                text = edge.generate(prompt, max_tokens=12, on_round=answers.append)
                assert (text, edge.last.token_ids) == (expected[prompt].text, expected[prompt].token_ids), prompt
                assert len(answers) >= 3
                (session,) = {answer["session_id"] for answer in answers}
                held.setdefault(owner(session), []).append(session)
        finally:
            edge.close()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(run, (prompts[::2], prompts[1::2])))
    assert set(held) == replicas_in_metrics(replicas.url), held


def _session_held_by(url: str, replica: str) -> dict:
    """The opening answer of a verify session on `replica` (openings land where Ray picks; the
    others are closed)."""
    for _ in range(24):
        body = {"model": "chat-llama", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
        answer = httpx.post(url + "/v1/verify", json=body, timeout=60).json()
        if owner(answer["session_id"]) == replica:
            return answer
        httpx.post(url + "/v1/verify", json={"model": "chat-llama", "session_id": answer["session_id"], "close": True}, timeout=60)
    raise AssertionError(f"no session opened on replica {replica}")


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

    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"])
    orphan = _session_held_by(replicas.url, victim["name"].rsplit("#", 1)[1])  # the actor's name ends in the replica's id
    clients = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for c in clients:
        c.start()
    wait_for(lambda: len(outcomes) >= 12, 60, "load under way", every_s=0.5)
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

    # The session the dead replica held went with it: its next round hears so, never a 500 or a hang.
    def orphan_round() -> bool:
        body = {"model": "chat-llama", "session_id": orphan["session_id"], "position": orphan["position"]}
        r = httpx.post(replicas.url + "/v1/verify", json=body, timeout=60)
        assert r.status_code in (404, 503), r.text  # 503 with Retry-After while Ray still counts the dead replica
        return r.json()["error"]["code"] == "session_not_found"

    wait_for(orphan_round, 30, "the orphaned session's round answered 404", every_s=1)
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


# -- the session router, without a cluster ------------------------------------------------------------


def test_a_session_id_names_the_replica_that_holds_it():
    session_id = new_session_id("r8a2k0zq")
    assert owner(session_id) == "r8a2k0zq" and len(session_id) <= 64  # the verify API's limit on session_id
    assert owner(new_session_id()) is None  # a single server's session: nothing to route
    assert [owner(s) for s in ("", None, "vs-", "vs-abc", "vs--abc", "vs-r1-", "xs-r1-abc")] == [None] * 7


def test_the_router_sends_a_round_to_the_replica_that_holds_its_session():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest, ReplicaID

    from verispec.scale.router import SessionRouter

    deployment_id = DeploymentID(name="verispec", app_name="verispec")
    router = SessionRouter(deployment_id=deployment_id, handle_source=DeploymentHandleSource.UNKNOWN)
    live = [types.SimpleNamespace(replica_id=ReplicaID(name, deployment_id)) for name in ("aaaa1111", "bbbb2222")]

    async def choice(session_id: str) -> list[list[str]]:
        metadata = RequestMetadata(request_id="r", internal_request_id="i", session_id=session_id)
        ranks = await router.choose_replicas(live, PendingRequest(args=[], kwargs={}, metadata=metadata))
        return [sorted(r.replica_id.unique_id for r in rank) for rank in ranks]

    async def check() -> None:
        for _ in range(8):  # never by chance
            assert await choice(new_session_id("bbbb2222")) == [["bbbb2222"]]
            assert await choice(new_session_id("aaaa1111")) == [["aaaa1111"]]
        # An opening, or a round whose replica is gone: two choices (that replica answers 404).
        assert await choice("") == await choice(new_session_id("gone0000")) == [["aaaa1111", "bbbb2222"]]

    asyncio.run(check())


def test_the_proxy_routes_a_verify_round_by_the_session_in_its_body():
    from verispec.scale.faults import ReplicaFaults
    from verispec.scale.sessions import SESSION_HEADER

    def headers_seen(path: str, body: dict, headers: list) -> list:
        seen = []

        async def app(scope, receive, send):
            seen.extend(scope["headers"])
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b"{}"})

        async def receive():
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

        async def send(message):
            pass

        scope = {"type": "http", "path": path, "method": "POST", "headers": headers}
        asyncio.run(ReplicaFaults(app)(scope, receive, send))
        return [v.decode() for k, v in seen if k.decode().lower().replace("-", "_") == SESSION_HEADER.replace("-", "_")]

    session_id = new_session_id("aaaa1111")
    assert headers_seen("/v1/verify", {"session_id": session_id, "drafts": [1, 2]}, []) == [session_id]
    # A client's own session header never steers a round; an opening carries none.
    assert headers_seen("/v1/verify", {"session_id": session_id}, [(b"X-Session-Id", b"vs-bbbb2222-1")]) == [session_id]
    assert headers_seen("/v1/verify", {"prompt": "t1"}, [(b"x-session-id", b"vs-bbbb2222-1")]) == []
    assert headers_seen("/v1/completions", {"prompt": "t1", "session_id": session_id}, []) == []
