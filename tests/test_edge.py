"""Two-stage patterns over real HTTP, on one server.

The verify API and the edge client: an edge proposer gets exactly the verifier's greedy output and
samples its distribution; hostile rounds get a clear 4xx and leave the session as it was; parked
sessions hold no slot, so one key's sessions never starve another key's requests; a key's open
sessions are capped; sessions expire when idle and leave whole audit records however they end;
openings are safe to retry.

Provisional streaming: drafts arrive before their verdict, in order, and the verified chunks are
exactly the verified-only response; a client that leaves mid-stream frees its slot."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
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
         "--max-running", "3", "--max-waiting", "0", "--verify-max-sessions", "3",
         "--breaker-min-acceptance", "0",  # the random draft keeps drafting, whatever ran before
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


def post(server, body: dict, key: str = "alice", **headers) -> httpx.Response:
    content = json.dumps({"model": "target", **body})  # NaN goes out as NaN, which Python's json reads back
    headers = {"Authorization": f"Bearer {KEYS[key]}", "content-type": "application/json", **headers}
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
    # a point mass, just accepted less often.) That holds for the rejection rule, which reads the
    # reported distributions; the default coupled rule never reads them, so no lie can bias it.
    lying = client(server, models, tokenizer, "target", depth=1)
    honest_round = lying._round

    def misreported(body, stats):
        body["sampled_acceptance"] = "rejection"
        for i, dist in enumerate(body.get("draft_probs", [])):
            body["drafts"][i] = min(zip(dist["probs"], dist["ids"], strict=True))[1]
        return honest_round(body, stats)

    lying._round = misreported
    lied = []
    for seed in range(n):
        lying.generate(prompt, max_tokens=2, temperature=0.9, top_k=4, seed=seed)
        lied.append(tuple(lying.last.token_ids))
    assert _fit(lied, joint) < ALPHA


def test_rounds_carry_the_verifiers_logprobs_whatever_the_drafts(server, tokenizer):
    """A session opened with `logprobs` gets each round's tokens' logprobs, as completions give them:
    the same whether the tokens came one per round or as accepted drafts, and the same as
    /v1/completions' for the prompt."""
    ids = tokenizer(PROMPTS[1]).input_ids
    opening = {"prompt": ids, "max_tokens": 12, "temperature": 0, "logprobs": 2}

    def session(chunk: int, known: list[int]) -> tuple[list[int], list[float], list[str]]:
        answer = post(server, {**opening, "drafts": known[:chunk]}).json()
        tokens, logprobs, texts = [], [], []
        while True:
            tokens += answer["token_ids"]
            logprobs += answer["logprobs"]["token_logprobs"]
            texts += answer["logprobs"]["tokens"]
            assert all(len(top) <= 2 for top in answer["logprobs"]["top_logprobs"])
            if answer["finish_reason"] is not None:
                return tokens, logprobs, texts
            drafts = known[len(tokens) : len(tokens) + chunk]
            answer = post(server, {"session_id": answer["session_id"], "position": answer["position"], "drafts": drafts}).json()

    one_by_one = session(0, [])
    drafted = session(4, one_by_one[0])
    assert drafted[0] == one_by_one[0] and drafted[2] == one_by_one[2]
    assert drafted[1] == pytest.approx(one_by_one[1], abs=1e-5)
    body = {"model": "target", "prompt": ids, "max_tokens": 12, "temperature": 0, "logprobs": 2}
    completion = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60)
    reference = completion.json()["choices"][0]["logprobs"]
    assert reference["tokens"] == one_by_one[2] and reference["token_logprobs"] == pytest.approx(one_by_one[1], abs=1e-5)
    for bad in (21, -1, True, "2"):  # out of range, or not an integer
        refused = post(server, {**opening, "drafts": [], "logprobs": bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs", refused.text
    again = post(server, {"session_id": "vs-none", "position": 3, "drafts": [], "logprobs": 1})
    assert again.status_code == 400 and again.json()["error"]["param"] == "logprobs"  # fixed when the session opens


def _open(server, tokenizer, key="alice", headers=None, **extra) -> dict:
    ids = tokenizer(PROMPTS[2]).input_ids
    response = post(server, {"prompt": ids, "max_tokens": 30, "temperature": 0, "drafts": [], **extra}, key, **(headers or {}))
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def strict_server(models, tmp_path_factory):
    """Rate limits of 3 requests a minute per key, and no client-reported distributions."""
    proc = ServerProcess(
        ["--target", models["target"], "--proposers", "none", "--rate-limit-rpm", "3", "--no-verify-client-probs",
         "--max-new-tokens", "16"],
        log_dir=tmp_path_factory.mktemp("logs"),
        env={"VERISPEC_API_KEYS": ",".join(f"{k}:{v}" for k, v in KEYS.items())},
    ).wait_ready()  # fmt: skip
    yield proc
    proc.stop_gracefully()


def test_rounds_count_against_the_keys_rate_limit(strict_server, tokenizer):
    """An open session is no way around the key's limits: each round is a request of its key."""
    opened = _open(strict_server, tokenizer, key="bob")  # 1 of 3
    rounds = [post(strict_server, {"session_id": opened["session_id"], "drafts": []}, key="bob") for _ in range(3)]
    assert [r.status_code for r in rounds] == [200, 200, 429], [r.text for r in rounds]
    assert rounds[-1].json()["error"]["code"] == "rate_limit_exceeded" and "Retry-After" in rounds[-1].headers
    assert rounds[1].headers["x-ratelimit-remaining-requests"] == "0"
    other = _open(strict_server, tokenizer, key="alice")  # another key is untouched (this test's 1 of its 3)
    assert post(strict_server, {"session_id": other["session_id"], "close": True}).status_code == 200


def test_client_reported_distributions_can_be_refused(strict_server, tokenizer):
    """--no-verify-client-probs: a sampled round's draft_probs are refused unless each is a point
    mass on its draft (exact whatever the client does); drafts sent without them are taken."""
    sampled = _open(strict_server, tokenizer, temperature=0.9, seed=3)
    session = {"session_id": sampled["session_id"]}
    spread = post(strict_server, {**session, "drafts": [5], "draft_probs": [{"ids": [5, 6], "probs": [0.5, 0.5]}]})
    assert spread.status_code == 400 and spread.json()["error"]["code"] == "client_probs_refused"
    assert "--no-verify-client-probs" in spread.json()["error"]["message"]
    point = post(strict_server, {**session, "drafts": [5], "draft_probs": [{"ids": [5], "probs": [1.0]}]})
    assert point.status_code == 200, point.text
    if point.json()["finish_reason"] is None:
        assert post(strict_server, {**session, "close": True}).status_code == 200


def test_a_record_says_when_acceptance_rested_on_client_reported_distributions(server, tokenizer):
    """A client's distributions are its word: the session's record says its rounds relied on them,
    and a session whose drafts came without any says nothing of the kind."""
    ids = tokenizer(PROMPTS[1]).input_ids
    opened = {}
    for name, probs in (("reported", [{"ids": [5, 6], "probs": [0.5, 0.5]}]), ("point", None)):
        body = {"prompt": ids, "max_tokens": 8, "temperature": 0.9, "seed": 1, "drafts": [5]}
        if probs:
            body["draft_probs"] = probs
        answer = post(server, body, **{"x-request-id": f"probs-{name}"})
        assert answer.status_code == 200, answer.text
        opened[name] = answer.json()
        if opened[name]["finish_reason"] is None:
            assert post(server, {"session_id": opened[name]["session_id"], "close": True}).status_code == 200
    store = AuditStore(f"sqlite:///{server.audit}")

    def records():
        return {r["request_id"]: r for r in store.query() if r["request_id"].startswith("probs-")}

    wait_for(lambda: len(records()) == 2, what="the two sessions' records")
    edge = {name: records()[f"probs-{name}"]["speculation"]["edge"] for name in opened}
    assert edge["reported"]["acceptance"] == "client_reported_probs" and edge["reported"]["client_prob_rounds"] == 1
    assert "acceptance" not in edge["point"]


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
    fixed = post(server, {**session, "temperature": 0.5, "top_k": 2, "drafts": []}).json()["error"]["message"]
    assert fixed.startswith("temperature, top_k are fixed when a session opens")
    fixed = post(server, {**session, "temperature": 0.5, "drafts": []}).json()["error"]["message"]
    assert fixed.startswith("temperature is fixed when a session opens")
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


def test_parked_sessions_hold_no_slot_so_another_key_is_served(server, tokenizer):
    """Bob opens as many sessions as --max-running (3, and no queue) and keeps them alive with
    empty rounds; parked between rounds they hold no slot, so Alice's requests run at once. A
    fourth session of Bob's is refused (--verify-max-sessions 3); Alice may still open hers."""
    sessions = [_open(server, tokenizer, key="bob") for _ in range(3)]
    body = {"model": "target", "prompt": "t1 t2", "max_tokens": 8, "temperature": 0}
    alice = {"Authorization": f"Bearer {KEYS['alice']}"}
    for _ in range(2):
        served = httpx.post(server.url + "/v1/completions", json=body, headers=alice, timeout=60)
        assert served.status_code == 200, served.text
        for session in sessions:  # keep-alive rounds
            answer = post(server, {"session_id": session["session_id"], "drafts": []}, key="bob")
            assert answer.status_code == 200, answer.text
    refused = post(server, {"prompt": "t1 t2", "max_tokens": 4, "drafts": []}, key="bob")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_sessions"
    assert "--verify-max-sessions" in refused.json()["error"]["message"]
    mine = _open(server, tokenizer, key="alice")
    for session, key in [(mine, "alice"), *((s, "bob") for s in sessions)]:
        assert post(server, {"session_id": session["session_id"], "close": True}, key=key).status_code == 200
    assert _open(server, tokenizer, key="bob", close=True)["session_id"]  # a closed one frees its place


def test_sessions_expire_and_leave_whole_records(server, tokenizer):
    """Closed and expired sessions are recorded like finished ones: prompt and completion tokens
    (those the client received), speculation statistics and round trips."""
    opened = {why: _open(server, tokenizer, headers={"x-request-id": f"edge-{why}-{i}"}) for i, why in enumerate(("closed", "expired"))}
    received = {why: len(o["token_ids"]) for why, o in opened.items()}
    for why, session in opened.items():
        answer = post(server, {"session_id": session["session_id"], "drafts": [1, 2]}).json()
        received[why] += len(answer["token_ids"])
    closed = post(server, {"session_id": opened["closed"]["session_id"], "close": True})
    assert closed.status_code == 200 and closed.json()["finish_reason"] == "closed"
    # The other goes idle and expires; a late round hears why.
    wait_for(lambda: metric(server.metrics(), "verispec:verify_sessions_open") == 0, what="the idle session to expire")
    late = post(server, {"session_id": opened["expired"]["session_id"], "drafts": []})
    assert late.status_code == 410 and late.json()["error"]["code"] == "session_expired"
    free = httpx.post(server.url + "/v1/completions", json={"model": "target", "prompt": "t1 t2", "max_tokens": 2},
                      headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60)  # fmt: skip
    assert free.status_code == 200

    store = AuditStore(f"sqlite:///{server.audit}")

    def records():
        return {r["request_id"]: r for r in store.query() if r["request_id"].startswith("edge-")}

    wait_for(lambda: len(records()) >= 2, what="the sessions' audit records")
    prompt = len(tokenizer(PROMPTS[2]).input_ids)
    for why, outcome in (("closed", "cancelled"), ("expired", "expired")):
        record = next(r for request_id, r in records().items() if request_id.startswith(f"edge-{why}-"))
        assert record["outcome"] == outcome, record
        assert record["prompt_tokens"] == prompt and record["completion_tokens"] == received[why] >= 2
        assert record["output"] and record["speculation"]["proposer"] == "edge"
        assert record["speculation"]["proposed"] == 2 and record["speculation"]["verifier_calls"] == 2
        assert record["speculation"]["edge"]["round_trips"] == 2 and record["speculation"]["edge"]["bytes"] > 0


def test_an_opening_sent_again_gets_its_session_back(server, tokenizer):
    """An opening whose answer was lost, sent again with the same Idempotency-Key, gets the same
    session (no second one holds a place); another body under that key is refused."""
    key = {"Idempotency-Key": "open-once-1"}
    first = _open(server, tokenizer, headers=key)
    again = _open(server, tokenizer, headers=key)
    assert again == first
    assert metric(server.metrics(), "verispec:verify_sessions_open") == 1
    other = post(server, {"prompt": "t1 t2", "max_tokens": 4, "drafts": []}, **key)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    same_key_elsewhere = _open(server, tokenizer, key="bob", headers=key)  # keys are per API key
    assert same_key_elsewhere["session_id"] != first["session_id"]
    for session, who in ((first, "alice"), (same_key_elsewhere, "bob")):
        assert post(server, {"session_id": session["session_id"], "close": True}, key=who).status_code == 200


def test_an_opening_that_closes_answers_its_round_and_leaves_nothing_open(server, tokenizer):
    answer = _open(server, tokenizer, close=True)
    assert answer["token_ids"] and answer["finish_reason"] is None
    assert metric(server.metrics(), "verispec:verify_sessions_open") == 0
    late = post(server, {"session_id": answer["session_id"], "drafts": []})
    assert late.status_code == 410 and late.json()["error"]["code"] == "session_ended"


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

    opening = {"prompt": "t1 t2", "max_tokens": 4, "temperature": 0, "drafts": []}
    several = post(server, {**opening, "n": 2})
    assert several.status_code == 400 and several.json()["error"]["param"] == "n", several.text
    for bad in ("k" * 129, "a\tb"):  # an Idempotency-Key too long, or not printable
        refused = post(server, opening, **{"Idempotency-Key": bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "idempotency-key", refused.text
    assert metric(server.metrics(), "verispec:verify_sessions_open") == 0

    opened = _open(server, tokenizer)
    round_ = {"session_id": opened["session_id"], "position": opened["position"], "drafts": [1, 2]}
    # The client sends the round and hangs up before the answer comes (a raw socket: however fast
    # the server answers, nobody reads it).
    payload = json.dumps({"model": "target", **round_}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "content-length": len(payload), "host": "x"}.items())
    with socket.create_connection(("127.0.0.1", server.port)) as hang_up:
        hang_up.sendall(f"POST /v1/verify HTTP/1.1\r\n{head}\r\n".encode() + payload)

    def sent_again():  # the abandoned call may still hold the round (409 round_in_flight) for a moment
        response = post(server, round_)
        return response if response.status_code != 409 else None

    answer = wait_for(sent_again, what="the abandoned round to finish")  # its answer, the round run once
    assert answer.status_code == 200, answer.text
    assert answer.json()["position"] == opened["position"] + len(answer.json()["token_ids"])
    keyed = post(server, {**round_, "position": answer.json()["position"], "drafts": []}, **{"Idempotency-Key": "k1"})
    assert keyed.status_code == 400 and "Idempotency-Key is for openings" in keyed.json()["error"]["message"]
    nxt = post(server, {"session_id": opened["session_id"], "position": answer.json()["position"], "drafts": []})
    assert nxt.status_code == 200 and nxt.json()["round"] == answer.json()["round"] + 1
    post(server, {"session_id": opened["session_id"], "close": True})
    assert "Traceback" not in server.log()
