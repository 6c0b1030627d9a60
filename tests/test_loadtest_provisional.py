"""`verispec loadtest --provisional`: `_one` against canned streams with named events (drafts and
verdicts beside the verified chunks), the summary's provisional figures and the report that shows
them, the opt-in in the requests, and the refusal with --table. No server, no model."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import pytest

from verispec.errors import UserError
from verispec.prompts import Prompt
from verispec.tools import loadtest
from verispec.tools.loadtest import Phase, Sample, summarize


def chunk(text: str | None, finish: str | None = None) -> str:
    return f"data: {json.dumps({'choices': [{'index': 0, 'text': text or '', 'finish_reason': finish}]})}\n\n"


def named(name: str, body: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(body)}\n\n"


def draft(round_: int, token_ids: list[int], text: str = "draft") -> str:
    return named("provisional", {"id": "c", "round": round_, "token_ids": token_ids, "text": text})


def verdict(round_: int, proposed: int, accepted: int) -> str:
    return named("verdict", {"id": "c", "round": round_, "proposed": proposed, "accepted": accepted})


def run_one(events: list[str], gap_s: float = 0.01) -> Sample:
    """`_one` over a stream that sends `events` `gap_s` apart, as a server does round by round."""

    async def body():
        for e in events:
            await asyncio.sleep(gap_s)
            yield e.encode()

    async def main() -> Sample:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body()))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await loadtest._one(client, {"prompt": "p", "stream": True, "provisional": True})

    return asyncio.run(main())


def test_the_first_draft_is_timed_and_named_events_are_never_chunks():
    # A named event whose data looks like a text chunk: still not a chunk (the name decides).
    lookalike = named("other", {"choices": [{"index": 0, "text": "not verified"}]})
    s = run_one([draft(0, [], ""), lookalike, draft(0, [5, 6, 7]), verdict(0, 3, 1), chunk("ab"),
                 draft(1, [8, 9]), verdict(1, 2, 2), chunk("cd"), chunk(None, "length"), "data: [DONE]\n\n"])  # fmt: skip
    assert s.status == 200 and s.error is None
    assert len(s.chunk_times) == 2 and s.tokens == 2  # no usage: the two text chunks are counted, nothing else
    assert s.provisional_s is not None and s.ttft_s is not None
    # The empty draft (event 1) shows nothing: the first draft with tokens is event 3, the first text event 5.
    assert 0.025 < s.provisional_s < s.ttft_s
    assert s.ttft_s - s.provisional_s > 0.015


def test_a_stream_without_drafts_has_no_provisional_time():
    s = run_one([chunk("a"), chunk("b"), "data: [DONE]\n\n"], gap_s=0)
    assert s.provisional_s is None and s.tokens == 2 and s.ttft_s is not None


def test_an_in_band_error_after_drafts_is_still_reported():
    error = f"data: {json.dumps({'error': {'code': 'deadline_exceeded', 'message': 'late'}})}\n\n"
    s = run_one([draft(0, [1]), verdict(0, 1, 1), chunk("a"), error, "data: [DONE]\n\n"], gap_s=0)
    assert s.error == "deadline_exceeded" and s.provisional_s is not None


# -- the summary and the report ---------------------------------------------------------------------------


def samples() -> list[Sample]:
    return [
        Sample(200, 1.0, ttft_s=0.20, tokens=4, provisional_s=0.05),
        Sample(200, 1.0, ttft_s=0.40, tokens=4, provisional_s=0.15),
        Sample(200, 1.0, ttft_s=0.30, tokens=4),  # no draft came (e.g. depth 0 under load)
        Sample(200, 1.0, ttft_s=9.0, provisional_s=0.01, error="internal_error"),  # failed: left out
    ]


def test_summary_sets_provisional_beside_verified_only_when_asked():
    s = summarize("x", [Phase("x", 2.0, samples())], provisional=True)
    assert s["provisional_streams"] == 2 and s["ok"] == 3
    assert s["provisional_p50_s"] == pytest.approx(0.10) and s["provisional_p90_s"] == pytest.approx(0.14)
    assert s["ttft_p50_s"] == pytest.approx(0.30) and s["ttft_p90_s"] == pytest.approx(0.38)
    assert s["provisional_over_ttft_p50"] == pytest.approx(0.10 / 0.30)
    assert s["provisional_over_ttft_p90"] == pytest.approx(0.14 / 0.38)
    plain = summarize("x", [Phase("x", 2.0, samples())])
    assert not any(k.startswith("provisional") or k == "ttft_p90_s" for k in plain)  # without it, nothing changes


def test_the_report_shows_both_times_and_their_ratio(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per row, whatever the terminal
    results = [summarize("speculative", [Phase("speculative", 2.0, samples())], provisional=True),
               summarize("verifier-only", [Phase("verifier-only", 2.0, samples()[2:3])], provisional=True)]  # fmt: skip
    report = {"model": "m", "concurrency": 1, "requests_per_configuration": 3, "max_tokens": 8, "provisional": True,
              "results": results}  # fmt: skip
    loadtest.print_report(report)
    out = capsys.readouterr().out
    assert "provisional p50 s" in out and "verified p50 s" in out and "provisional / verified" in out
    row = next(line for line in out.splitlines() if "speculative" in line and "2/3" in line)
    for figure in ("0.100", "0.140", "0.300", "0.380", "0.33x", "0.37x"):
        assert figure in row, (figure, row)
    row = next(line for line in out.splitlines() if "verifier-only" in line and "0/1" in line)
    assert "-" in row  # no drafts: no figure, no ratio
    report.pop("provisional")
    for r in results:
        r.pop("provisional_p50_s")  # a plain report never reads the provisional figures
    loadtest.print_report(report)
    assert "provisional" not in capsys.readouterr().out


# -- the requests opt in; --table refuses ----------------------------------------------------------------


def fake_server(bodies: list[dict]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/readyz":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        body = json.loads(request.content)
        bodies.append(body)
        drafts = [draft(0, [1, 2]), verdict(0, 2, 1)] if body.get("provisional") else []
        return httpx.Response(200, content="".join([*drafts, chunk("a"), "data: [DONE]\n\n"]).encode())

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("provisional", [True, False])
def test_the_requests_opt_in_with_the_flag_only(monkeypatch, provisional):
    bodies: list[dict] = []
    transport = fake_server(bodies)
    real = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real(transport=transport, **kw))
    prompts = [Prompt("a", "def f("), Prompt("b", "import ")]
    report = asyncio.run(loadtest.loadtest("http://x", prompts, 1, 2, 8, None, False, 1, 0, 5.0, provisional))
    assert len(bodies) == 2 and all(b.get("provisional") is (True if provisional else None) for b in bodies)
    assert report.get("provisional") is (True if provisional else None)
    result = report["results"][0]
    if provisional:
        assert result["provisional_streams"] == 2 and result["provisional_p50_s"] < result["ttft_p50_s"]
    else:
        assert "provisional_p50_s" not in result


def test_table_refuses_provisional():
    parser = argparse.ArgumentParser()
    loadtest.add_loadtest_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["loadtest", "--table", "--provisional"])
    with pytest.raises(UserError, match="--provisional and --table"):
        args.run(args)
