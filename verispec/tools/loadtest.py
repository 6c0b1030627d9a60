"""`verispec loadtest`: concurrent streaming clients against a running `verispec serve`.

N clients share a fixed count of requests (greedy completions over a prompt set) and each
records what a user would see: time to first token, end-to-end latency, tokens, and the HTTP
status. With `--compare-speculation` the run alternates phases with the server's speculation and
verifier-only phases (the `depth: 0` extension), A B A B ..., against the same server, so that
machine drift hits both alike; figures are then given per configuration. With `--provisional`
the requests also ask for the drafts before their verdict (`event: provisional`), and the report
sets the time to the first draft token beside the time to the first verified one.

With `--table` it starts its own servers instead, one `verispec serve` per scheduler (batched,
interleaved), and measures a grid of cells, concurrency x proposer x scheduler, plus two
scenarios (a shared prefix, and a long prompt arriving among running streams); see `run_table`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
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
    if report.get("provisional"):
        console.print(provisional_table(report["results"], f))


def provisional_table(results: list[dict], f: Callable):
    """Time to first token, provisional (the first draft, unverified) beside verified, per configuration."""
    from rich.table import Table

    table = Table(title="time to first token: provisional (first draft token, unverified) vs verified; "
                        "ratio = provisional / verified, below 1 = drafts come first")
    columns = ("configuration", "streams with drafts", "provisional p50 s", "provisional p90 s",
               "verified p50 s", "verified p90 s", "ratio p50", "ratio p90")
    for column in columns:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for r in results:
        table.add_row(r["name"], f"{r['provisional_streams']}/{r['ok']}", f(r["provisional_p50_s"]), f(r["provisional_p90_s"]),
                      f(r["ttft_p50_s"]), f(r["ttft_p90_s"]),
                      _num(r["provisional_over_ttft_p50"], suffix="x"), _num(r["provisional_over_ttft_p90"], suffix="x"))
    return table


def default_prompts() -> list[Prompt]:
    """The shared prompt set where this checkout sits beside it, else text every machine has."""
    if DEFAULT_PROMPTS.is_file():
        return load_prompts(DEFAULT_PROMPTS)
    from verispec.prompts import stdlib_windows

    return stdlib_windows(64, seed=7, lines=30, held_out=True)


# -- --table: one command, a grid of cells and two scenarios, against servers it starts itself ----------

SCHEDULERS = ("batched", "interleaved")
PROPOSERS = ("none", "draft", "ngram")
SCENARIOS = ("prefix", "chunked")
PREFIX_ROUNDS = 3  # distinct prefixes in the prefix scenario
CHUNKED_STREAMS = 3  # running streams the long prompt arrives among
CHUNKED_STREAM_TOKENS = 256
SCENARIO_TAIL_TOKENS = 8  # max_tokens of the prefix requests and of the long prompt


def parse_list(text: str, what: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if len(set(items)) != len(items):
        raise UserError(f"--{what}: each value once, got {text!r}")
    if allowed is not None:
        unknown = [x for x in items if x not in allowed]
        if unknown:
            raise UserError(f"--{what}: unknown value {unknown[0]!r}; choose among {', '.join(allowed)}")
    return items


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in parse_list(text, "levels")]
    except ValueError:
        raise UserError(f"--levels takes comma-separated integers, e.g. 1,2,4,8; got {text!r}") from None
    if not levels or min(levels) < 1:
        raise UserError("--levels: give one or more concurrency levels, each 1 or more")
    return levels


def requests_per_cell(concurrency: int, requests: int | None) -> int:
    """--requests when given, else 4 per client and at least 8."""
    return requests if requests else max(8, 4 * concurrency)


def cell_plan(levels: list[int], proposers: list[str], schedulers: list[str]) -> list[tuple[int, str, tuple[str, ...]]]:
    """The cells in the order they run: per concurrency, per proposer, the schedulers back to back,
    their order flipped at every cell (A B, B A, A B, ...) so that drift hits both alike."""
    plan = []
    for concurrency in levels:
        for proposer in proposers:
            order = tuple(schedulers) if len(plan) % 2 == 0 else tuple(reversed(schedulers))
            plan.append((concurrency, proposer, order))
    return plan


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def reference_scheduler(schedulers: list[str]) -> str:
    """The scheduler whose verifier-only figures the speculation columns divide by."""
    return "batched" if "batched" in schedulers else schedulers[0]


def table_rows(cells: list[dict]) -> list[dict]:
    """Each cell's figures with its ratio columns: tok/s over the interleaved scheduler's (same
    concurrency, same proposer) and over the reference scheduler's verifier-only (same concurrency)."""
    schedulers = list(dict.fromkeys(c["scheduler"] for c in cells))
    ref = reference_scheduler(schedulers) if schedulers else "batched"
    rate = {(c["concurrency"], c["proposer"], c["scheduler"]): c["summary"]["tokens_per_s"] for c in cells}
    rows = []
    for c in cells:
        s = c["summary"]
        key = (c["concurrency"], c["proposer"])
        rows.append({
            "concurrency": c["concurrency"], "proposer": c["proposer"], "scheduler": c["scheduler"],
            "tokens_per_s": s["tokens_per_s"],
            "x_interleaved": _ratio(s["tokens_per_s"], rate.get((*key, "interleaved"))),
            "x_verifier_only": _ratio(s["tokens_per_s"], rate.get((c["concurrency"], "none", ref))),
            "latency_p50_s": s["latency_p50_s"], "latency_p99_s": s["latency_p99_s"],
            "ttft_p50_s": s["ttft_p50_s"], "itl_p50_s": s["itl_p50_s"], "itl_p99_s": s["itl_p99_s"],
            "ok": s["ok"], "requests": s["requests"],
        })
    rows.sort(key=lambda r: (r["concurrency"], PROPOSERS.index(r["proposer"]) if r["proposer"] in PROPOSERS else 9,
                             r["proposer"], r["scheduler"]))
    return rows


def _num(value: float | None, digits: int = 2, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{suffix}"


def render_table(cells: list[dict]) -> str:
    """The cells as a markdown table."""
    schedulers = list(dict.fromkeys(c["scheduler"] for c in cells))
    ref = reference_scheduler(schedulers) if schedulers else "batched"
    head = ["concurrency", "proposer", "scheduler", "tok/s", "x interleaved", f"x {ref} verifier-only",
            "latency p50/p99 (s)", "TTFT p50 (ms)", "ITL p50/p99 (ms)", "ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i not in (1, 2) else "---" for i in range(len(head))) + "|"]
    for r in table_rows(cells):
        lines.append("| " + " | ".join([
            str(r["concurrency"]), r["proposer"], r["scheduler"], _num(r["tokens_per_s"], 1),
            _num(r["x_interleaved"], suffix="x"), _num(r["x_verifier_only"], suffix="x"),
            f"{_num(r['latency_p50_s'])} / {_num(r['latency_p99_s'])}", _num(r["ttft_p50_s"], 0, 1000),
            f"{_num(r['itl_p50_s'], 1, 1000)} / {_num(r['itl_p99_s'], 1, 1000)}", f"{r['ok']}/{r['requests']}",
        ]) + " |")
    return "\n".join(lines)


def chunked_figures(streams: list[Sample], window: tuple[float, float] | None) -> dict:
    """ITL gaps of the running streams, over the whole streams and within the window from the long
    prompt's send to its first token (absolute perf_counter times): a gap falls in it when it
    overlaps it. The headline: p99 of the window's gaps over the median of the gaps outside it."""
    every, inside, outside = [], [], []
    for s in streams:
        times = [s.sent_at + t for t in s.chunk_times]
        for a, b in zip(times, times[1:], strict=False):
            every.append(b - a)
            (inside if window is not None and a < window[1] and b > window[0] else outside).append(b - a)
    median_all, p99_all = _percentile(every, 50), _percentile(every, 99)
    median_out = _percentile(outside, 50) if outside else median_all
    p99_in = _percentile(inside, 99)
    return {
        "gaps": len(every), "window_gaps": len(inside),
        "window_s": None if window is None else window[1] - window[0],
        "itl_median_s": median_all, "itl_p99_s": p99_all,
        "window_itl_median_s": _percentile(inside, 50), "window_itl_p99_s": p99_in,
        "outside_itl_median_s": median_out,
        "stream_p99_over_median": _ratio(p99_all, median_all),
        "window_p99_over_median": _ratio(p99_in, median_out),
    }


class _Server:
    """One `verispec serve` this command started, its output in a log file."""

    def __init__(self, scheduler: str, args: list[str], log_dir: Path):
        self.scheduler = scheduler
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-{scheduler}-{self.port}.log"
        self.command = [sys.executable, "-m", "verispec.cli", "serve", *args, "--scheduler", scheduler, "--port", str(self.port)]
        # Private servers on loopback: no API keys, whatever this shell's environment says.
        env = {k: v for k, v in os.environ.items() if k not in ("VERISPEC_API_KEYS", "VERISPEC_API_KEYS_FILE")}
        self._log = self.log_path.open("w")
        self._log.write("$ " + shlex.join(self.command) + "\n")
        self._log.flush()
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # Ctrl-C reaches this command alone, which then stops its servers
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_ready(self, client: httpx.AsyncClient, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise UserError(f"the {self.scheduler} server exited with {self.process.returncode} before it was ready; "
                                f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                if (await client.get("/readyz", timeout=2.0)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise UserError(f"the {self.scheduler} server was not ready within {timeout_s:g}s (--wait-s waits longer); "
                                f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            await asyncio.sleep(0.25)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when this process dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; the finally block stops the servers anyway
        pass


def serve_args(target: str | None, draft: str | None, proposers: list[str], kv_cache_memory: str | None,
               extra: str | None) -> list[str]:
    """The flags every server of the table gets (but --scheduler and --port)."""
    args = [*(["--target", target] if target else []), *(["--draft", draft] if draft else [])]
    args += ["--proposers", ",".join(proposers), "--max-running", "8", "--max-waiting", "64",
             "--audit-url", "none", "--log-level", "warning"]
    if kv_cache_memory:
        args += ["--kv-cache-memory", kv_cache_memory]
    return args + shlex.split(extra or "")  # given last: they override the above


@dataclass
class _Endpoint:
    scheduler: str
    client: httpx.AsyncClient
    model: str
    window: int | None = None  # the model's context length, once a too long prompt told it


class _TooLong(UserError):
    def __init__(self, message: str, window: int | None):
        super().__init__(message)
        self.window = window


def _body(model: str, prompt: str, max_tokens: int, proposer: str, stream: bool = True) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "proposer": proposer}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _failures(samples: list[Sample]) -> str:
    bad = [s for s in samples if s.status != 200 or s.error is not None]
    return "; ".join(sorted({f"{s.status} {s.error or ''} {s.detail or ''}".strip() for s in bad}))[:400]


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


async def run_table(
    endpoints: list[_Endpoint], prompts: list[Prompt], levels: list[int], proposers: list[str], requests: int | None,
    max_tokens: int, warmup: int, scenarios: list[str], prefix_tokens: int, long_tokens: int,
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """The cells (see `cell_plan`) and the scenarios, against servers already ready."""
    by_name = {e.scheduler: e for e in endpoints}
    n = len(prompts)
    texts = lambda start, count: [prompts[(start + i) % n].text for i in range(count)]  # noqa: E731
    if warmup:
        for e in endpoints:
            for p in proposers:
                phase = await run_phase(e.client, "warm-up", [_body(e.model, t, max_tokens, p) for t in texts(n - warmup, warmup)],
                                        min(2, warmup))
                if _failures(phase.samples):
                    raise UserError(f"warm-up of proposer {p} on the {e.scheduler} server failed: {_failures(phase.samples)}")
    cells, offset = [], 0
    for index, (concurrency, proposer, order) in enumerate(cell_plan(levels, proposers, [e.scheduler for e in endpoints])):
        count = requests_per_cell(concurrency, requests)
        batch = texts(offset, count)  # the same prompts for each scheduler of a cell; cells move on
        offset += count
        for position, scheduler in enumerate(order):
            e = by_name[scheduler]
            phase = await run_phase(e.client, f"c{concurrency} {proposer} {scheduler}",
                                    [_body(e.model, t, max_tokens, proposer) for t in batch], concurrency)
            summary = summarize(phase.name, [phase])
            cells.append({"cell": index, "position": position, "concurrency": concurrency, "proposer": proposer,
                          "scheduler": scheduler, "summary": summary, "failures": _failures(phase.samples) or None,
                          "samples": [asdict(s) for s in phase.samples]})
            progress(f"c={concurrency} {proposer:5} {scheduler:11} {summary['ok']}/{summary['requests']} ok  "
                     f"{_num(summary['tokens_per_s'], 1)} tok/s")
    results: dict = {"cells": cells, "scenarios": {}}
    if scenarios:
        chars_per_token = await _chars_per_token(endpoints[0], prompts, min(prefix_tokens, long_tokens))
        results["chars_per_token"] = chars_per_token
        for name, run, tokens in (("prefix", prefix_scenario, prefix_tokens), ("chunked", chunked_scenario, long_tokens)):
            if name not in scenarios:
                continue
            results["scenarios"][name] = []
            for e in endpoints:
                e.window = e.window or next((x.window for x in endpoints if x.window), None)  # one model: one window
                results["scenarios"][name].append(await run(e, prompts, tokens, chars_per_token))
                progress(f"{name:7} {e.scheduler:11} done")
        window = next((x.window for x in endpoints if x.window), None)
        results["context_length"] = window  # known only where a prompt was too long for it
        if window is not None:
            progress(f"the model's context length is {window} tokens: the scenarios' prompts were shortened to fit")
    return results


def summary_lines(report: dict) -> list[str]:
    cells = report["cells"]
    rate = {(c["concurrency"], c["proposer"], c["scheduler"]): c["summary"]["tokens_per_s"] for c in cells}
    schedulers = list(dict.fromkeys(c["scheduler"] for c in cells))
    levels = list(dict.fromkeys(c["concurrency"] for c in cells))
    proposers = list(dict.fromkeys(c["proposer"] for c in cells))
    lines = []
    c4 = _ratio(rate.get((4, "none", "batched")), rate.get((4, "none", "interleaved")))
    lines.append("- verifier-only, concurrency 4, batched / interleaved tok/s: "
                 + (f"{c4:.2f}x" if c4 is not None else "n/a (needs level 4, proposer none and both schedulers)"))
    if schedulers:
        ref = reference_scheduler(schedulers)
        parts = []
        for c in levels:
            ratios = [f"{p} {_num(_ratio(rate.get((c, p, ref)), rate.get((c, 'none', ref))), suffix='x')}"
                      for p in proposers if p != "none"]
            if ratios:
                parts.append(f"c{c}: " + ", ".join(ratios))
        lines.append(f"- speculation / verifier-only tok/s, {ref} scheduler: " + ("; ".join(parts) or "n/a (no proposer but none)"))
    for s in report.get("scenarios", {}).get("prefix", []):
        cached = s["median_cached_tokens_b"]
        lines.append(f"- prefix, {s['scheduler']}: median TTFT A / TTFT B {_num(s['median_ttft_ratio'], suffix='x')}"
                     + (f", B's cached_tokens {cached:g}" if cached is not None else ", cached_tokens not reported"))
    for s in report.get("scenarios", {}).get("chunked", []):
        lines.append(f"- chunked, {s['scheduler']}: running streams' ITL p99 while the long prompt waits for its first "
                     f"token / median ITL {_num(s['window_p99_over_median'], suffix='x')} (target: at most 3x on batched); "
                     f"whole streams p99/median {_num(s['stream_p99_over_median'], suffix='x')}")
    return lines


def render_report(report: dict) -> str:
    c = report["config"]
    out = [f"## verispec loadtest --table: {report['model']}",
           "", f"Greedy streaming completions, max_tokens {c['max_tokens']}, requests per cell "
               f"{c['requests'] or 'max(8, 4 x concurrency)'}, schedulers run back to back per cell, order alternating.",
           "", render_table(report["cells"])]
    prefix = report.get("scenarios", {}).get("prefix")
    if prefix:
        out += ["", "### prefix: A = prefix + tail A, then B = same prefix + tail B", "",
                "| scheduler | prompt tokens (A) | TTFT A (ms) | TTFT B (ms) | TTFT A / B | cached tokens (B) |", "|---|---:|---:|---:|---:|---:|"]
        for s in prefix:
            for r in s["rounds"]:
                out.append(f"| {s['scheduler']} | {r['prompt_tokens_a'] if r['prompt_tokens_a'] is not None else '-'} | "
                           f"{_num(r['ttft_a_s'], 0, 1000)} | {_num(r['ttft_b_s'], 0, 1000)} | {_num(r['ttft_ratio'], suffix='x')} | "
                           f"{r['cached_tokens_b'] if r['cached_tokens_b'] is not None else '-'} |")
    chunked = report.get("scenarios", {}).get("chunked")
    if chunked:
        out += ["", f"### chunked: a long prompt arrives among {CHUNKED_STREAMS} running verifier-only streams", "",
                "| scheduler | long prompt tokens | its TTFT (ms) | window ITL median / p99 (ms) | stream ITL median / p99 (ms) "
                "| window p99 / median | stream p99 / median |", "|---|---:|---:|---:|---:|---:|---:|"]
        for s in chunked:
            out.append(f"| {s['scheduler']} | {s['long_prompt_tokens'] if s['long_prompt_tokens'] is not None else '-'} | "
                       f"{_num(s['long_ttft_s'], 0, 1000)} | "
                       f"{_num(s['window_itl_median_s'], 1, 1000)} / {_num(s['window_itl_p99_s'], 1, 1000)} | "
                       f"{_num(s['itl_median_s'], 1, 1000)} / {_num(s['itl_p99_s'], 1, 1000)} | "
                       f"{_num(s['window_p99_over_median'], suffix='x')} | {_num(s['stream_p99_over_median'], suffix='x')} |")
    out += ["", "### summary", "", *summary_lines(report)]
    return "\n".join(out) + "\n"


def _failed_count(report: dict) -> int:
    failed = sum(c["summary"]["requests"] - c["summary"]["ok"] for c in report["cells"])
    return failed + sum(not s["ok"] for runs in report.get("scenarios", {}).values() for s in runs)


async def _table(args: argparse.Namespace, prompts: list[Prompt], config: dict, log_dir: Path, servers: list[_Server]) -> dict:
    server_proposers = list(dict.fromkeys(["none", *config["proposers"]]))  # none: the baseline and the scenarios
    flags = serve_args(args.target, args.draft, server_proposers, args.kv_cache_memory, args.serve_args)
    for scheduler in config["schedulers"]:
        servers.append(_Server(scheduler, flags, log_dir))
    timeout = httpx.Timeout(600.0, connect=10.0)
    limits = httpx.Limits(max_connections=max(config["levels"]) + CHUNKED_STREAMS + 4)
    clients = [httpx.AsyncClient(base_url=s.url, timeout=timeout, limits=limits) for s in servers]
    try:
        started = time.perf_counter()
        await asyncio.gather(*(s.wait_ready(c, args.wait_s) for s, c in zip(servers, clients, strict=True)))
        endpoints = [_Endpoint(s.scheduler, c, await _model_name(c)) for s, c in zip(servers, clients, strict=True)]
        _say(f"{len(servers)} server(s) ready in {time.perf_counter() - started:.0f}s (logs: {log_dir})")
        results = await run_table(
            endpoints, prompts, config["levels"], config["proposers"], config["requests"], config["max_tokens"],
            config["warmup"], config["scenarios"], config["prefix_tokens"], config["long_tokens"], progress=_say,
        )
    finally:
        for c in clients:
            await c.aclose()
    return {"model": endpoints[0].model, "config": config,
            "servers": [{"scheduler": s.scheduler, "url": s.url, "command": s.command} for s in servers], **results}


def _say(line: str) -> None:
    print(f"loadtest: {line}", file=sys.stderr, flush=True)


def _run_table(args: argparse.Namespace) -> int:
    if args.compare_speculation:
        raise UserError("--compare-speculation and --table do not go together: --table compares proposers itself")
    if args.provisional:
        raise UserError("--provisional and --table do not go together: the table's verifier-only cells have no drafts "
                        "and its interleaved server refuses provisional streams; run --provisional with --url against "
                        "one `verispec serve` (batched, with a proposer)")
    for name in ("requests", "max_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be 1 or more")
    if args.warmup < 0:
        raise UserError("--warmup must be 0 or more")
    if args.prefix_tokens < 16 or args.long_tokens < 16:
        raise UserError("--prefix-tokens and --long-tokens must be 16 or more")
    scenarios = [] if args.scenarios.strip().lower() in ("", "none") else parse_list(args.scenarios, "scenarios", SCENARIOS)
    config = {
        "levels": parse_levels(args.levels),
        "proposers": parse_list(args.proposers, "proposers", PROPOSERS),
        "schedulers": parse_list(args.schedulers, "schedulers", SCHEDULERS),
        "scenarios": scenarios,
        "requests": args.requests, "max_tokens": args.max_tokens or 128, "warmup": args.warmup,
        "prefix_tokens": args.prefix_tokens, "long_tokens": args.long_tokens,
        "target": args.target, "draft": args.draft, "kv_cache_memory": args.kv_cache_memory, "serve_args": args.serve_args,
    }
    if not config["proposers"] or not config["schedulers"]:
        raise UserError("--proposers and --schedulers need one value or more")
    if args.target and not args.draft and "draft" in config["proposers"]:
        raise UserError("proposer draft needs --draft with --target (or leave 'draft' out of --proposers)")
    prompts = default_prompts() if args.prompts is None else load_prompts(args.prompts)
    log_dir = Path(tempfile.mkdtemp(prefix="verispec-loadtest-"))
    servers: list[_Server] = []
    ok = False
    previous = signal.signal(signal.SIGTERM, _terminated)  # SIGTERM, like Ctrl-C, still stops the servers
    try:
        report = asyncio.run(_table(args, prompts, config, log_dir, servers))
        text = render_report(report)
        print(text)
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        ok = _failed_count(report) == 0
        return 0 if ok else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        for s in servers:
            s.stop()
        if ok:
            for path in log_dir.iterdir():
                path.unlink()
            log_dir.rmdir()
        else:
            print(f"verispec: server logs kept in {log_dir}", file=sys.stderr)


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


def add_loadtest_command(commands) -> None:
    command = commands.add_parser(
        "loadtest", help="concurrent streaming clients against a running `verispec serve` (--table: servers of its own)",
        description="Concurrent streaming clients against a running `verispec serve`. With --table it starts one server "
                    "per scheduler itself and measures every concurrency level x proposer x scheduler, then the prefix "
                    "and chunked-prefill scenarios, and prints a markdown table.",
    )  # fmt: skip
    command.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    command.add_argument("--prompts", type=Path, default=None,
                         help="JSONL prompt set (default: the shared prompts where present, else 64 windows of "
                              "the standard library's q/r/s modules, which the demo pair never trained on)")  # fmt: skip
    command.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default: %(default)s)")
    command.add_argument("--requests", type=int, default=None,
                         help="requests per configuration (default: 32); with --table per cell (default: 4 per "
                              "client, at least 8)")  # fmt: skip
    command.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (default: 64; with --table 128)")
    command.add_argument("--api-key", default=None, help="API key, if the server wants one (env: VERISPEC_API_KEY)")
    command.add_argument("--compare-speculation", action="store_true", help="alternate speculative and verifier-only phases")
    command.add_argument("--provisional", action="store_true",
                         help="ask for drafts before their verdict (the `provisional` extension) and report the time "
                              "to the first draft token beside the time to the first verified one")  # fmt: skip
    command.add_argument("--rounds", type=int, default=2, help="with --compare-speculation: A/B alternations (default: %(default)s)")
    command.add_argument("--warmup", type=int, default=2,
                         help="requests per configuration before timing; with --table per server and proposer "
                              "(default: %(default)s)")  # fmt: skip
    command.add_argument("--wait-s", type=float, default=None,
                         help="wait this long for the server to be ready (default: 60; with --table 600)")
    command.add_argument("--out", type=Path, default=None, help="also write the report as JSON to this file")
    table = command.add_argument_group(
        "--table", "start one `verispec serve` per scheduler on free loopback ports and measure a grid of cells"
    )
    table.add_argument("--table", action="store_true",
                       help="measure concurrency x proposer x scheduler cells and the scenarios on servers of its own "
                            "(--url is not used)")  # fmt: skip
    table.add_argument("--target", default=None, help="the servers' verifier (default: the servers' own, the demo pair)")
    table.add_argument("--draft", default=None, help="the servers' draft model (default: the servers' own)")
    table.add_argument("--levels", default="1,2,4,8", help="concurrency levels (default: %(default)s)")
    table.add_argument("--schedulers", default="batched,interleaved",
                       help="one server each: batched, interleaved (default: %(default)s)")
    table.add_argument("--proposers", default="none,draft,ngram",
                       help="pinned per request; none = verifier only (default: %(default)s)")
    table.add_argument("--scenarios", default="prefix,chunked",
                       help="prefix (shared-prefix TTFT), chunked (a long prompt among running streams), or none "
                            "(default: %(default)s)")  # fmt: skip
    table.add_argument("--prefix-tokens", type=int, default=1000,
                       help="prefix scenario: tokens of the shared prefix, about (default: %(default)s)")
    table.add_argument("--long-tokens", type=int, default=1800,
                       help="chunked scenario: tokens of the long prompt, about (default: %(default)s)")
    table.add_argument("--kv-cache-memory", default=None, help="passed to the servers (default: theirs)")
    table.add_argument("--serve-args", default=None,
                       help="more `verispec serve` flags for both servers, one string, given last (they override): "
                            "e.g. \"--load-depth-from 2 --load-depth-off 4\"")  # fmt: skip
    table.add_argument("--markdown", type=Path, default=None, help="also write the table and summary to this file")
    command.add_argument("-v", "--verbose", action="store_true", help="log more")
    command.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    if args.table:
        args.wait_s = 600.0 if args.wait_s is None else args.wait_s
        return _run_table(args)
    args.requests = 32 if args.requests is None else args.requests
    args.max_tokens = 64 if args.max_tokens is None else args.max_tokens
    args.wait_s = 60.0 if args.wait_s is None else args.wait_s
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
        args.provisional,
    ))
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = sum(r["requests"] - r["ok"] for r in report["results"])
    return 1 if failed else 0
