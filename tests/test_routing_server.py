"""Per-request proposer choice and a canary rollback, over HTTP against real server processes."""

from __future__ import annotations

import httpx
import pytest

from tests.serving import ServerProcess, metric
from tests.test_server import LONG_PROMPT, PROMPTS, cli_generate


@pytest.fixture(scope="module")
def routed(tiny_models, tmp_path_factory):
    proc = ServerProcess(
        ["--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"], "--proposers", "draft,ngram,none",
         "--route-key", "task", "--depth", "3"],
        log_dir=tmp_path_factory.mktemp("logs"),
    ).wait_ready()
    yield proc
    proc.stop_gracefully()


def test_every_proposer_gets_tried_and_output_stays_exact(routed, tiny_models):
    expected = {p: cli_generate(tiny_models["llama"], tiny_models["llama-draft"], p, 16, "--depth", "0") for p in PROMPTS}
    for i in range(12):
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": "llama", "prompt": prompt, "max_tokens": 16, "temperature": 0, "task": "code"}
        response = httpx.post(routed.url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected[prompt]
    samples = routed.metrics()
    for name in ("draft", "ngram", "none"):
        assert metric(samples, "verispec:proposer_requests_total", proposer=name) >= 3
        assert metric(samples, "verispec:proposer_throughput_tokens_per_second", proposer=name) > 0


def test_a_request_can_pin_its_proposer(routed, tiny_models):
    prompt = PROMPTS[1]
    expected = cli_generate(tiny_models["llama"], tiny_models["llama-draft"], prompt, 16, "--depth", "0")
    before = routed.metrics()
    for _ in range(3):
        body = {"model": "llama", "prompt": prompt, "max_tokens": 16, "temperature": 0, "task": "code", "proposer": "ngram",
                "speculation_stats": True}
        response = httpx.post(routed.url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected
        assert response.json()["speculation_stats"]["proposer"] == "ngram"
    after = routed.metrics()
    requests = "verispec:proposer_requests_total"
    assert metric(after, requests, proposer="ngram") == metric(before, requests, proposer="ngram") + 3
    for name in ("draft", "none"):
        assert metric(after, requests, proposer=name) == metric(before, requests, proposer=name)
    throughput = "verispec:proposer_throughput_tokens_per_second"
    for name in ("draft", "ngram", "none"):  # pinned requests teach the choice nothing
        assert metric(after, throughput, proposer=name) == metric(before, throughput, proposer=name)
    response = httpx.post(routed.url + "/v1/completions", json={"model": "llama", "prompt": prompt, "proposer": "medusa"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "proposer" and "draft, ngram, none" in error["message"]


def test_a_bad_canary_is_rolled_back(tiny_models, tmp_path):
    # Current: the target drafting for itself (every draft accepted). Candidate: a GPT-2 of the same
    # vocabulary that knows nothing of the target (drafts almost never accepted). The breaker is set
    # to trip on a few bad rounds: the candidate is the canary's to judge, so its rounds must neither
    # trip the breaker for the proposer in service nor be turned off by it before the verdict.
    proc = ServerProcess(
        ["--target", tiny_models["llama"], "--draft", tiny_models["llama"], "--canary-draft", tiny_models["gpt2"],
         "--canary-fraction", "0.5", "--canary-min-requests", "6", "--depth", "3",
         "--breaker-window", "8", "--breaker-min-acceptance", "0.5"],
        log_dir=tmp_path,
    ).wait_ready()
    try:
        for _ in range(80):
            body = {"model": "llama", "prompt": LONG_PROMPT, "max_tokens": 12, "temperature": 0}
            assert httpx.post(proc.url + "/v1/completions", json=body, timeout=60).status_code == 200
            if metric(proc.metrics(), "verispec:canary_state") != 1:
                break
        samples = proc.metrics()
        assert metric(samples, "verispec:canary_state") == 3  # rolled back
        assert metric(samples, "verispec:breaker_state") == 0  # closed all along
        assert metric(samples, "verispec:canary_decisions_total", decision="rollback") == 1
        assert metric(samples, "verispec:canary_acceptance_rate", arm="current") > metric(samples, "verispec:canary_acceptance_rate", arm="candidate")
        assert "canary rollback" in proc.log()
        served_before = metric(samples, "verispec:proposer_requests_total", proposer="canary")
        for _ in range(5):
            httpx.post(proc.url + "/v1/completions", json={"model": "llama", "prompt": "t1 t2", "max_tokens": 4}, timeout=60)
        assert metric(proc.metrics(), "verispec:proposer_requests_total", proposer="canary") == served_before  # no more traffic
    finally:
        proc.stop_gracefully()
