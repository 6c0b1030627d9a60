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
from verispec.offline.jsonl import changed, describe_changed, forget, parse_line, resume

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
    """Result lines by custom_id (`line-N` for line N naming none); each custom_id exactly once."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [line["custom_id"] if line["custom_id"] is not None else f"line-{line['line']}" for line in lines]
    assert len(ids) == len(set(ids)), "a custom_id answered twice"
    return dict(zip(ids, lines, strict=True))


def comparable(results: dict[str, dict], speculation: bool = True) -> dict[str, dict]:
    """Results as another run must reproduce them: everything but the `created` timestamps (and,
    where speculation is free to differ, its statistics)."""
    out = {}
    for custom_id, line in results.items():
        line = json.loads(json.dumps(line))
        line["response"]["body"].pop("created", None)
        if not speculation:
            line["response"]["body"].pop("speculation_stats", None)
            for choice in line["response"]["body"].get("choices", ()):  # the tiny float32 model runs on torch's
                if choice.get("logprobs"):  # matmul, whose last bits follow the pass's width: values compared apart
                    lp = choice["logprobs"]
                    del lp["token_logprobs"]
                    lp["top_logprobs"] = [None if t is None else sorted(t) for t in lp["top_logprobs"]]
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
        (b'{"custom_id": "a", ', None, None),  # no custom_id: the line is named by its number
        (b"\xff\xfe", None, None),
        (b"[1, 2]", None, None),
        (b'{"custom_id": 5, "url": "/v1/completions", "body": {}}', None, "custom_id"),
        (b'{"custom_id": "", "url": "/v1/completions", "body": {}}', None, "custom_id"),
        (b'{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}', "a", "method"),
        (b'{"custom_id": "a", "url": "/v1/embeddings", "body": {}}', "a", "url"),
        (b'{"custom_id": "a", "url": "/v1/completions", "body": "hi"}', "a", "body"),
    ],
)
def test_parse_line(raw: bytes, custom_id: str | None, param: str | None):
    line = parse_line(7, raw)
    assert line.custom_id == custom_id and line.key == (custom_id or 7)
    if custom_id == "a" and param is None:
        assert line.problem is None
    else:
        assert line.problem.status == 400 and line.problem.param == param


def test_resume_cuts_a_partial_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = '{"custom_id": "a"}\n{"custom_id": "b"}\n'
    out.write_text(whole + '{"custom_id": "c", "resp')
    assert resume(out) == {"a": None, "b": None}  # no request_digest: written by an older verispec
    assert out.read_text() == whole
    assert resume(tmp_path / "missing.jsonl") == {}
    out.write_text('{"custom_id": "a"}\nnot a result\n')
    with pytest.raises(UserError, match="line 2 is not a batch result line"):
        resume(out)


def test_request_digest():
    """The digest is the request's, whatever its key order and spacing; any other change counts."""
    body = {"model": "m", "prompt": "t1 t2", "max_tokens": 4, "temperature": 0}
    digest = parse_line(1, request("a", body).encode()).digest
    spaced = json.dumps({"body": dict(reversed(body.items())), "url": "/v1/completions", "custom_id": "a"}, indent=2)
    assert parse_line(9, spaced.replace("\n", " ").encode()).digest == digest
    assert parse_line(1, request("other-id", body).encode()).digest == digest
    for edit in ({"prompt": "t1 t3"}, {"max_tokens": 5}, {"temperature": 0.5}, {"model": "n"}, {"seed": 1}):
        assert parse_line(1, request("a", {**body, **edit}).encode()).digest != digest, edit
    assert parse_line(1, request("a", body, url="/v1/chat/completions").encode()).digest != digest
    assert parse_line(1, b'{"custom_id": ').digest != parse_line(1, b'{"custom_id":  ').digest


def test_changed_answers_and_forgetting_them(tmp_path):
    """Which answers are not their requests' (another digest, or none: an older verispec's line),
    and removing them leaves every other line as it was."""
    lines = [parse_line(n, raw.encode()) for n, raw in enumerate(
        [request("same", {"prompt": "t1"}), request("edited", {"prompt": "t2"}), request("old", {"prompt": "t3"}),
         "not json", request("new", {"prompt": "t4"})], 1)]  # fmt: skip
    stale = parse_line(2, request("edited", {"prompt": "t9"}).encode())
    records = [
        {"custom_id": "same", "response": {}, "request_digest": lines[0].digest},
        {"custom_id": "edited", "response": {}, "request_digest": stale.digest},
        {"custom_id": "old", "response": {}},  # no digest
        {"custom_id": None, "line": 4, "response": {}, "request_digest": lines[3].digest},
        {"custom_id": "gone", "response": {}, "request_digest": lines[0].digest},  # not in the input
    ]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = resume(out)
    assert done == {"same": lines[0].digest, "edited": stale.digest, "old": None, 4: lines[3].digest, "gone": lines[0].digest}
    redo = changed(lines, done)
    assert [line.key for line in redo] == ["edited", "old"]
    message = describe_changed(redo, done, out)
    assert "1 request(s) changed" in message and "'edited'" in message and "'same'" not in message
    assert "1 answer(s) carry no request_digest" in message and "'old'" in message and "--redo-changed" in message
    out.chmod(0o640)
    forget(out, {"edited", "old"})
    kept = [records[0], records[3], records[4]]
    assert out.read_text() == "".join(json.dumps(r) + "\n" for r in kept)
    assert out.stat().st_mode & 0o777 == 0o640 and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


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


def test_an_unreadable_line_cannot_take_a_real_custom_id(tiny_models, tmp_path):
    """Line 2 names no custom_id; line 1's real custom_id is `line-2`: two requests, two answers."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(request("line-2", {"prompt": words(0), "max_tokens": 3, "temperature": 0}) + '\n{"custom_id": \n')
    args = ["batch", str(src), "--output", str(out), *model_flags(tiny_models)]
    assert in_process(*args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_name = {(r["custom_id"], r.get("line")): r for r in records}
    assert set(by_name) == {("line-2", None), (None, 2)}
    assert by_name["line-2", None]["response"]["status_code"] == 200
    assert by_name[None, 2]["response"]["status_code"] == 400
    assert by_name["line-2", None]["id"] != by_name[None, 2]["id"]
    assert in_process(*args) == 0  # both are done: a rerun answers nothing again
    assert out.read_text().count("\n") == 2


def changed_job(tiny_models, tmp_path: Path) -> tuple[list[str], Path]:
    """A job answered, then its input edited: `b` and `c` keep their ids but ask something else,
    `a` is as it was (its keys reordered and spaced: the same request)."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bodies = {"a": {"prompt": words(0), "max_tokens": 4, "temperature": 0},
              "b": {"prompt": words(1), "max_tokens": 4, "temperature": 0},
              "c": {"prompt": words(2), "max_tokens": 4, "temperature": 0}}  # fmt: skip
    src.write_text("".join(request(custom_id, body) + "\n" for custom_id, body in bodies.items()))
    args = ["batch", str(src), "--output", str(out), "--summary", str(tmp_path / "summary.json"), *model_flags(tiny_models)]
    assert in_process(*args) == 0
    a = json.loads(request("a", bodies["a"]))
    src.write_text("\n".join([
        json.dumps(dict(reversed(a.items())), indent=None, separators=(", ", " : ")),
        request("b", {**bodies["b"], "prompt": words(5)}),
        request("c", {**bodies["c"], "max_tokens": 6}),
    ]) + "\n")  # fmt: skip
    return args, out


def test_changed_requests_are_refused_and_named(tiny_models, tmp_path, capsys):
    args, out = changed_job(tiny_models, tmp_path)
    before = out.read_text()
    capsys.readouterr()
    assert in_process(*args) == 2
    err = capsys.readouterr().err
    assert "2 request(s)" in err and "'b', 'c'" in err and "'a'" not in err and "--redo-changed" in err
    assert out.read_text() == before


def test_redo_changed_answers_them_again_once(tiny_models, tmp_path):
    args, out = changed_job(tiny_models, tmp_path)
    old = read_results(out)
    assert in_process(*args, "--redo-changed") == 0
    assert json.loads((tmp_path / "summary.json").read_text())["requests"] == {"total": 3, "ok": 2, "failed": 0, "skipped": 1}
    results = read_results(out)  # each custom_id once
    fresh = tmp_path / "fresh.jsonl"
    assert in_process(args[0], args[1], "--output", str(fresh), *args[6:]) == 0
    assert comparable(results) == comparable(read_results(fresh))
    assert results["a"] == old["a"] and results["b"] != old["b"] and results["c"] != old["c"]
    assert in_process(*args) == 0  # now every answer is the input's: nothing to redo


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
        request("n2", {"prompt": "t4", "n": 17}),
        request("n3", {"prompt": words(4), "n": 3, "temperature": 1.0, "seed": 9, "max_tokens": 5, "echo": True, "logprobs": 1}),
    ]
    src, out, summary = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "summary.json"
    src.write_text("\n".join(lines) + "\n")
    args = ["batch", str(src), "--output", str(out), "--summary", str(summary), "--max-new-tokens", "7", *model_flags(tiny_models)]
    done = run_verispec(*args)
    assert done.returncode == 0, done.stderr
    assert "13 requests: 6 ok, 7 failed, 0 skipped" in done.stderr

    results = read_results(out)
    assert set(results) == {"g0", "g1", "g2", "ids", "default-max", "chat", "line-8", "line-9", "bad-body", "bad-url",
                            "too-long", "n2", "n3"}  # fmt: skip
    for custom_id, line in results.items():
        fields = {"id", "custom_id", "response", "error", "request_digest"}
        if custom_id.startswith("line-"):  # a line naming no custom_id: named by its number
            assert line["custom_id"] is None and line["line"] == int(custom_id[5:])
            fields, named = fields | {"line"}, b"\xff" + custom_id.encode()
        else:
            named = custom_id.encode()
        assert set(line) == fields and line["error"] is None
        assert line["id"] == "batch_req_" + hashlib.sha256(named).hexdigest()[:24]
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

    n3 = results["n3"]["response"]["body"]
    assert [c["index"] for c in n3["choices"]] == [0, 1, 2]
    for i, choice in enumerate(n3["choices"]):  # choice i: the verifier-only sample of seed 9 + i, after the echoed prompt
        sample = engine.generate(words(4), SamplingParams(max_new_tokens=5, temperature=1.0, seed=9 + i), depth=0)
        assert choice["text"] == words(4) + sample.text
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"][0] is None and len(logprobs["tokens"]) == 12 + len(sample.token_ids)
    assert n3["usage"]["prompt_tokens"] == 12 and n3["usage"]["completion_tokens"] == 15

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
    assert figures["requests"] == {"total": 13, "ok": 6, "failed": 7, "skipped": 0}
    assert figures["completion_tokens"] == sum(results[c]["response"]["body"]["usage"]["completion_tokens"] for c in [*expected, "n3"])
    assert figures["settings"]["runner"] == "batched" and figures["speedup_vs_verifier_only"] > 0

    # Without the batched core (the transformers backend, --scheduler interleaved): the same answers.
    interleaved = tmp_path / "interleaved.jsonl"
    assert in_process(*args[:2], "--output", str(interleaved), *args[4:], "--scheduler", "interleaved") == 0
    assert comparable(read_results(interleaved), speculation=False) == comparable(results, speculation=False)
    for one, other in zip(read_results(interleaved)["n3"]["response"]["body"]["choices"], results["n3"]["response"]["body"]["choices"], strict=True):
        assert one["logprobs"]["token_logprobs"][0] is None and other["logprobs"]["token_logprobs"][0] is None
        assert one["logprobs"]["token_logprobs"][1:] == pytest.approx(other["logprobs"]["token_logprobs"][1:], abs=1e-5)
    assert json.loads(summary.read_text())["settings"]["runner"] == "interleaved"

    before = out.read_text()
    again = run_verispec(*args)  # nothing left to do: no model loads, the output stays as it is
    assert again.returncode == 0, again.stderr
    assert out.read_text() == before
    assert json.loads(summary.read_text())["requests"] == {"total": 13, "ok": 0, "failed": 0, "skipped": 13}


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
