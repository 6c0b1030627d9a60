"""The two scenarios of `verispec loadtest --table`, each run on every server in turn.

prefix: a prompt A = shared prefix + tail A, then B = the same prefix + tail B; a prefix cache
serves B's prefix, so B's time to first token drops. chunked: a long prompt arrives among running
verifier-only streams; chunked prefill keeps their inter-token latency from stalling meanwhile.

Prompts of a given length in tokens are cut from the prompt set's text, measured with the server's
own tokenizer (a one-token completion reports the prompt's tokens), and shortened to fit the model's
context window once a prompt that was too long told it.
"""

from __future__ import annotations

import asyncio
import re
import statistics

from verispec.errors import UserError
from verispec.prompts import Prompt
from verispec.tools.loadtest.clients import Sample, _body, _Endpoint, _failures, _one, _percentile, _ratio

PREFIX_ROUNDS = 3  # distinct prefixes in the prefix scenario
CHUNKED_STREAMS = 3  # running streams the long prompt arrives among
CHUNKED_STREAM_TOKENS = 256
MIN_OUTSIDE_GAPS = 8  # gaps outside the long prompt's wait (all streams running) that make their median the chunked ratio's denominator
SCENARIO_TAIL_TOKENS = 8  # max_tokens of the prefix requests and of the long prompt


class _TooLong(UserError):
    def __init__(self, message: str, window: int | None):
        super().__init__(message)
        self.window = window


async def _prompt_tokens(endpoint: _Endpoint, text: str) -> int:
    """The server's count of a prompt's tokens (one verifier-only token generated)."""
    response = await endpoint.client.post("/v1/completions", json=_body(endpoint.model, text, 1, "none", stream=False))
    if response.status_code == 400 and "context_length_exceeded" in response.text:
        found = re.search(r"maximum context length is (\d+) tokens", response.text)
        if found:
            endpoint.window = int(found.group(1))
        raise _TooLong(f"a prompt was over the model's context length: {response.text[:300]}", endpoint.window)
    if response.status_code != 200:
        raise UserError(f"counting a prompt's tokens: the server answered {response.status_code}: {response.text[:300]}")
    return int(response.json()["usage"]["prompt_tokens"])


def _corpus(prompts: list[Prompt], start: int, chars: int) -> str:
    """`chars` characters of the prompt set's texts, from prompt `start` on, cycling."""
    parts, length, i = [], 0, start
    while length < chars:
        text = prompts[i % len(prompts)].text.strip("\n")
        parts.append(text)
        length += len(text) + 2
        i += 1
    return "\n\n".join(parts)[:chars]


COUNT_HEADER = "# token count\n"  # starts the texts counted: no scenario text starts so, none is primed


async def _chars_per_token(endpoint: _Endpoint, prompts: list[Prompt], tokens: int) -> float:
    """Characters per token of the prompt set's text, measured on a sample of about `tokens` tokens."""
    ratio, chars = 3.0, int(3.0 * tokens)
    for _ in range(4):
        text = COUNT_HEADER + _corpus(prompts, len(prompts) // 2, chars)
        try:
            count = await _prompt_tokens(endpoint, text)
        except _TooLong:
            if chars < 64:
                raise
            chars //= 2  # over the window: a smaller sample
            continue
        ratio = len(text) / max(count, 1)
        if abs(count - tokens) <= 0.1 * tokens:
            break
        chars = int(ratio * tokens)
    return ratio


def _fits(tokens: int, window: int | None, reserve: int) -> int:
    return tokens if window is None else max(16, min(tokens, window - reserve))


async def _scenario_text(endpoint: _Endpoint, header: str, prompts: list[Prompt], start: int, tokens: int,
                         chars_per_token: float, reserve: int) -> str:
    """A prompt of about `tokens` tokens, fewer where the model's window needs `reserve` more:
    `header`, then the prompt set's text from `start`. Counted with another header (priming no
    prefix cache) and trimmed until it fits."""
    limit = _fits(tokens, endpoint.window, reserve)
    body = _corpus(prompts, start, int(limit * chars_per_token))
    for _ in range(6):
        try:
            count = await _prompt_tokens(endpoint, COUNT_HEADER + body)
        except _TooLong:
            limit = _fits(tokens, endpoint.window, reserve)
            body = body[: min(int(limit * chars_per_token), int(len(body) * 0.8))]
            continue
        if count <= limit * 1.05 and (endpoint.window is None or count + reserve <= endpoint.window):
            break
        body = body[: int(len(body) * limit / count * 0.98)]
    return header + body


def _first_token_s(sample: Sample) -> float | None:
    """Time to the first token, also for an answer whose first token is EOS (no text)."""
    return sample.ttft_s if sample.ttft_s is not None else sample.first_chunk_s


async def prefix_scenario(endpoint: _Endpoint, prompts: list[Prompt], tokens: int, chars_per_token: float) -> dict:
    """For each of PREFIX_ROUNDS new prefixes: A = prefix + tail A, then, once A finished,
    B = prefix + tail B. B's prompt starts with what A's did: a prefix cache serves it."""
    rounds = []
    n = len(prompts)
    for i in range(PREFIX_ROUNDS):
        start = (i * max(1, n // PREFIX_ROUNDS) + 1) % n
        header = f"# shared context {i + 1} of the {endpoint.scheduler} run\n"
        prefix = await _scenario_text(endpoint, header, prompts, start, tokens, chars_per_token, 160)
        tails = [f"\n\n# request {label}\n" + prompts[(start + 5 + k) % n].text[:240] for k, label in enumerate("AB")]
        a = await _one(endpoint.client, _body(endpoint.model, prefix + tails[0], SCENARIO_TAIL_TOKENS, "none"))
        b = await _one(endpoint.client, _body(endpoint.model, prefix + tails[1], SCENARIO_TAIL_TOKENS, "none"))
        ttft_a, ttft_b = _first_token_s(a), _first_token_s(b)
        rounds.append({
            "ok": all(s.status == 200 and s.error is None for s in (a, b)) and None not in (ttft_a, ttft_b),
            "prompt_tokens_a": a.prompt_tokens, "prompt_tokens_b": b.prompt_tokens,
            "ttft_a_s": ttft_a, "ttft_b_s": ttft_b, "ttft_ratio": _ratio(ttft_a, ttft_b),
            "cached_tokens_a": a.cached_tokens, "cached_tokens_b": b.cached_tokens,
            "failures": _failures([a, b]) or None,
        })
    ratios = [r["ttft_ratio"] for r in rounds if r["ok"] and r["ttft_ratio"] is not None]
    cached = [r["cached_tokens_b"] for r in rounds if r["cached_tokens_b"] is not None]
    return {
        "scheduler": endpoint.scheduler, "ok": all(r["ok"] for r in rounds), "rounds": rounds,
        "median_ttft_ratio": statistics.median(ratios) if ratios else None,
        "median_cached_tokens_b": statistics.median(cached) if cached else None,
    }


async def chunked_scenario(endpoint: _Endpoint, prompts: list[Prompt], tokens: int, chars_per_token: float) -> dict:
    """CHUNKED_STREAMS verifier-only streams run; once each has its first token, a prompt of about
    `tokens` tokens arrives. How much does its prefill stretch the running streams' ITL?"""
    n = len(prompts)
    long_prompt = await _scenario_text(
        endpoint, f"# long document of the {endpoint.scheduler} run\n", prompts, n // 3 + 2, tokens, chars_per_token,
        SCENARIO_TAIL_TOKENS + 32,  # room for the header and the answer
    )
    started = [asyncio.Event() for _ in range(CHUNKED_STREAMS)]

    async def stream(i: int) -> Sample:
        try:
            body = _body(endpoint.model, prompts[i % n].text[:200], CHUNKED_STREAM_TOKENS, "none")
            return await _one(endpoint.client, body, on_first=started[i].set)
        finally:
            started[i].set()  # failed or finished before its first token: wait no longer

    tasks = [asyncio.create_task(stream(i)) for i in range(CHUNKED_STREAMS)]
    await asyncio.gather(*(e.wait() for e in started))
    long = await _one(endpoint.client, _body(endpoint.model, long_prompt, SCENARIO_TAIL_TOKENS, "none"))
    streams = await asyncio.gather(*tasks)
    long_ttft = _first_token_s(long)
    window = (long.sent_at, long.sent_at + long_ttft) if long_ttft is not None else None
    # The streams must still be running when the long prompt arrives, else the window is empty.
    overlapped = sum(1 for s in streams if s.chunk_times and s.sent_at + s.chunk_times[-1] > long.sent_at)
    everything = [*streams, long]
    return {
        "scheduler": endpoint.scheduler,
        "ok": all(s.status == 200 and s.error is None for s in everything) and long_ttft is not None,
        "long_prompt_tokens": long.prompt_tokens, "long_ttft_s": long_ttft,
        "streams_running_at_arrival": overlapped, "stream_tokens": [s.tokens for s in streams],
        "failures": _failures(everything) or None,
        **chunked_figures([s for s in streams if s.status == 200 and s.error is None], window),
    }


def chunked_figures(streams: list[Sample], window: tuple[float, float] | None) -> dict:
    """ITL gaps of the running streams, over the whole streams and within the window from the long
    prompt's send to its first token (absolute perf_counter times): a gap falls in it when it
    overlaps it. The headline: p99 of the window's gaps over the median of the gaps outside it
    while every stream still ran (as many rows a pass as in the window: once a stream has ended
    the others' passes are cheaper, and the ratio moved with when they ended, 3.0-4.1x for one
    schedule), or of all gaps where fewer than MIN_OUTSIDE_GAPS are left (a window that covers the
    streams nearly whole left a few near-zero gaps outside, and the ratio read 564x)."""
    every, inside, outside = [], [], []
    ends = [s.sent_at + s.chunk_times[-1] for s in streams if s.chunk_times]
    together = min(ends, default=0.0)  # until the first stream ended, all ran
    for s in streams:
        times = [s.sent_at + t for t in s.chunk_times]
        for a, b in zip(times, times[1:], strict=False):
            every.append(b - a)
            if window is not None and a < window[1] and b > window[0]:
                inside.append(b - a)
            elif b <= together:
                outside.append(b - a)
    median_all, p99_all = _percentile(every, 50), _percentile(every, 99)
    median_out = _percentile(outside, 50) if len(outside) >= MIN_OUTSIDE_GAPS else median_all
    p99_in = _percentile(inside, 99)
    return {
        "gaps": len(every), "window_gaps": len(inside), "outside_gaps": len(outside),
        "window_s": None if window is None else window[1] - window[0],
        "itl_median_s": median_all, "itl_p99_s": p99_all,
        "window_itl_median_s": _percentile(inside, 50), "window_itl_p99_s": p99_in,
        "outside_itl_median_s": median_out,
        "stream_p99_over_median": _ratio(p99_all, median_all),
        "window_p99_over_median": _ratio(p99_in, median_out),
    }
