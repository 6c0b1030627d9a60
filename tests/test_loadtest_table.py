"""`verispec loadtest --table`: the pure parts (ITL, percentiles, cell order, the table and its
ratio columns, the chunked-prefill figures), `_one` against a canned stream, and one run end to
end against servers it starts itself on the tiny models."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_verispec, write_prompts
from verispec.errors import UserError
from verispec.prompts import Prompt
from verispec.tools import loadtest
from verispec.tools.loadtest import (
    Phase,
    Sample,
    _percentile,
    cell_plan,
    chunked_figures,
    itl_gaps,
    parse_levels,
    parse_list,
    render_table,
    requests_per_cell,
    serve_args,
    summarize,
    summary_lines,
    table_rows,
)
from verispec.tools.loadtest.clients import _Endpoint

# -- inter-token latency, percentiles, summaries ----------------------------------------------------------


def test_itl_is_the_gaps_between_consecutive_text_chunks():
    assert itl_gaps([0.10, 0.15, 0.30, 0.31]) == pytest.approx([0.05, 0.15, 0.01])
    assert itl_gaps([0.2]) == [] and itl_gaps([]) == []


def test_percentile_interpolates_between_ranks():
    assert _percentile([], 50) is None
    assert _percentile([7.0], 99) == 7.0
    assert _percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5  # order does not matter
    assert _percentile([float(i) for i in range(101)], 99) == pytest.approx(99.0)
    assert _percentile([0.0, 10.0], 90) == pytest.approx(9.0)


def test_summary_pools_the_itl_of_successful_streams_only():
    ok_a = Sample(200, 1.0, ttft_s=0.1, tokens=3, chunk_times=[0.1, 0.2, 0.4])  # gaps 0.1, 0.2
    ok_b = Sample(200, 1.0, ttft_s=0.2, tokens=2, chunk_times=[0.2, 0.5])  # gap 0.3
    failed = Sample(200, 1.0, ttft_s=0.1, tokens=9, error="internal_error", chunk_times=[0.0, 9.0])
    refused = Sample(503, 0.01, detail="busy")
    s = summarize("x", [Phase("x", 2.0, [ok_a, ok_b, failed, refused])])
    assert s["requests"] == 4 and s["ok"] == 2
    assert s["status_counts"] == {"200": 2, "200:internal_error": 1, "503": 1}
    assert s["itl_p50_s"] == pytest.approx(0.2) and s["itl_p99_s"] == pytest.approx(0.298)
    assert s["generated_tokens"] == 5 and s["tokens_per_s"] == pytest.approx(2.5)
    assert s["ttft_p50_s"] == pytest.approx(0.15)


# -- options and the order of the cells -------------------------------------------------------------------


def test_requests_per_cell_default_to_four_per_client_and_at_least_eight():
    assert [requests_per_cell(c, None) for c in (1, 2, 4, 8)] == [8, 8, 16, 32]
    assert requests_per_cell(8, 3) == 3


def test_option_lists_are_checked():
    assert parse_levels("1, 2,4") == [1, 2, 4]
    assert parse_list("none,ngram", "proposers", loadtest.PROPOSERS) == ["none", "ngram"]
    for bad in ("0,1", "1,x", "2,2", ""):
        with pytest.raises(UserError):
            parse_levels(bad)
    with pytest.raises(UserError, match="unknown value 'fast'"):
        parse_list("batched,fast", "schedulers", loadtest.SCHEDULERS)
    # The default cells leave the suffix cache and the draft head out; named, they are measured.
    from verispec.tools.loadtest.settings import TableOptions

    assert "head" not in TableOptions().proposers and "suffix" not in TableOptions().proposers
    assert TableOptions(proposers="none,head,suffix").proposers == ("none", "head", "suffix")
    with pytest.raises(ValueError, match="oracle"):
        TableOptions(proposers="none,oracle")


def test_schedulers_run_back_to_back_and_their_order_alternates_at_every_cell():
    plan = cell_plan([1, 2], ["none", "draft", "ngram"], ["batched", "interleaved"])
    assert [(c, p) for c, p, _, _ in plan] == [(1, "none"), (1, "draft"), (1, "ngram"), (2, "none"), (2, "draft"), (2, "ngram")]
    ab, ba = ("batched", "interleaved"), ("interleaved", "batched")
    assert [order for _, _, order, _ in plan] == [ab, ba, ab, ba, ab, ba]  # continues across levels
    assert [order for _, _, order, _ in cell_plan([1, 4], ["none"], ["interleaved"])] == [("interleaved",)] * 2


def test_repeats_take_turns_in_an_order_reversed_at_every_run():
    plan = cell_plan([1, 4], ["none", "head"], ["batched"], repeats=3)
    assert [(c, p, r) for c, p, _, r in plan] == [
        (1, "none", 0), (1, "head", 0), (1, "head", 1), (1, "none", 1), (1, "none", 2), (1, "head", 2),
        (4, "none", 0), (4, "head", 0), (4, "head", 1), (4, "none", 1), (4, "none", 2), (4, "head", 2),
    ]


def test_every_proposer_of_a_run_reads_the_same_prompts_each_cell_marked_as_its_own(monkeypatch):
    sent: list[tuple[str, str, str]] = []

    async def phase(client, name, bodies, concurrency):
        sent.extend((name, b["proposer"], b["prompt"]) for b in bodies)
        samples = [Sample(200, 0.5, tokens=8, ttft_s=0.1, chunk_times=[0.1, 0.2]) for _ in bodies]
        return Phase(name, 1.0, samples)

    monkeypatch.setattr("verispec.tools.loadtest.table.run_phase", phase)
    prompts = [Prompt(f"p{i}", f"text {i}") for i in range(10)]
    endpoint = _Endpoint("batched", None, "m")
    results = asyncio.run(loadtest.run_table([endpoint], prompts, [2], ["none", "head"], 2, 8, 0, [], 16, 16, repeats=2))
    assert [(c["proposer"], c["repeat"]) for c in results["cells"]] == [("none", 0), ("head", 0), ("head", 1), ("none", 1)]
    by_cell = [[t for _, p, t in sent[i : i + 2]] for i in range(0, 8, 2)]
    assert by_cell[0] == ["# loadtest cell 0\ntext 0", "# loadtest cell 0\ntext 1"]
    assert by_cell[1] == ["# loadtest cell 1\ntext 0", "# loadtest cell 1\ntext 1"]  # head: run 1's prompts
    assert by_cell[2] == ["# loadtest cell 2\ntext 2", "# loadtest cell 2\ntext 3"]  # run 2 moves on
    assert by_cell[3] == ["# loadtest cell 3\ntext 2", "# loadtest cell 3\ntext 3"]


def test_serve_flags_default_to_the_demo_pair_and_extra_flags_come_last():
    args = serve_args(None, None, ["none", "ngram"], None, None)
    assert "--target" not in args and "--draft" not in args and "--kv-cache-memory" not in args
    assert args[args.index("--proposers") + 1] == "none,ngram"
    assert args[args.index("--audit-url") + 1] == "none"
    args = serve_args("t", "d", ["none"], "512MiB", "--max-running 16")
    assert args[:4] == ["--target", "t", "--draft", "d"] and args[-2:] == ["--max-running", "16"]
    assert args[args.index("--kv-cache-memory") + 1] == "512MiB"


# -- the table and its ratio columns ----------------------------------------------------------------------


def cell(c: int, proposer: str, scheduler: str, rate: float | None, ok: int = 8) -> dict:
    summary = {
        "tokens_per_s": rate, "latency_p50_s": 1.0, "latency_p99_s": 2.0, "ttft_p50_s": 0.05,
        "itl_p50_s": 0.01, "itl_p99_s": 0.04, "ok": ok, "requests": 8,
    }
    return {"concurrency": c, "proposer": proposer, "scheduler": scheduler, "summary": summary}


CELLS = [  # in run order (interleaved first at some cells), the table sorts them
    cell(1, "none", "batched", 100.0), cell(1, "none", "interleaved", 100.0),
    cell(1, "draft", "interleaved", 150.0), cell(1, "draft", "batched", 200.0),
    cell(4, "none", "batched", 300.0), cell(4, "none", "interleaved", 120.0),
    cell(4, "draft", "interleaved", 180.0), cell(4, "draft", "batched", 450.0),
]


def test_ratio_columns_divide_by_interleaved_same_proposer_and_by_batched_verifier_only():
    rows = {(r["concurrency"], r["proposer"], r["scheduler"]): r for r in table_rows(CELLS)}
    assert rows[(4, "draft", "batched")]["x_interleaved"] == pytest.approx(2.5)  # 450 / 180
    assert rows[(4, "draft", "batched")]["x_verifier_only"] == pytest.approx(1.5)  # 450 / 300
    assert rows[(4, "draft", "interleaved")]["x_verifier_only"] == pytest.approx(0.6)  # 180 / 300
    assert rows[(4, "none", "interleaved")]["x_interleaved"] == pytest.approx(1.0)
    assert rows[(1, "draft", "batched")]["x_interleaved"] == pytest.approx(200 / 150)
    order = [(r["concurrency"], r["proposer"], r["scheduler"]) for r in table_rows(CELLS)]
    assert order[:4] == [(1, "none", "batched"), (1, "none", "interleaved"), (1, "draft", "batched"), (1, "draft", "interleaved")]


def test_a_missing_baseline_leaves_its_column_empty():
    rows = table_rows([cell(2, "none", "batched", 50.0), cell(2, "ngram", "batched", 75.0), cell(2, "draft", "batched", None, ok=0)])
    assert [r["x_interleaved"] for r in rows] == [None, None, None]
    assert [r["x_verifier_only"] for r in rows] == [pytest.approx(1.0), None, pytest.approx(1.5)]  # none, draft, ngram
    text = render_table([cell(2, "ngram", "interleaved", 75.0)])  # no verifier-only cell at all
    assert text.splitlines()[2].split(" | ")[4:6] == ["1.00x", "-"]


def test_the_markdown_table_has_one_row_per_cell():
    lines = render_table(CELLS).splitlines()
    assert lines[0] == ("| concurrency | proposer | scheduler | tok/s | x interleaved | x batched verifier-only | "
                        "latency p50/p99 (s) | TTFT p50 (ms) | ITL p50/p99 (ms) | ok |")
    assert len(lines) == 2 + len(CELLS)
    assert lines[-1] == "| 4 | draft | interleaved | 180.0 | 1.00x | 0.60x | 1.00 / 2.00 | 50 | 10.0 / 40.0 | 8/8 |"
    assert lines[-2] == "| 4 | draft | batched | 450.0 | 2.50x | 1.50x | 1.00 / 2.00 | 50 | 10.0 / 40.0 | 8/8 |"
    # Without a batched server the speculation column divides by the first scheduler's verifier-only.
    assert "x interleaved verifier-only" in render_table([cell(1, "none", "interleaved", 1.0)])


def test_repeated_cells_give_medians_and_the_median_of_paired_ratios():
    def run(proposer, rate, repeat):
        return {**cell(4, proposer, "batched", rate), "repeat": repeat}

    # Run 2 was slow for both (drift): its ratio is still 1.5x; the medians alone would say 1.45x.
    cells = [run("none", 300.0, 0), run("head", 450.0, 0), run("head", 300.0, 1), run("none", 200.0, 1),
             run("none", 310.0, 2), run("head", 480.0, 2)]
    (none, head) = table_rows(cells)
    assert none["tokens_per_s"] == pytest.approx(300.0) and head["tokens_per_s"] == pytest.approx(450.0)
    assert head["runs"] == [450.0, 300.0, 480.0] and head["requests"] == 24
    assert head["x_verifier_only"] == pytest.approx(1.5)  # median of 1.5, 1.5, 1.548
    lines = render_table(cells).splitlines()
    assert "| tok/s (median) | tok/s of each run |" in lines[0]
    assert lines[-1].startswith("| 4 | head | batched | 450.0 | 450.0, 300.0, 480.0 | - | 1.50x |")
    assert "c4: head 1.50x" in "\n".join(summary_lines({"cells": cells}))


def test_summary_names_the_figures_the_issue_asks_for():
    report = {
        "cells": CELLS,
        "scenarios": {
            "prefix": [{"scheduler": "batched", "median_ttft_ratio": 4.0, "median_cached_tokens_b": 992}],
            "chunked": [{"scheduler": "batched", "window_p99_over_median": 1.5, "stream_p99_over_median": 2.0}],
        },
    }
    text = "\n".join(summary_lines(report))
    assert "batched / interleaved tok/s: 2.50x" in text  # 300 / 120 at concurrency 4
    assert "c1: draft 2.00x; c4: draft 1.50x" in text
    assert "median TTFT A / TTFT B 4.00x, B's cached_tokens 992" in text
    assert "median ITL 1.50x" in text


# -- the chunked-prefill figures ---------------------------------------------------------------------------


def test_chunked_figures_take_the_gaps_that_overlap_the_long_prompts_wait():
    # Two streams, a chunk every 0.1 s but for one stall of 1 s while the long prompt is prefilled.
    one = Sample(200, 2.0, sent_at=10.0, chunk_times=[0.1, 0.2, 0.3, 0.4, 0.5, 1.5, 1.6])
    two = Sample(200, 2.0, sent_at=10.05, chunk_times=[0.1, 0.2, 0.3, 0.4, 0.5, 1.5, 1.6])
    figures = chunked_figures([one, two], window=(10.47, 11.45))  # the long prompt's send .. first token
    assert figures["gaps"] == 12
    # In the window: each stream's stall and the gap before it (10.4-10.5 and 10.45-10.55 end after 10.47).
    assert figures["window_gaps"] == 4
    assert figures["window_itl_p99_s"] == pytest.approx(1.0) and figures["window_itl_median_s"] == pytest.approx(0.55)
    assert figures["outside_itl_median_s"] == pytest.approx(0.1)
    assert figures["window_p99_over_median"] == pytest.approx(10.0)
    assert figures["itl_median_s"] == pytest.approx(0.1) and figures["stream_p99_over_median"] == pytest.approx(10.0)
    # A window that covers the streams but for two near-zero gaps: the median of all gaps, not of those two.
    burst = Sample(200, 2.0, sent_at=20.0, chunk_times=[0.1, 0.1001, 0.1002, 0.4, 0.7, 1.0, 1.3, 1.6, 1.9, 2.2])
    covered = chunked_figures([burst], window=(20.11, 22.3))
    assert covered["window_gaps"] == 7 and covered["outside_itl_median_s"] == pytest.approx(0.3)
    assert covered["window_p99_over_median"] == pytest.approx(1.0)
    # Once a stream has ended, the other's passes are cheaper: those gaps are no denominator.
    long = Sample(200, 2.0, sent_at=30.0, chunk_times=[0.1 * k for k in range(1, 12)] + [1.1 + 0.02 * k for k in range(1, 41)])
    short = Sample(200, 2.0, sent_at=30.0, chunk_times=[0.1 * k for k in range(1, 12)])
    ended = chunked_figures([long, short], window=(30.45, 30.75))
    assert ended["outside_gaps"] == 12 and ended["outside_itl_median_s"] == pytest.approx(0.1)
    assert ended["itl_median_s"] == pytest.approx(0.02) and ended["window_p99_over_median"] == pytest.approx(1.0)
    assert chunked_figures([one], None)["window_gaps"] == 0
    assert chunked_figures([], (0.0, 1.0))["window_p99_over_median"] is None


# -- _one against a canned stream --------------------------------------------------------------------------


def run_one(events: list[str], status: int = 200) -> Sample:
    async def main() -> Sample:
        def handler(request: httpx.Request) -> httpx.Response:
            assert json.loads(request.content)["proposer"] == "ngram"
            return httpx.Response(status, content="".join(f"data: {e}\n\n" for e in events).encode())

        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            return await loadtest._one(client, {"prompt": "p", "proposer": "ngram"})

    return asyncio.run(main())


def chunk(text: str | None, finish: str | None = None) -> str:
    return json.dumps({"choices": [{"index": 0, "text": text or "", "finish_reason": finish}]})


def test_one_records_every_text_chunk_and_reads_usage_defensively():
    usage = {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45, "prompt_tokens_details": {"cached_tokens": 32}}
    s = run_one([chunk("a"), chunk("bc"), chunk(""), chunk("d"), chunk(None, "length"), json.dumps({"choices": [], "usage": usage}), "[DONE]"])
    assert s.status == 200 and s.error is None
    assert len(s.chunk_times) == 3 and s.chunk_times == sorted(s.chunk_times) and s.ttft_s == s.chunk_times[0]
    assert s.tokens == 5 and s.prompt_tokens == 40 and s.cached_tokens == 32
    # No prompt_tokens_details: no cached tokens; no usage at all: the text chunks are counted.
    s = run_one([chunk("a"), json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}), "[DONE]"])
    assert s.cached_tokens is None and s.prompt_tokens == 3
    assert run_one([chunk("a"), chunk("b"), "[DONE]"]).tokens == 2
    # An answer that starts with EOS has no text, but its first chunk still marks its first token.
    s = run_one([chunk(None, "stop"), "[DONE]"])
    assert s.ttft_s is None and s.first_chunk_s is not None and s.tokens == 0


def test_one_reports_refusals_and_in_band_errors():
    s = run_one([], status=503)
    assert s.status == 503 and s.tokens == 0 and s.chunk_times == []
    s = run_one([chunk("a"), json.dumps({"error": {"code": "deadline_exceeded", "message": "late"}}), "[DONE]"])
    assert s.status == 200 and s.error == "deadline_exceeded"


# -- end to end ---------------------------------------------------------------------------------------------


def test_table_against_servers_it_starts(tiny_models, tmp_path):
    """The whole command on the tiny models: one interleaved server, two levels, two proposers,
    both scenarios shrunk to fit the tiny models' 512-position window."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 8)
    out, markdown = tmp_path / "table.json", tmp_path / "table.md"
    result = run_verispec(
        "loadtest", "--table", "--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"],
        "--prompts", str(prompts), "--levels", "1,2", "--requests", "2", "--max-tokens", "8", "--warmup", "1",
        "--proposers", "none,ngram", "--schedulers", "interleaved", "--prefix-tokens", "150", "--long-tokens", "300",
        "--out", str(out), "--markdown", str(markdown),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    cells = report["cells"]
    assert [(c["concurrency"], c["proposer"], c["scheduler"]) for c in cells] == [
        (1, "none", "interleaved"), (1, "ngram", "interleaved"), (2, "none", "interleaved"), (2, "ngram", "interleaved")
    ]
    for c in cells:
        s = c["summary"]
        assert s["requests"] == s["ok"] == 2 and c["failures"] is None, c
        assert s["tokens_per_s"] > 0 and s["ttft_p50_s"] > 0
        for sample in c["samples"]:  # usage counted the tokens; every text chunk has its arrival time
            assert 1 <= len(sample["chunk_times"]) <= sample["tokens"] <= 8
    (prefix,), (chunked,) = report["scenarios"]["prefix"], report["scenarios"]["chunked"]
    assert prefix["ok"] and len(prefix["rounds"]) == 3 and prefix["median_ttft_ratio"] > 0
    assert all(100 <= r["prompt_tokens_a"] <= 512 for r in prefix["rounds"])
    assert chunked["ok"] and 200 <= chunked["long_prompt_tokens"] <= 512 - 8 and chunked["gaps"] > 0
    table = markdown.read_text()
    assert table.startswith("## verispec loadtest --table: llama") and table in result.stdout + "\n"
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 4 and all(row.endswith("| 2/2 |") for row in rows)
    assert "### summary" in table and "prefix, interleaved: median TTFT A / TTFT B" in table
    assert "loadtest: 1 server(s) ready" in result.stderr


def test_table_reports_a_server_that_does_not_start(tmp_path):
    result = run_verispec("loadtest", "--table", "--target", str(tmp_path / "absent"), "--proposers", "none",
                          "--schedulers", "interleaved", "--levels", "1")
    assert result.returncode == 2
    assert "the interleaved server exited" in result.stderr and "does not exist" in result.stderr
    kept = re.search(r"server logs kept in (\S+)", result.stderr)
    assert kept and "does not exist" in (Path(kept.group(1)) / os.listdir(kept.group(1))[0]).read_text()
    shutil.rmtree(kept.group(1))
