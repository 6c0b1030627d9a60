"""The concurrent streaming clients of `verispec loadtest`, and what they measure.

Each request is one streaming completion, recorded as its user sees it (`Sample`): time to first
token, the arrival of every text chunk (the inter-token latencies), tokens, the HTTP status, and
with `provisional` the time to the first draft. `summarize` turns a run's samples into its figures.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx

from verispec.errors import UserError
from verispec.prompts import Prompt


@dataclass
class Sample:
    status: int  # HTTP status; 0 when the connection failed
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    error: str | None = None  # an in-band stream error's code
    # Arrival of each chunk that carries text, in seconds since the request was sent: the gaps
    # between consecutive ones are the inter-token latencies a user sees.
    chunk_times: list[float] = field(default_factory=list)
    sent_at: float = 0.0  # time.perf_counter() when the request was sent (to line streams up)
    prompt_tokens: int | None = None  # from usage, when the server sent it
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when sent
    detail: str | None = None  # the start of a non-200 answer's body
    # The first chunk with a choice, text or not (an answer that starts with EOS has no text):
    # the server sends it once the first token is computed.
    first_chunk_s: float | None = None
    # With --provisional: the first `event: provisional` that carries draft tokens, in seconds since
    # the request was sent. Drafts are unverified, so this is what a client that shows them early
    # gains over `ttft_s`; the named events are never counted as chunks or tokens.
    provisional_s: float | None = None


@dataclass
class Phase:
    name: str
    wall_s: float
    samples: list[Sample] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    rank = q / 100 * (len(values) - 1)
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def itl_gaps(chunk_times: list[float]) -> list[float]:
    """Inter-token latencies of one stream: the gaps between consecutive text chunks, as the user
    sees them (vLLM's benchmark_serving definition; a chunk may carry several tokens)."""
    return [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]


def provisional_figures(ok: list[Sample]) -> dict:
    """Time to the first provisional (draft) token beside time to the first verified token, over
    the successful streams; the ratios are provisional / verified, so below 1 means drafts come first."""
    provisional = [s.provisional_s for s in ok if s.provisional_s is not None]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    figures = {
        "provisional_streams": len(provisional),  # of `ok`: the streams that got a draft at all
        "provisional_p50_s": _percentile(provisional, 50),
        "provisional_p90_s": _percentile(provisional, 90),
        "ttft_p90_s": _percentile(ttfts, 90),  # the verified p50 is ttft_p50_s
    }
    figures["provisional_over_ttft_p50"] = _ratio(figures["provisional_p50_s"], _percentile(ttfts, 50))
    figures["provisional_over_ttft_p90"] = _ratio(figures["provisional_p90_s"], figures["ttft_p90_s"])
    return figures


def summarize(name: str, phases: list[Phase], provisional: bool = False) -> dict:
    samples = [s for p in phases for s in p.samples]
    ok = [s for s in samples if s.status == 200 and s.error is None]
    latencies = [s.latency_s for s in ok]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    itls = [gap for s in ok for gap in itl_gaps(s.chunk_times)]
    tokens = sum(s.tokens for s in ok)
    wall = sum(p.wall_s for p in phases)
    statuses = Counter(str(s.status) if s.error is None else f"{s.status}:{s.error}" for s in samples)
    summary = {
        "name": name,
        "requests": len(samples),
        "ok": len(ok),
        "status_counts": dict(sorted(statuses.items())),
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p95_s": _percentile(latencies, 95),
        "latency_p99_s": _percentile(latencies, 99),
        "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p95_s": _percentile(ttfts, 95),
        "ttft_p99_s": _percentile(ttfts, 99),
        "itl_p50_s": _percentile(itls, 50),
        "itl_p95_s": _percentile(itls, 95),
        "itl_p99_s": _percentile(itls, 99),
        "generated_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "mean_latency_s": statistics.fmean(latencies) if latencies else None,
    }
    return {**summary, **provisional_figures(ok)} if provisional else summary


async def _one(client: httpx.AsyncClient, body: dict, on_first: Callable[[], None] | None = None) -> Sample:
    """One streaming completion, as its user sees it. `on_first` is called at its first text.
    Named events (`event: provisional`, `event: verdict`) are kept apart from the OpenAI chunks:
    only the first draft's arrival is recorded, their data never counts as text or tokens."""
    started = time.perf_counter()
    sample = Sample(0, 0.0, sent_at=started)
    usage_tokens = None
    event = None  # the name of the SSE event being read; None for the plain OpenAI chunks
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            sample.status = response.status_code
            if response.status_code != 200:
                sample.detail = (await response.aread()).decode(errors="replace")[:300]
                sample.latency_s = time.perf_counter() - started
                return sample
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:].strip()
                    continue
                if not line:  # a blank line ends an event
                    event = None
                    continue
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter() - started
                if event is not None:
                    if event == "provisional" and sample.provisional_s is None and _has_drafts(line[6:]):
                        sample.provisional_s = now
                    event = None
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    sample.error = (chunk["error"] or {}).get("code") or "error"
                    break
                choices = chunk.get("choices") or []
                if choices and sample.first_chunk_s is None:
                    sample.first_chunk_s = now
                if any(c.get("text") for c in choices):
                    sample.chunk_times.append(now)
                    if sample.ttft_s is None:
                        sample.ttft_s = now
                        if on_first is not None:
                            on_first()
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    sample.prompt_tokens = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details")
                    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                        sample.cached_tokens = details["cached_tokens"]
    except httpx.HTTPError as exc:
        sample.status, sample.error = 0, type(exc).__name__
    sample.latency_s = time.perf_counter() - started
    # Usage counts tokens; without it, text chunks stand in (a speculative chunk may hold several).
    sample.tokens = usage_tokens if usage_tokens is not None else len(sample.chunk_times)
    return sample


def _has_drafts(data: str) -> bool:
    """Whether a provisional event carries tokens: a round the proposer left empty (depth 0 under
    load, or a verifier-only request) shows the user nothing yet."""
    try:
        return bool(json.loads(data).get("token_ids"))
    except (ValueError, AttributeError):
        return False


async def run_phase(
    client: httpx.AsyncClient, name: str, bodies: list[dict], concurrency: int
) -> Phase:
    queue = iter(bodies)
    samples: list[Sample] = []

    async def worker() -> None:
        for body in queue:  # the shared iterator hands each body to one worker
            samples.append(await _one(client, body))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Phase(name, time.perf_counter() - started, samples)


async def _model_name(client: httpx.AsyncClient) -> str:
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the server at {client.base_url}: {exc}; start it with `verispec serve`") from None
    if response.status_code != 200:
        raise UserError(f"GET /v1/models answered {response.status_code}: {response.text.strip()[:200]}")
    return response.json()["data"][0]["id"]


async def _wait_ready(client: httpx.AsyncClient, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            raise UserError(
                f"the server at {client.base_url} did not become ready within {timeout_s:g}s; "
                "is `verispec serve` running there? (--wait-s waits longer)"
            )
        await asyncio.sleep(0.5)


async def loadtest(
    url: str,
    prompts: list[Prompt],
    concurrency: int,
    requests: int,
    max_tokens: int,
    api_key: str | None,
    compare: bool,
    rounds: int,
    warmup: int,
    wait_s: float = 60.0,
    provisional: bool = False,
) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(600.0, connect=10.0)
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        await _wait_ready(client, wait_s)
        model = await _model_name(client)

        def bodies(texts: list[str], extra: dict) -> list[dict]:
            base = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            if provisional:  # drafts before their verdict, as named events beside the chunks
                base["provisional"] = True
            return [{**base, **extra, "prompt": text} for text in texts]

        def texts(start: int, count: int) -> list[str]:
            return [prompts[(start + i) % len(prompts)].text for i in range(count)]

        configs = [("speculative", {}), ("verifier-only", {"depth": 0})] if compare else [("server default", {})]
        for _, extra in configs:
            if warmup:
                await run_phase(client, "warm-up", bodies(texts(0, warmup), extra), concurrency)
        phases: dict[str, list[Phase]] = {name: [] for name, _ in configs}
        per_phase = max(1, requests // rounds)
        for r in range(rounds):  # every configuration sees the same prompts, phases alternate
            for name, extra in configs:
                phases[name].append(await run_phase(client, name, bodies(texts(r * per_phase, per_phase), extra), concurrency))
    results = [summarize(name, runs, provisional) for name, runs in phases.items()]
    return {
        "url": url,
        **({"provisional": True} if provisional else {}),
        "model": model,
        "concurrency": concurrency,
        "requests_per_configuration": per_phase * rounds,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "results": results,
        "phases": [{"name": p.name, "wall_s": p.wall_s, "samples": [asdict(s) for s in p.samples]} for runs in phases.values() for p in runs],
    }


@dataclass
class _Endpoint:
    scheduler: str
    client: httpx.AsyncClient
    model: str
    window: int | None = None  # the model's context length, once a too long prompt told it


def _body(model: str, prompt: str, max_tokens: int, proposer: str, stream: bool = True) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "proposer": proposer}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _failures(samples: list[Sample]) -> str:
    bad = [s for s in samples if s.status != 200 or s.error is not None]
    return "; ".join(sorted({f"{s.status} {s.error or ''} {s.detail or ''}".strip() for s in bad}))[:400]
