"""Two-stage patterns over real HTTP, on one server.

The verify API and the edge client: an edge proposer gets exactly the verifier's greedy output and
samples its distribution; hostile rounds get a clear 4xx and leave the session as it was; sessions
count against admission, expire when idle and are audited like requests.

Provisional streaming: drafts arrive before their verdict, in order, and the verified chunks are
exactly the verified-only response; a client that leaves mid-stream frees its slot."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from tests.conftest import make_engine
from tests.serving import ServerProcess, metric, wait_for
from tests.test_batching import VOCAB, exact_pair
from tests.test_sampling_distribution import ALPHA, goodness_of_fit
from verispec.audit.store import AuditStore
from verispec.config import SamplingParams
from verispec.core.sampling import warp
from verispec.edge import EdgeClient, EdgeError
from verispec.models import load_tokenizer
from verispec.models.kernels import kernel_library

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="the verify API needs the batched engine (AVX2/FMA/F16C)")

KEYS = {"alice": "key-alice", "bob": "key-bob"}
PROMPTS = [" ".join(f"t{(i * 5 + j * 7) % 90 + 1}" for j in range(3 + 4 * i)) for i in range(5)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return exact_pair(tmp_path_factory.mktemp("edge-models"), seed=21)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """Verifier-only by default (the edge clients propose), with a draft for provisional streams
    (pinned per request). Two keys; sessions idle for 3 s expire."""
    audit = tmp_path_factory.mktemp("audit") / "audit.db"
    proc = ServerProcess(
        ["--target", models["target"], "--draft", models["draft"], "--proposers", "none,draft", "--depth", "3",
         "--max-running", "3", "--max-waiting", "0",
         "--verify-idle-s", "3", "--audit-url", f"sqlite:///{audit}", "--audit-content", "--max-new-tokens", "48"],
        log_dir=tmp_path_factory.mktemp("logs"),
        env={"VERISPEC_API_KEYS": ",".join(f"{k}:{v}" for k, v in KEYS.items())},
    ).wait_ready()  # fmt: skip
    proc.audit = audit
    yield proc
    proc.stop_gracefully()


@pytest.fixture(scope="module")
def tokenizer(models):
    return load_tokenizer(models["target"])


def client(server, models, tokenizer, proposer="draft", key="alice", **kwargs) -> EdgeClient:
    """An edge client drafting with the random draft (rejections), the target itself (acceptance
    near 1), or the n-gram lookup."""
    if proposer in ("draft", "target"):
        return EdgeClient.with_draft(server.url, models[proposer], model="target", api_key=KEYS[key], **kwargs)
    return EdgeClient.with_ngram(server.url, model="target", tokenizer=tokenizer, api_key=KEYS[key], **kwargs)


def post(server, body: dict, key: str = "alice") -> httpx.Response:
    content = json.dumps({"model": "target", **body})  # NaN goes out as NaN, which Python's json reads back
    headers = {"Authorization": f"Bearer {KEYS[key]}", "content-type": "application/json"}
    return httpx.post(server.url + "/v1/verify", content=content, headers=headers, timeout=60)


def test_greedy_output_is_the_verifiers(server, models, tokenizer):
    reference = make_engine(models["target"], proposer="none")  # what `verispec generate --proposer none` runs
    for kind, depth in (("target", "auto"), ("draft", 3), ("ngram", 4), ("draft", "server")):
        edge = client(server, models, tokenizer, kind, depth=depth)
        for prompt in PROMPTS:
            expected = reference.generate(prompt, SamplingParams(max_new_tokens=40))
            assert edge.generate(prompt, max_tokens=40) == expected.text, (kind, depth, prompt)
            assert edge.last.token_ids == expected.token_ids
            assert edge.last.finish_reason == expected.finish_reason
            assert edge.last.proposed > 0
        if kind == "target":  # a draft that agrees: several tokens per round trip
            assert edge.last.round_trips <= len(edge.last.token_ids) / 3
    # No model files at the edge at all: the prompt goes as text and the server says its token ids.
    bare = client(server, models, None, "ngram", depth=4)
    expected = reference.generate(PROMPTS[4], SamplingParams(max_new_tokens=40))
    assert bare.generate(PROMPTS[4], max_tokens=40) == expected.text and bare.last.proposed > 0
    samples = server.metrics()
    assert metric(samples, "verispec:verify_client_draft_tokens_total", client="alice") > 0
    assert 0 < metric(samples, "verispec:verify_client_accepted_tokens_total", client="alice") <= metric(
        samples, "verispec:verify_client_draft_tokens_total", client="alice")
    assert metric(samples, "verispec:verify_round_trips_count") >= 15
    assert metric(samples, "verispec:verify_round_bytes_count") >= metric(samples, "verispec:verify_round_trips_sum")


def test_concurrent_sessions_and_requests_share_passes_exactly(server, models, tokenizer):
    """Edge sessions parked and running beside each other and beside ordinary requests in the
    batched passes: every output is still the verifier's own."""
    reference = make_engine(models["target"], proposer="none")
    expected = {p: reference.generate(p, SamplingParams(max_new_tokens=32)).text for p in PROMPTS[:3]}

    def edge(prompt):
        return client(server, models, tokenizer, "draft", depth=2).generate(prompt, max_tokens=32)

    def plain(prompt):
        body = {"model": "target", "prompt": prompt, "max_tokens": 32, "temperature": 0}
        response = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS['bob']}"}, timeout=60)
        return response.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # --max-running 3: all run together
        futures = {pool.submit(edge, PROMPTS[0]): PROMPTS[0], pool.submit(edge, PROMPTS[1]): PROMPTS[1],
                   pool.submit(plain, PROMPTS[2]): PROMPTS[2]}  # fmt: skip
        for future, prompt in futures.items():
            assert future.result() == expected[prompt]


def _joint(target: str, prompt: list[int], params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(output) over every output of up to two tokens (one when the first is EOS)."""
    engine = make_engine(target, proposer="none")

    def dist(context):
        return warp(engine.target.session().extend(context, last_only=True)[-1], params)

    first = dist(prompt)
    joint = {}
    for x1 in torch.nonzero(first).flatten().tolist():
        if x1 in engine.eos_ids:
            joint[(x1,)] = float(first[x1])
            continue
        second = dist(prompt + [x1])
        for x2 in torch.nonzero(second).flatten().tolist():
            joint[(x1, x2)] = float(first[x1] * second[x2])
    return joint


def _fit(outputs: list[tuple[int, ...]], joint: dict) -> float:
    cells = {out: i for i, out in enumerate(joint)}
    if any(out not in cells for out in outputs):
        return 0.0  # an impossible output
    return goodness_of_fit(torch.tensor([cells[o] for o in outputs]), torch.tensor(list(joint.values())))


def test_sampling_is_exact_in_distribution(server, models, tokenizer):
    params = SamplingParams(temperature=0.9, top_k=4, max_new_tokens=2)
    prompt = tokenizer(PROMPTS[1]).input_ids
    joint = _joint(models["target"], prompt, params)
    edge = client(server, models, tokenizer, "draft", depth=1)
    n = 400
    outputs, proposed = [], 0
    for seed in range(n):
        edge.generate(prompt, max_tokens=2, temperature=0.9, top_k=4, seed=seed)
        outputs.append(tuple(edge.last.token_ids))
        proposed += edge.last.proposed
    assert proposed >= n  # every session sent a draft
    assert _fit(outputs, joint) > ALPHA
    # Power: a client whose drafts do not come from the distribution it reports (it always sends
    # the least likely token of its support) gets them accepted at the wrong rate, and its output
    # drifts; the same test sees it. (Sending no distribution at all is exact: each draft is then
    # a point mass, just accepted less often.)
    lying = client(server, models, tokenizer, "target", depth=1)
    honest_round = lying._round

    def misreported(body, stats):
        for i, dist in enumerate(body.get("draft_probs", [])):
            body["drafts"][i] = min(zip(dist["probs"], dist["ids"], strict=True))[1]
        return honest_round(body, stats)

    lying._round = misreported
    lied = []
    for seed in range(n):
        lying.generate(prompt, max_tokens=2, temperature=0.9, top_k=4, seed=seed)
        lied.append(tuple(lying.last.token_ids))
    assert _fit(lied, joint) < ALPHA


def _open(server, tokenizer, key="alice", **extra) -> dict:
    ids = tokenizer(PROMPTS[2]).input_ids
    response = post(server, {"prompt": ids, "max_tokens": 30, "temperature": 0, "drafts": [], **extra}, key)
    assert response.status_code == 200, response.text
    return response.json()


HOSTILE = [
    ({"drafts": ["t1"]}, 400, None),
    ({"drafts": [True]}, 400, None),
    ({"drafts": [-1]}, 400, None),
    ({"drafts": [VOCAB]}, 400, None),
    ({"drafts": [1] * 17}, 400, None),
    ({"drafts": [1, 2], "draft_probs": [{"ids": [1], "probs": [1.0]}]}, 400, None),
    ({"drafts": [1], "draft_probs": [{"ids": [1, 2], "probs": [1.0]}]}, 400, None),
    ({"drafts": [1], "draft_probs": [{"ids": [2], "probs": [1.0]}]}, 400, None),
    ({"drafts": [1], "draft_probs": [{"ids": [1, 2], "probs": [0.7, 0.7]}]}, 400, None),
    ({"drafts": [1], "draft_probs": [{"ids": [1, 1], "probs": [0.5, 0.5]}]}, 400, None),
    ({"drafts": [1], "draft_probs": [{"ids": [1, 2], "probs": [float("nan"), 1.0]}]}, 400, None),
    ({"drafts": [1], "draft_probs": "dense"}, 400, None),
    ({"temperature": 0.5}, 400, None),
    ({"stream": True}, 400, None),
    ({"depth": 3}, 400, None),
    ({"position": 3}, 409, "position_mismatch"),
    ({"session_id": "vs-" + "0" * 32}, 404, "session_not_found"),
]


def test_hostile_rounds_are_refused_and_the_session_goes_on(server, models, tokenizer):
    """Sampled sessions check distributions; each refusal leaves the session where it was, and it
    then finishes with exactly the verifier's output."""
    reference = make_engine(models["target"], proposer="none").generate(PROMPTS[2], SamplingParams(max_new_tokens=30))
    opened = _open(server, tokenizer)
    assert 0 <= opened["depth_hint"] <= 16  # what pays best for the verifier next round
    session = {"session_id": opened["session_id"], "position": opened["position"]}
    sampled = _open(server, tokenizer, temperature=0.7, seed=5)
    for change, status, code in HOSTILE:
        target = sampled if "draft_probs" in change else opened
        body = {"session_id": target["session_id"], "position": target["position"], "drafts": [], **change}
        body = {k: v for k, v in body.items() if v != "dense"} | ({"draft_probs": [[0.5] * VOCAB]} if change.get("draft_probs") == "dense" else {})
        response = post(server, body)
        assert response.status_code == status, (change, response.text)
        assert response.json()["error"]["message"]
        if code:
            assert response.json()["error"]["code"] == code
    # Someone else's session does not exist for them (and does not say it exists).
    response = post(server, {**session, "drafts": []}, key="bob")
    assert response.status_code == 404 and response.json()["error"]["code"] == "session_not_found"
    # The session is untouched: it finishes as the verifier alone would.
    tokens, text = list(opened["token_ids"]), [opened["text"]]
    answer = opened
    while answer["finish_reason"] is None:
        response = post(server, {**session, "drafts": []})
        assert response.status_code == 200, response.text
        answer = response.json()
        # A round sent again (its answer lost on the way) gets the same answer, not a second round.
        again = post(server, {**session, "drafts": []})
        assert again.json() == answer
        tokens += answer["token_ids"]
        text.append(answer["text"])
        session["position"] = answer["position"]
    assert tokens == reference.token_ids and "".join(text) == reference.text
    ended = post(server, {**session, "position": answer["position"], "drafts": [1]})
    assert ended.status_code == 410 and ended.json()["error"]["code"] == "session_ended"
    post(server, {"session_id": sampled["session_id"], "close": True})
    assert "Traceback" not in server.log()


def test_sessions_hold_slots_expire_and_are_audited(server, tokenizer):
    # --max-running 3, no queue: three open sessions fill the server.
    sessions = [_open(server, tokenizer) for _ in range(3)]
    busy = httpx.post(server.url + "/v1/completions", json={"model": "target", "prompt": "t1 t2", "max_tokens": 2},
                      headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60)  # fmt: skip
    assert busy.status_code == 503 and "Retry-After" in busy.headers
    closed = post(server, {"session_id": sessions[0]["session_id"], "close": True})
    assert closed.status_code == 200 and closed.json()["finish_reason"] == "closed"
    # The other two go idle and expire; their slots free and a late round hears why.
    wait_for(lambda: metric(server.metrics(), "verispec:verify_sessions_open") == 0, what="idle sessions to expire")
    late = post(server, {"session_id": sessions[1]["session_id"], "drafts": []})
    assert late.status_code == 410 and late.json()["error"]["code"] == "session_expired"
    wait_for(lambda: metric(server.metrics(), "verispec:request_outcomes_total", outcome="expired") >= 2, what="expiries counted")
    free = httpx.post(server.url + "/v1/completions", json={"model": "target", "prompt": "t1 t2", "max_tokens": 2},
                      headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60)  # fmt: skip
    assert free.status_code == 200
    ids = {s["session_id"] for s in sessions}

    store = AuditStore(f"sqlite:///{server.audit}")

    def records():
        return [r for r in store.query() if r["endpoint"] == "/v1/verify"]

    wait_for(lambda: len(records()) >= 3, what="the sessions' audit records")
    by_outcome = {}
    for record in records():
        by_outcome.setdefault(record["outcome"], []).append(record)
    assert len(by_outcome.get("expired", [])) >= 2 and by_outcome.get("cancelled")
    finished = by_outcome.get("ok", []) + by_outcome.get("fallback", [])
    assert finished and all(r["speculation"]["edge"]["round_trips"] >= 1 and r["speculation"]["edge"]["bytes"] > 0 for r in finished)
    assert all(r["proposer"] == "edge" and r["output"] is not None for r in finished)
    assert ids  # three sessions were opened by this test


def test_an_edge_client_that_stops_early_frees_its_slot(server, models, tokenizer):
    edge = client(server, models, tokenizer, "ngram", depth=2)
    stream = edge.stream(PROMPTS[3], max_tokens=40)
    next(stream)
    assert metric(server.metrics(), "verispec:verify_sessions_open") == 1
    stream.close()  # the client closes its session
    assert metric(server.metrics(), "verispec:verify_sessions_open") == 0


def test_a_refused_round_raises_a_clear_error(server, models, tokenizer):
    edge = client(server, models, tokenizer, "ngram", key="alice")
    edge.model = "no-such-model"
    with pytest.raises(EdgeError) as caught:
        edge.generate("t1 t2", max_tokens=4)
    assert caught.value.status == 400 and "unknown model" in str(caught.value)


# -- provisional streaming ----------------------------------------------------------------------------


def sse(server, body: dict, stop_after: int | None = None) -> list[tuple[str | None, dict | str]]:
    """(event name, data) of a completions stream; with `stop_after`, hang up after that many events."""
    events = []
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "target", "stream": True, **body},
                      headers=headers, timeout=60) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append((name, data if data == "[DONE]" else json.loads(data)))
                name = None
                if stop_after is not None and len(events) >= stop_after:
                    return events
    return events


def test_provisional_drafts_come_before_their_verdicts(server):
    body = {"prompt": PROMPTS[4], "max_tokens": 40, "temperature": 0, "proposer": "draft"}
    plain = httpx.post(server.url + "/v1/completions", json={"model": "target", **body},
                       headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60).json()  # fmt: skip
    events = sse(server, {**body, "provisional": True})
    assert events[-1] == (None, "[DONE]")
    verified = "".join(d["choices"][0]["text"] for name, d in events[:-1] if name is None and d["choices"])
    assert verified == plain["choices"][0]["text"]  # the final text is exactly the verified text
    rounds = [d["round"] for name, d in events if name == "verdict"]
    assert rounds == list(range(len(rounds))) and len(rounds) >= 2  # every round's verdict, in order
    corrected = 0
    for i, (name, data) in enumerate(events):
        if name == "provisional":  # its verdict is the next named event, for the same round
            verdict = next(d for n, d in events[i + 1:] if n is not None)
            assert verdict["round"] == data["round"] and verdict["proposed"] == len(data["token_ids"])
            corrected += verdict["accepted"] < verdict["proposed"]
        if name == "verdict":  # the round's verified chunk follows its verdict
            assert events[i + 1][0] is None
    assert corrected >= 1  # the random draft is often wrong: corrections arrived too
    # The openai client, which does not ask, sees only verified chunks (no named events at all).
    assert all(name is None for name, _ in sse(server, body))


def test_provisional_needs_a_stream(server):
    response = httpx.post(server.url + "/v1/completions", json={"model": "target", "prompt": "t1", "provisional": True},
                          headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60)  # fmt: skip
    assert response.status_code == 400 and "stream" in response.json()["error"]["message"]


def test_a_provisional_client_that_leaves_frees_its_slot(server):
    cancelled = metric(server.metrics(), "verispec:request_outcomes_total", outcome="cancelled")
    body = {"prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0, "proposer": "draft", "provisional": True}
    events = sse(server, body, stop_after=2)
    assert any(name == "provisional" for name, _ in events) or len(events) == 2
    wait_for(lambda: metric(server.metrics(), "verispec:request_outcomes_total", outcome="cancelled") > cancelled,
             what="the departed stream to be cancelled")  # fmt: skip
    wait_for(lambda: metric(server.metrics(), "verispec:num_requests_running") == 0, what="its slot to free")


def test_the_edge_command(server, models):
    """`verispec edge` as a user runs it: a local draft, the remote verifier, the verifier's text."""
    expected = make_engine(models["target"], proposer="none").generate(PROMPTS[3], SamplingParams(max_new_tokens=24))
    env = {**os.environ, "VERISPEC_API_KEY": KEYS["bob"]}
    result = subprocess.run(
        [sys.executable, "-m", "verispec.cli", "edge", PROMPTS[3], "--url", server.url, "--draft", models["draft"],
         "--max-tokens", "24", "--stats"], capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"
    assert "round trips" in result.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "verispec.cli", "edge", "t1", "--url", server.url, "--model", "nope"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "unknown model" in refused.stderr and "Traceback" not in refused.stderr


def test_hostile_bytes_sizes_and_hang_ups(server, tokenizer):
    """Bad bytes and huge bodies get a clear 4xx; a client that hangs up mid-round loses nothing:
    the round runs, and sending it again gets its answer."""
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "content-type": "application/json"}
    surrogate = httpx.post(server.url + "/v1/verify", headers=headers, timeout=60,
                           content=b'{"model": "target", "prompt": "t1 \\ud800", "drafts": []}')  # fmt: skip
    assert surrogate.status_code == 400 and "surrogate" in surrogate.json()["error"]["message"]
    huge = httpx.post(server.url + "/v1/verify", headers=headers, timeout=60,
                      content=b'{"model": "target", "prompt": "' + b"t1 " * 2_000_000 + b'"}')  # fmt: skip
    assert huge.status_code == 413
    nul = post(server, {"prompt": "t1 \x00 t2", "max_tokens": 4, "temperature": 0, "drafts": []})
    assert nul.status_code == 200  # NUL is valid text, as in /v1/completions
    post(server, {"session_id": nul.json()["session_id"], "close": True})

    opened = _open(server, tokenizer)
    round_ = {"session_id": opened["session_id"], "position": opened["position"], "drafts": [1, 2]}
    with pytest.raises(httpx.TimeoutException):  # the client gives up before the answer comes
        httpx.post(server.url + "/v1/verify", json={"model": "target", **round_}, headers=headers, timeout=0.001)

    def sent_again():  # the abandoned call may still hold the round (409 round_in_flight) for a moment
        response = post(server, round_)
        return response if response.status_code != 409 else None

    answer = wait_for(sent_again, what="the abandoned round to finish")  # its answer, the round run once
    assert answer.status_code == 200, answer.text
    assert answer.json()["position"] == opened["position"] + len(answer.json()["token_ids"])
    nxt = post(server, {"session_id": opened["session_id"], "position": answer.json()["position"], "drafts": []})
    assert nxt.status_code == 200 and nxt.json()["round"] == answer.json()["round"] + 1
    post(server, {"session_id": opened["session_id"], "close": True})
    assert "Traceback" not in server.log()
