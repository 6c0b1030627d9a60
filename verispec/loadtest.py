"""`verispec loadtest`: concurrent streaming clients against a running `verispec serve`.

N clients share a fixed count of requests (greedy completions over a prompt set) and each
records what a user would see: time to first token, end-to-end latency, tokens, and the HTTP
status. With `--compare-speculation` the run alternates phases with the server's speculation and
verifier-only phases (the `depth: 0` extension), A B A B ..., against the same server, so that
machine drift hits both alike; figures are then given per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from verispec.errors import UserError
from verispec.prompts import Prompt, load_prompts

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "prompts" / "code-completion.jsonl"


@dataclass
class Sample:
    status: int  # HTTP status; 0 when the connection failed
    latency_s: float
    ttft_s: float | None = None
    tokens: int = 0
    error: str | None = None  # an in-band stream error's code


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


def summarize(name: str, phases: list[Phase]) -> dict:
    samples = [s for p in phases for s in p.samples]
    ok = [s for s in samples if s.status == 200 and s.error is None]
    latencies = [s.latency_s for s in ok]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    tokens = sum(s.tokens for s in ok)
    wall = sum(p.wall_s for p in phases)
    statuses = Counter(str(s.status) if s.error is None else f"{s.status}:{s.error}" for s in samples)
    return {
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
        "generated_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "mean_latency_s": statistics.fmean(latencies) if latencies else None,
    }


async def _one(client: httpx.AsyncClient, body: dict) -> Sample:
    started = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Sample(response.status_code, time.perf_counter() - started)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(200, time.perf_counter() - started, ttft, tokens, chunk["error"].get("code") or "error")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - started
            return Sample(200, time.perf_counter() - started, ttft, tokens)
    except httpx.HTTPError as exc:
        return Sample(0, time.perf_counter() - started, error=type(exc).__name__)


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
    results = [summarize(name, runs) for name, runs in phases.items()]
    return {
        "url": url,
        "model": model,
        "concurrency": concurrency,
        "requests_per_configuration": per_phase * rounds,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "results": results,
        "phases": [{"name": p.name, "wall_s": p.wall_s, "samples": [asdict(s) for s in p.samples]} for runs in phases.values() for p in runs],
    }


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    table = Table(title=f"{report['model']}: {report['concurrency']} concurrent streaming clients, "
                        f"{report['requests_per_configuration']} requests each, max_tokens {report['max_tokens']}")
    for column in ("configuration", "ok", "statuses", "p50 s", "p95 s", "p99 s", "TTFT p50 s", "TTFT p95 s", "tokens/s", "req/s"):
        table.add_column(column, justify="left" if column in ("configuration", "statuses") else "right")
    for r in report["results"]:
        statuses = " ".join(f"{k}x{v}" for k, v in r["status_counts"].items())
        table.add_row(r["name"], str(r["ok"]), statuses, f(r["latency_p50_s"]), f(r["latency_p95_s"]), f(r["latency_p99_s"]),
                      f(r["ttft_p50_s"]), f(r["ttft_p95_s"]), f(r["tokens_per_s"], 1), f(r["requests_per_s"], 2))
    console = Console(width=max(Console().width, 140))
    console.print(table)
    if len(report["results"]) == 2:
        a, b = report["results"]
        if a["tokens_per_s"] and b["tokens_per_s"]:
            console.print(f"{a['name']} / {b['name']}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                            f"p50 latency {b['latency_p50_s'] / a['latency_p50_s']:.2f}x lower" if a["latency_p50_s"] else "")


def default_prompts() -> list[Prompt]:
    """The shared prompt set where this checkout sits beside it, else text every machine has."""
    if DEFAULT_PROMPTS.is_file():
        return load_prompts(DEFAULT_PROMPTS)
    from verispec.distill import stdlib_windows

    return stdlib_windows(64, seed=7, lines=30, held_out=True)


def add_loadtest_command(commands) -> None:
    command = commands.add_parser("loadtest", help="concurrent streaming clients against a running `verispec serve`")
    command.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    command.add_argument("--prompts", type=Path, default=None,
                         help="JSONL prompt set (default: the shared prompts where present, else 64 windows of "
                              "the standard library's q/r/s modules, which the demo pair never trained on)")  # fmt: skip
    command.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default: %(default)s)")
    command.add_argument("--requests", type=int, default=32, help="requests per configuration (default: %(default)s)")
    command.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: %(default)s)")
    command.add_argument("--api-key", default=None, help="API key, if the server wants one (env: VERISPEC_API_KEY)")
    command.add_argument("--compare-speculation", action="store_true", help="alternate speculative and verifier-only phases")
    command.add_argument("--rounds", type=int, default=2, help="with --compare-speculation: A/B alternations (default: %(default)s)")
    command.add_argument("--warmup", type=int, default=2, help="requests per configuration before timing (default: %(default)s)")
    command.add_argument("--wait-s", type=float, default=60.0, help="wait this long for the server to be ready (default: %(default)s)")
    command.add_argument("--out", type=Path, default=None, help="also write the report as JSON to this file")
    command.add_argument("-v", "--verbose", action="store_true", help="log more")
    command.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import os

    for name in ("concurrency", "requests", "max_tokens", "rounds"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be 1 or more")
    if args.warmup < 0:
        raise UserError("--warmup must be 0 or more")
    prompts = default_prompts() if args.prompts is None else load_prompts(args.prompts)
    rounds = args.rounds if args.compare_speculation else 1
    report = asyncio.run(loadtest(
        args.url.rstrip("/"), prompts, args.concurrency, args.requests, args.max_tokens,
        args.api_key or os.environ.get("VERISPEC_API_KEY"), args.compare_speculation, rounds, args.warmup, args.wait_s,
    ))
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = sum(r["requests"] - r["ok"] for r in report["results"])
    return 1 if failed else 0
