"""`verispec loadtest --table`: one command, a grid of cells and two scenarios, against servers it
starts itself (one `verispec serve` per scheduler).

A cell is (concurrency, proposer, scheduler): its requests pin the proposer. Every proposer of a
concurrency level reads the same prompts (each cell's marked as its own, `cell_prompt`), and a
cell's schedulers run back to back, their order alternating from cell to cell; with --repeats,
the proposers run in turn that many times, on new prompts each time, and each cell's figures are
the median of its runs (`report.table_rows`). Then the scenarios (`scenarios.py`) run on each
server in turn.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import httpx

from verispec.errors import UserError
from verispec.prompts import Prompt, load_prompts
from verispec.tools.loadtest.clients import _body, _Endpoint, _failures, _model_name, run_phase, summarize
from verispec.tools.loadtest.report import _num, render_report
from verispec.tools.loadtest.scenarios import (
    CHUNKED_STREAMS,
    _chars_per_token,
    chunked_scenario,
    prefix_scenario,
)
from verispec.tools.loadtest.servers import _Server, serve_args
from verispec.tools.loadtest.settings import LoadtestSettings, default_prompts


def requests_per_cell(concurrency: int, requests: int | None) -> int:
    """--requests when given, else 4 per client and at least 8."""
    return requests if requests else max(8, 4 * concurrency)


def cell_plan(
    levels: list[int], proposers: list[str], schedulers: list[str], repeats: int = 1
) -> list[tuple[int, str, tuple[str, ...], int]]:
    """The cells in the order they run, as (concurrency, proposer, scheduler order, repeat): per
    concurrency, `repeats` runs of every proposer in turn, their order reversed at every run
    (A B C, C B A, ...), each cell's schedulers back to back, their order flipped at every cell
    (A B, B A, ...), so that drift hits every configuration alike."""
    plan = []
    for concurrency in levels:
        for repeat in range(repeats):
            for proposer in proposers if repeat % 2 == 0 else reversed(proposers):
                order = tuple(schedulers) if len(plan) % 2 == 0 else tuple(reversed(schedulers))
                plan.append((concurrency, proposer, order, repeat))
    return plan


def cell_prompt(index: int, text: str) -> str:
    """A prompt as cell `index` sends it: a first line naming the cell, so that a server's prefix
    cache serves no cell the prompts an earlier one read (every proposer of a run gets the same
    prompts, for a paired comparison)."""
    return f"# loadtest cell {index}\n{text}"


async def run_table(
    endpoints: list[_Endpoint], prompts: list[Prompt], levels: list[int], proposers: list[str], requests: int | None,
    max_tokens: int, warmup: int, scenarios: list[str], prefix_tokens: int, long_tokens: int,
    progress: Callable[[str], None] = lambda line: None, repeats: int = 1,
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
    cells, blocks, offset = [], {}, 0
    plan = cell_plan(levels, proposers, [e.scheduler for e in endpoints], repeats)
    for index, (concurrency, proposer, order, repeat) in enumerate(plan):
        count = requests_per_cell(concurrency, requests)
        if (concurrency, repeat) not in blocks:  # every proposer of a run the same prompts; runs move on
            blocks[(concurrency, repeat)] = texts(offset, count)
            offset += count
        batch = [cell_prompt(index, t) for t in blocks[(concurrency, repeat)]]
        for position, scheduler in enumerate(order):
            e = by_name[scheduler]
            phase = await run_phase(e.client, f"c{concurrency} {proposer} {scheduler}",
                                    [_body(e.model, t, max_tokens, proposer) for t in batch], concurrency)
            summary = summarize(phase.name, [phase])
            cells.append({"cell": index, "position": position, "repeat": repeat, "concurrency": concurrency,
                          "proposer": proposer, "scheduler": scheduler, "summary": summary,
                          "failures": _failures(phase.samples) or None, "samples": [asdict(s) for s in phase.samples]})
            run = f" run {repeat + 1}/{repeats}" if repeats > 1 else ""
            progress(f"c={concurrency} {proposer:5} {scheduler:11}{run} {summary['ok']}/{summary['requests']} ok  "
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


def _failed_count(report: dict) -> int:
    failed = sum(c["summary"]["requests"] - c["summary"]["ok"] for c in report["cells"])
    return failed + sum(not s["ok"] for runs in report.get("scenarios", {}).values() for s in runs)


async def _table(settings: LoadtestSettings, prompts: list[Prompt], config: dict, log_dir: Path,
                 servers: list[_Server]) -> dict:  # fmt: skip
    server_proposers = list(dict.fromkeys(["none", *config["proposers"]]))  # none: the baseline and the scenarios
    flags = serve_args(settings.target, settings.draft, server_proposers, settings.kv_cache_memory, settings.serve_args)
    for scheduler in config["schedulers"]:
        servers.append(_Server(scheduler, flags, log_dir))
    timeout = httpx.Timeout(600.0, connect=10.0)
    limits = httpx.Limits(max_connections=max(config["levels"]) + CHUNKED_STREAMS + 4)
    clients = [httpx.AsyncClient(base_url=s.url, timeout=timeout, limits=limits) for s in servers]
    wait_s = 600.0 if settings.wait_s is None else settings.wait_s
    try:
        started = time.perf_counter()
        await asyncio.gather(*(s.wait_ready(c, wait_s) for s, c in zip(servers, clients, strict=True)))
        endpoints = [_Endpoint(s.scheduler, c, await _model_name(c)) for s, c in zip(servers, clients, strict=True)]
        _say(f"{len(servers)} server(s) ready in {time.perf_counter() - started:.0f}s (logs: {log_dir})")
        results = await run_table(
            endpoints, prompts, config["levels"], config["proposers"], config["requests"], config["max_tokens"],
            config["warmup"], config["scenarios"], config["prefix_tokens"], config["long_tokens"], progress=_say,
            repeats=config["repeats"],
        )
    finally:
        for c in clients:
            await c.aclose()
    return {"model": endpoints[0].model, "config": config,
            "servers": [{"scheduler": s.scheduler, "url": s.url, "command": s.command} for s in servers], **results}


def _say(line: str) -> None:
    print(f"loadtest: {line}", file=sys.stderr, flush=True)


def run(settings: LoadtestSettings) -> int:
    """The whole --table run: start the servers, measure, print the markdown, stop the servers
    (their logs are kept when anything failed); 1 when a request or a scenario failed."""
    if settings.compare_speculation:
        raise UserError("--compare-speculation and --table do not go together: --table compares proposers itself")
    if settings.provisional:
        raise UserError("--provisional and --table do not go together: the table's verifier-only cells have no drafts; "
                        "run --provisional with --url against one `verispec serve` with a proposer")  # fmt: skip
    if settings.target and not settings.draft and "draft" in settings.proposers:
        raise UserError("proposer draft needs --draft with --target (or leave 'draft' out of --proposers)")
    config = {  # written into the report: what produced its figures
        "levels": list(settings.levels), "proposers": list(settings.proposers), "schedulers": list(settings.schedulers),
        "scenarios": list(settings.scenarios), "requests": settings.requests, "repeats": settings.repeats, "max_tokens": settings.max_tokens or 128,
        "warmup": settings.warmup, "prefix_tokens": settings.prefix_tokens, "long_tokens": settings.long_tokens,
        "target": settings.target, "draft": settings.draft, "kv_cache_memory": settings.kv_cache_memory,
        "serve_args": settings.serve_args,
    }  # fmt: skip
    prompts = default_prompts() if settings.prompts is None else load_prompts(settings.prompts)
    log_dir = Path(tempfile.mkdtemp(prefix="verispec-loadtest-"))
    servers: list[_Server] = []
    ok = False
    previous = signal.signal(signal.SIGTERM, _terminated)  # SIGTERM, like Ctrl-C, still stops the servers
    try:
        report = asyncio.run(_table(settings, prompts, config, log_dir, servers))
        text = render_report(report)
        print(text)
        if settings.markdown:
            settings.markdown.parent.mkdir(parents=True, exist_ok=True)
            settings.markdown.write_text(text)
        if settings.out:
            settings.out.parent.mkdir(parents=True, exist_ok=True)
            settings.out.write_text(json.dumps(report, indent=2) + "\n")
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
