"""The batched server over real HTTP: concurrent requests share verifier passes and get exactly
what they get alone; a shared prefix is served from the cache; a hung proposer holds nothing."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.serving import ServerProcess, metric
from tests.test_batching import exact_pair
from verispec.models.kernels import kernel_library

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no C compiler or no AVX2/FMA/F16C here")

PROMPTS = [" ".join(f"t{(i * 5 + j * 7) % 90 + 1}" for j in range(3 + 4 * i)) for i in range(8)]


@pytest.fixture(scope="module")
def exact_models(tmp_path_factory) -> dict[str, str]:
    return exact_pair(tmp_path_factory.mktemp("exact-models"), seed=21)


@pytest.fixture(scope="module")
def server(exact_models, tmp_path_factory):
    proc = ServerProcess(
        ["--target", exact_models["target"], "--draft", exact_models["draft"], "--proposers", "none,draft,ngram",
         "--max-running", "8", "--log-level", "info", "--audit-url", "none"],
        log_dir=tmp_path_factory.mktemp("logs"),
    ).wait_ready()  # fmt: skip
    yield proc
    proc.stop_gracefully()


def complete(url: str, prompt: str, proposer: str, max_tokens: int = 24) -> dict:
    body = {"model": "target", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "proposer": proposer}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_concurrent_requests_get_what_they_get_alone(server):
    assert "scheduler: batched" in server.log()
    jobs = [(p, ["none", "draft", "ngram"][i % 3]) for i, p in enumerate(PROMPTS)]
    alone = [complete(server.url, p, kind)["choices"][0]["text"] for p, kind in jobs]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: complete(server.url, *job)["choices"][0]["text"], jobs * 2))
    assert together == alone * 2
    # greedy: every proposer gives the verifier's own output
    assert {complete(server.url, PROMPTS[5], kind)["choices"][0]["text"] for kind in ("none", "draft", "ngram")} == {alone[5]}


def test_a_shared_prefix_comes_from_the_cache(server):
    prefix = " ".join(f"t{(j * 13) % 90 + 1}" for j in range(80))
    first = complete(server.url, prefix + " t1 t2", "none", max_tokens=4)
    second = complete(server.url, prefix + " t3", "none", max_tokens=4)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
    samples = server.metrics()
    assert metric(samples, "verispec:prefix_cache_hits_total") >= 64
    assert metric(samples, "verispec:prefix_cache_queries_total") >= metric(samples, "verispec:prefix_cache_hits_total")
    assert "verispec:kv_cache_usage_perc" in "".join(samples)


def test_a_repeating_text_drafts_its_repeats_and_stays_exact(server):
    loop = " ".join(["t3 t14 t15 t9 t26 t5"] * 4)  # the prompt repeats itself: its rounds draft the repeat
    before = metric(server.metrics(), "verispec:repeat_rounds_total")
    kinds = ("none", "draft", "ngram")
    texts = {complete(server.url, loop, kind, max_tokens=32)["choices"][0]["text"] for kind in kinds}
    assert len(texts) == 1  # the verifier's own output, whoever drafted
    assert metric(server.metrics(), "verispec:repeat_rounds_total") > before


def test_a_hung_proposer_holds_no_pass(exact_models, tmp_path):
    """Every proposal of this server blocks for good: requests still complete, verifier-only and
    exact, /healthz answers meanwhile, and the proposer is asked once per request."""
    reference = ServerProcess(
        ["--target", exact_models["target"], "--proposer", "none", "--audit-url", "none"], log_dir=tmp_path
    ).wait_ready()
    try:
        expected = [complete(reference.url, p, "none")["choices"][0]["text"] for p in PROMPTS[:4]]
    finally:
        reference.stop()
    proc = ServerProcess(
        ["hang", "--target", exact_models["target"], "--draft", exact_models["draft"], "--depth", "3",
         "--proposer-timeout-s", "0.2", "--breaker-min-acceptance", "0", "--audit-url", "none"],
        module="tests.faulty_server", log_dir=tmp_path,
    ).wait_ready()  # fmt: skip
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(complete, proc.url, p, "draft") for p in PROMPTS[:4]]
            assert httpx.get(proc.url + "/healthz", timeout=5).status_code == 200
            texts = [f.result(timeout=120)["choices"][0]["text"] for f in futures]
        assert texts == expected
        assert metric(proc.metrics(), "verispec:fallback_rounds_total") >= 4
    finally:
        proc.stop()
