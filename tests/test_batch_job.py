"""`verispec batch`: the OpenAI Batch API's file format in and out, the server's own checks and
response shapes, greedy output equal to the engine's own, and resuming a job killed at any moment
(locally and on a Ray cluster) to the same output as an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import run_verispec
from verispec.cli import main
from verispec.config import SamplingParams, load_settings
from verispec.errors import UserError
from verispec.offline.jsonl import parse_line, resume

JOB_SIZE = 300


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Jobs run on one thread: the tiny models gain nothing from two, and on a busy 2-core machine
    each pass of a second OpenMP thread waiting for a core turns milliseconds into tens of them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def words(i: int, count: int = 12) -> str:
    """A prompt in the tiny tokenizer's words."""
    return " ".join(f"t{(i * 7 + j * 3) % 60 + 1}" for j in range(count))


def request(custom_id: str, body: dict, url: str = "/v1/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "gpt-4o-mini", **body}})


def model_flags(tiny_models, *extra: str) -> list[str]:
    return ["--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"], "--kv-cache-memory", "16MiB", *extra]


def read_results(path: Path) -> dict[str, dict]:
    """Result lines by custom_id; each custom_id exactly once."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)), "a custom_id answered twice"
    return {line["custom_id"]: line for line in lines}


def comparable(results: dict[str, dict], speculation: bool = True) -> dict[str, dict]:
    """Results as another run must reproduce them: everything but the `created` timestamps (and,
    where speculation is free to differ, its statistics)."""
    out = {}
    for custom_id, line in results.items():
        line = json.loads(json.dumps(line))
        line["response"]["body"].pop("created", None)
        if not speculation:
            line["response"]["body"].pop("speculation_stats", None)
        out[custom_id] = line
    return out


def in_process(*args: str) -> int:
    """The command in this process, whose imports are done (seconds saved), on one thread as
    `one_thread` runs the subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(list(args))
    finally:
        torch.set_num_threads(threads)


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


# -- the format, table tests of pure functions -------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "custom_id", "param"),
    [
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}', "a", None),
        (b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}', "a", None),  # method defaults to POST
        (b'{"custom_id": "a", ', "line-7", None),
        (b"\xff\xfe", "line-7", None),
        (b"[1, 2]", "line-7", None),
        (b'{"custom_id": 5, "url": "/v1/completions", "body": {}}', "line-7", "custom_id"),
        (b'{"custom_id": "", "url": "/v1/completions", "body": {}}', "line-7", "custom_id"),
        (b'{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}', "a", "method"),
        (b'{"custom_id": "a", "url": "/v1/embeddings", "body": {}}', "a", "url"),
        (b'{"custom_id": "a", "url": "/v1/completions", "body": "hi"}', "a", "body"),
    ],
)
def test_parse_line(raw: bytes, custom_id: str, param: str | None):
    line = parse_line(7, raw)
    assert line.custom_id == custom_id
    if custom_id == "a" and param is None:
        assert line.problem is None
    else:
        assert line.problem.status == 400 and line.problem.param == param


def test_resume_cuts_a_partial_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = '{"custom_id": "a"}\n{"custom_id": "b"}\n'
    out.write_text(whole + '{"custom_id": "c", "resp')
    assert resume(out) == {"a", "b"}
    assert out.read_text() == whole
    assert resume(tmp_path / "missing.jsonl") == set()
    out.write_text('{"custom_id": "a"}\nnot a result\n')
    with pytest.raises(UserError, match="line 2 is not a batch result line"):
        resume(out)


def test_duplicate_ids_refuse_the_job(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([request("a", {"prompt": "t1"}), request("b", {"prompt": "t2"}), request("a", {"prompt": "t3"}),
                              request("b", {"prompt": "t4"})]) + "\n")  # fmt: skip
    assert main(["batch", str(src), "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "2 custom_id(s) appear more than once" in err and "'a' on lines 1, 3" in err and "'b' on lines 2, 4" in err
    assert not (tmp_path / "out.jsonl").exists()
    assert main(["batch", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out.jsonl")]) == 2
    assert "input file" in capsys.readouterr().err


# -- a job: shapes, refusals and greedy output -----------------------------------------------------------


def test_mixed_file(tiny_models, tmp_path):
    lines = [
        request("g0", {"prompt": words(0), "max_tokens": 6, "temperature": 0}),
        request("g1", {"prompt": words(1), "max_tokens": 9, "temperature": 0}),
        "",  # blank lines are skipped; line numbers still count them
        request("g2", {"prompt": words(2), "max_tokens": 12, "temperature": 0}),
        request("ids", {"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0, "speculation_stats": True}),
        request("default-max", {"prompt": words(3), "temperature": 0}),
        request("chat", {"messages": [{"role": "user", "content": "t1 t2"}]}, url="/v1/chat/completions"),
        '{"custom_id": "broken", ',
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "t1"}}),
        request("bad-body", {"prompt": "t1", "max_tokens": -1}),
        request("bad-url", {"input": "t1"}, url="/v1/embeddings"),
        request("too-long", {"prompt": " ".join(["t3"] * 600)}),
        request("n2", {"prompt": "t4", "n": 2}),
    ]
    src, out, summary = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "summary.json"
    src.write_text("\n".join(lines) + "\n")
    args = ["batch", str(src), "--output", str(out), "--summary", str(summary), "--max-new-tokens", "7", *model_flags(tiny_models)]
    done = run_verispec(*args)
    assert done.returncode == 0, done.stderr
    assert "12 requests: 5 ok, 7 failed, 0 skipped" in done.stderr

    results = read_results(out)
    assert set(results) == {"g0", "g1", "g2", "ids", "default-max", "chat", "line-8", "line-9", "bad-body", "bad-url",
                            "too-long", "n2"}  # fmt: skip
    for custom_id, line in results.items():
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["id"] == "batch_req_" + hashlib.sha256(custom_id.encode()).hexdigest()[:24]
        assert set(line["response"]) == {"status_code", "request_id", "body"}

    from verispec.assemble import build_engine

    engine = build_engine(load_settings({"target": tiny_models["llama"], "draft": tiny_models["llama-draft"]}))
    expected = {"g0": (words(0), 6), "g1": (words(1), 9), "g2": (words(2), 12), "ids": ([5, 6, 7], 5), "default-max": (words(3), 7)}
    for custom_id, (prompt, max_tokens) in expected.items():
        reference = engine.generate(prompt, SamplingParams(max_new_tokens=max_tokens), depth=0)  # verifier-only, greedy
        response = results[custom_id]["response"]
        body = response["body"]
        assert response["status_code"] == 200
        assert set(body) == {"id", "object", "created", "model", "choices", "usage"} | ({"speculation_stats"} if custom_id == "ids" else set())
        assert body["object"] == "text_completion" and body["model"] == "llama"
        assert body["id"] == "cmpl-" + response["request_id"]
        (choice,) = body["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
        assert choice["text"] == reference.text and choice["finish_reason"] == reference.finish_reason
        assert body["usage"]["completion_tokens"] == len(reference.token_ids)
        assert body["usage"]["prompt_tokens"] == (3 if custom_id == "ids" else 12)

    refused = {"chat": ("messages", "no_chat_template"), "line-8": (None, None), "line-9": ("custom_id", None),
               "bad-body": ("max_tokens", None), "bad-url": ("url", None), "too-long": ("prompt", "context_length_exceeded"),
               "n2": ("n", None)}  # fmt: skip
    for custom_id, (param, code) in refused.items():
        response = results[custom_id]["response"]
        assert response["status_code"] == 400
        assert set(response["body"]) == {"error"}
        error = response["body"]["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), custom_id

    figures = json.loads(summary.read_text())
    assert figures["requests"] == {"total": 12, "ok": 5, "failed": 7, "skipped": 0}
    assert figures["completion_tokens"] == sum(results[c]["response"]["body"]["usage"]["completion_tokens"] for c in expected)
    assert figures["settings"]["runner"] == "batched" and figures["speedup_vs_verifier_only"] > 0

    # Without the batched core (the transformers backend, --scheduler interleaved): the same answers.
    interleaved = tmp_path / "interleaved.jsonl"
    assert in_process(*args[:2], "--output", str(interleaved), *args[4:], "--scheduler", "interleaved") == 0
    assert comparable(read_results(interleaved), speculation=False) == comparable(results, speculation=False)
    assert json.loads(summary.read_text())["settings"]["runner"] == "interleaved"

    before = out.read_text()
    again = run_verispec(*args)  # nothing left to do: no model loads, the output stays as it is
    assert again.returncode == 0, again.stderr
    assert out.read_text() == before
    assert json.loads(summary.read_text())["requests"] == {"total": 12, "ok": 0, "failed": 0, "skipped": 12}


# -- resuming a killed job ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_job(tiny_models, tmp_path_factory):
    """A few hundred short requests, a fifth of them sampled with a seed, and an uninterrupted
    run's results. A fixed depth: with depth auto a sampled request's depth would follow step
    costs measured per process, and its random draws with it."""
    root = tmp_path_factory.mktemp("batch-job")
    src = root / "in.jsonl"
    lines = []
    for i in range(JOB_SIZE):
        sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 1000 + i} if i % 5 == 0 else {"temperature": 0}
        lines.append(request(f"req-{i}", {"prompt": words(i, 6 + i % 7), "max_tokens": 4 + i % 5, **sampled}))
    src.write_text("\n".join(lines) + "\n")
    flags = model_flags(tiny_models, "--depth", "3", "--max-running", "4")
    out = root / "uninterrupted.jsonl"
    assert in_process("batch", str(src), "--output", str(out), *flags) == 0
    results = read_results(out)
    assert len(results) == JOB_SIZE and all(r["response"]["status_code"] == 200 for r in results.values())
    return {"input": src, "flags": flags, "results": comparable(results)}


def kill_midway(args: list[str], output: Path, log: Path, at_least: int) -> int:
    """Start the job, SIGKILL it once `output` holds `at_least` lines (polling the file), and
    return how many complete lines it left."""
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "verispec.cli", *args], stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 240
            while complete_lines(output) < at_least:
                assert process.poll() is None, f"the job ended before it was killed:\n{log.read_text()}"
                assert time.monotonic() < deadline, "the job wrote no lines in time"
                time.sleep(0.002)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    left = complete_lines(output)
    assert left < JOB_SIZE, "the job finished before it was killed: nothing to resume"
    return left


def resume_after_kill(big_job, tmp_path: Path, extra: list[str], at_least: int) -> None:
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    args = ["batch", str(big_job["input"]), "--output", str(out), "--summary", str(summary), *big_job["flags"], *extra]
    left = kill_midway(args, out, tmp_path / "killed.log", at_least)
    with out.open("a") as f:  # as a write cut short by the kill leaves it
        f.write('{"id":"batch_req_0123","custom_id":"req-')
    done = run_verispec(*args)
    assert done.returncode == 0, done.stderr
    figures = json.loads(summary.read_text())
    assert figures["requests"] == {"total": JOB_SIZE, "ok": JOB_SIZE - left, "failed": 0, "skipped": left}
    assert comparable(read_results(out)) == big_job["results"]


def test_resume_after_kill(big_job, tmp_path):
    resume_after_kill(big_job, tmp_path, [], at_least=10)


def test_ray_resume_after_kill(big_job, ray_cluster, tmp_path):
    extra = ["--ray", "--ray-address", ray_cluster, "--workers", "2", "--actor-cpus", "0.5", "--ray-batch-size", "20"]
    resume_after_kill(big_job, tmp_path, extra, at_least=1)
