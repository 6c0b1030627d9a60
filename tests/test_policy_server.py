"""The policy gate in the server, over real HTTP: blocked text never reaches the client, the logs or
the audit store, however the tokens and the held-back chunks fall; the counter and the audit
records agree. Also the two operator metrics this server exports beside it: mismatch latency and
cold start."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import make_engine
from tests.serving import ServerProcess, metric, wait_for
from tests.test_batching import exact_pair
from verispec.audit.store import AuditStore
from verispec.config import SamplingParams
from verispec.models.kernels import kernel_library
from verispec.policy import load_policy

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no C compiler or no AVX2/FMA/F16C here")

PROMPTS = [" ".join(f"t{(i * 11 + j * 5) % 90 + 1}" for j in range(4 + 3 * i)) for i in range(5)]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Models, the verifier's own greedy outputs, and rules aimed at them: a term across a token
    boundary, a long regex whose hold-back spans several rounds, a flag rule, and a term that starts
    in a prompt and ends in its output."""
    root = tmp_path_factory.mktemp("policy")
    target, draft = exact_pair(root, seed=31).values()
    engine = make_engine(target, proposer="none")
    outputs = [engine.generate(p, SamplingParams(max_new_tokens=MAX_TOKENS)).text for p in PROMPTS]
    words = [o.split() for o in outputs]
    assert all(len(w) >= 20 for w in words), outputs
    # prompt 0: a term that starts inside one token and ends inside the next ("1 t3" in " t61 t38")
    boundary = words[0][8][1:] + " " + words[0][9][:2]
    # prompt 1: a regex over five words in a row: its 40-character hold-back spans several rounds
    phrase = " ".join(words[1][10:15])
    # prompt 2: a flagged word, let through
    flagged = words[2][5]
    # prompt 4: the prompt's last two characters and the output's first two (the output goes on
    # right after the prompt), so the term is whole only with the prompt's end
    across = PROMPTS[4][-2:] + outputs[4][:2]
    rules = {
        "rules": [
            {"name": "boundary-term", "terms": [boundary], "case_sensitive": True, "action": "block"},
            {"name": "long-phrase", "regex": phrase.replace(" ", r"\s+"), "max_length": 40, "action": "block"},
            {"name": "flag-word", "terms": [flagged], "action": "flag"},
            {"name": "prompt-term", "terms": [across], "case_sensitive": True, "action": "block"},
        ]
    }
    for prompt in PROMPTS:
        assert boundary not in prompt and phrase not in prompt
    path = root / "rules.yaml"
    path.write_text(json.dumps(rules))  # YAML is a superset of JSON
    policy = load_policy(path)
    for prompt, output in zip(PROMPTS[:4], outputs[:4], strict=True):  # the prompt-term blocks prompt 4 only
        with_prompt, alone = policy.gate(context=prompt), policy.gate()
        assert with_prompt.feed(output) + with_prompt.finish() == alone.feed(output) + alone.finish()
    assert all(across not in text for text in PROMPTS + outputs), across
    return {"target": target, "draft": draft, "outputs": outputs, "rules": path, "boundary": boundary, "phrase": phrase,
            "flagged": flagged, "audit": root / "audit.db"}  # fmt: skip


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    proc = ServerProcess(
        ["--target", setup["target"], "--draft", setup["draft"], "--depth", "3", "--policy", str(setup["rules"]),
         "--audit-url", f"sqlite:///{setup['audit']}", "--audit-content", "--log-content",
         "--max-new-tokens", str(MAX_TOKENS), "--breaker-min-acceptance", "0"],  # the random draft keeps drafting
        log_dir=tmp_path_factory.mktemp("logs"),
    ).wait_ready()  # fmt: skip
    yield proc
    proc.stop_gracefully()


def complete(server, prompt: str, stream: bool = False, **extra) -> tuple[str, str]:
    """(text, finish_reason) as a client receives them."""
    body = {"model": "target", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    if not stream:
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    text, finish = [], None
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return "".join(text), finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case, rule", [(0, "boundary"), (1, "phrase")])
def test_blocked_text_never_reaches_the_client(server, setup, stream, case, rule):
    full, term = setup["outputs"][case], setup[rule]
    text, finish = complete(server, PROMPTS[case], stream=stream)
    assert finish == "content_filter"
    assert text == full[: full.index(term)]  # everything before the match, nothing of it


@pytest.mark.parametrize("stream", [False, True])
def test_a_term_begun_in_the_prompt_blocks_the_output_from_its_start(server, stream):
    """The gate sees the prompt's end: the term's first half is there, its second half is the
    output's first word, so nothing of the output goes out."""
    assert complete(server, PROMPTS[4], stream=stream) == ("", "content_filter")


def test_a_stop_string_that_cuts_the_term_short_ends_normally(server, setup):
    full, term = setup["outputs"][0], setup["boundary"]
    cut = term.split(" ")[1]  # the term's second half: the stop string ends the text before it completes
    text, finish = complete(server, PROMPTS[0], stop=[" " + cut])
    assert finish == "stop" and term not in text and text == full[: full.index(" " + cut)]
    # A stop string right after the term leaves the term in the text: blocked.
    after = full[full.index(term) + len(term):].split(" ")[1]
    text, finish = complete(server, PROMPTS[0], stream=True, stop=[" " + after])
    assert finish == "content_filter" and term not in text


def test_flagged_text_goes_through_and_is_counted(server, setup):
    text, finish = complete(server, PROMPTS[2])
    assert text == setup["outputs"][2] and finish in ("stop", "length")
    assert metric(server.metrics(), "verispec:policy_violations_total", rule="flag-word", action="flag") >= 1


def assert_provisional_and_verify_refused(server) -> None:
    response = httpx.post(server.url + "/v1/completions", json={"model": "target", "prompt": "t1", "stream": True, "provisional": True}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "policy_forbids_provisional"
    response = httpx.post(server.url + "/v1/verify", json={"model": "target", "prompt": "t1", "drafts": []}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "policy_forbids_verify"


def test_provisional_and_verify_are_refused_under_a_hold_back(server):
    assert_provisional_and_verify_refused(server)


@pytest.fixture(scope="module")
def unheld_server(setup, tmp_path_factory):
    """A policy that blocks but holds nothing back: a one-character term (hold-back 0)."""
    path = tmp_path_factory.mktemp("unheld") / "rules.yaml"
    path.write_text(json.dumps({"rules": [{"name": "one-char", "terms": ["~"], "action": "block"}]}))
    proc = ServerProcess(
        ["--target", setup["target"], "--draft", setup["draft"], "--depth", "3", "--policy", str(path),
         "--max-new-tokens", str(MAX_TOKENS)],
        log_dir=tmp_path_factory.mktemp("logs"),
    ).wait_ready()  # fmt: skip
    proc.policy = path
    yield proc
    proc.stop_gracefully()


def test_provisional_and_verify_are_refused_under_any_blocking_rule(unheld_server):
    """Drafts shown before the gate has seen them, or a verify round's accepted count, would confirm
    a blocked continuation even where the policy holds nothing back."""
    assert load_policy(unheld_server.policy).hold_back == 0
    assert_provisional_and_verify_refused(unheld_server)


@pytest.mark.parametrize("stream", [False, True])
def test_a_blocked_response_counts_only_the_tokens_it_sent(server, setup, stream):
    full, term = setup["outputs"][0], setup["boundary"]
    released = full[: full.index(term)]
    # Word-level tokens: a word cut by the match was not sent whole, so it is not counted.
    whole = len(released.split()) - (0 if released.endswith(" ") or full[len(released)] == " " else 1)
    body = {"model": "target", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
    if stream:
        usage = None
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:  # fmt: skip
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:]).get("usage"):
                    usage = json.loads(line[6:])["usage"]
    else:
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["finish_reason"] == "content_filter"
        usage = answer["usage"]
    assert usage["completion_tokens"] == whole, (released, usage)


def test_logs_audit_and_counter_agree_and_hold_nothing_blocked(server, setup):
    complete(server, PROMPTS[0])  # at least one block of each rule, whatever ran before
    complete(server, PROMPTS[1], stream=True)
    store = AuditStore(f"sqlite:///{setup['audit']}")
    samples = server.metrics()
    blocked = {rule: metric(samples, "verispec:policy_violations_total", rule=rule, action="block") for rule in ("boundary-term", "long-phrase")}

    def recorded():
        counts = {rule: 0 for rule in blocked}
        for record in store.query(outcome="content_filter"):
            for finding in record["policy"] or []:
                if finding["action"] == "block" and finding["rule"] in counts:
                    counts[finding["rule"]] += 1
        return counts

    wait_for(lambda: recorded() == blocked, what="audit records to match the counter")
    records = store.query(outcome="content_filter")
    assert all(r["finish_reason"] == "content_filter" and r["output"] is not None for r in records)
    for record in records:
        finding = record["policy"][0]
        assert len(record["output"]) == finding["position"]  # the record keeps what was sent, up to the match
        assert setup["boundary"] not in record["output"] and setup["phrase"] not in record["output"]
    log = server.log()
    assert setup["boundary"] not in log and setup["phrase"] not in log
    assert '"policy_rule": "boundary-term"' in log  # the log line names the rule, not the text


def test_mismatch_latency_and_cold_start_are_exported(server):
    body = {"model": "target", "prompt": PROMPTS[3], "max_tokens": MAX_TOKENS, "temperature": 0, "speculation_stats": True}
    stats = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["speculation_stats"]
    assert stats["rejected"] > 0 and stats["mismatch_ms"] > 0  # the random draft is mostly wrong, and that cost time
    samples = server.metrics()
    assert metric(samples, "verispec:mismatch_latency_seconds_count") >= 1
    assert metric(samples, "verispec:mismatch_latency_seconds_sum") > 0
    started = metric(samples, "verispec:process_start_time_seconds")
    ready = metric(samples, "verispec:startup_ready_seconds")
    first = metric(samples, "verispec:startup_first_request_seconds")
    assert time.time() - 600 < started < time.time()
    assert 0 < ready <= first < time.time() - started + 1
