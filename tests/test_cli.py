"""The `verispec` command, run as users run it: a real process, real files."""

import json

import pytest

from tests.conftest import llama, run_verispec, save, write_prompts
from verispec.config import load_settings
from verispec.core.engine import Engine
from verispec.core.rounds import Completion
from verispec.tools.check import first_difference, run_check

verispec = run_verispec


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", 4)


def test_generate_streams_text_and_stats(tiny_models):
    result = verispec(
        "generate", "--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"],
        "--max-new-tokens", "12", "--depth", "3", "--stats", "t1 t2 t3",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("t")
    assert "acceptance rate" in result.stderr and "rounds (verifier calls)" in result.stderr


def test_generate_reads_stdin_and_samples_with_ngram(tiny_models):
    # A fixed depth: under auto the depth follows step costs measured at start, which differ between
    # processes, and with it the random draws (see docs/usage.md's sampling row).
    args = ("generate", "--target", tiny_models["gpt2"], "--proposer", "ngram", "--temperature", "0.8",
            "--top-k", "20", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "10", "--depth", "3", "-")
    first, second = verispec(*args, stdin="t4 t5 t4 t5"), verispec(*args, stdin="t4 t5 t4 t5")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # the seed reproduces the output


@pytest.mark.parametrize(
    "args, message",
    [
        (("generate", "--target", "/no/such/model", "x"), "does not exist"),
        (("generate", "--proposer", "oracle", "x"), "--proposer"),
        (("generate", "--depth", "many", "x"), "--depth"),
        (("generate", "--top-p", "1.5", "x"), "--top-p"),
        (("generate", "--frobnicate", "x"), "unrecognized arguments"),
        (("generate", "   "), "prompt is empty"),
        (("check", "--prompts", "/no/such.jsonl"), "does not exist"),
        (("check", "--prompts", "x.jsonl", "--depth", ","), "--depth"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tiny_models, args, message):
    if args[0] == "generate" and "--target" not in args:
        args = (args[0], "--target", tiny_models["llama"], *args[1:])
    result = verispec(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_incompatible_pair_is_refused(tiny_models, tmp_path):
    other = save(llama(32, layers=1, seed=9), tmp_path / "other-vocab", 32)
    result = verispec("generate", "--target", tiny_models["llama"], "--draft", other, "t1")
    assert result.returncode == 2
    assert "tokenizers differ" in result.stderr and "Traceback" not in result.stderr


def test_check_passes_and_reports(tiny_models, prompts_file, tmp_path):
    report = tmp_path / "report.json"
    result = verispec(
        "check", "--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"],
        "--prompts", str(prompts_file), "--depth", "2,auto", "--max-new-tokens", "16", "--report", str(report),
    )
    assert result.returncode == 0, result.stderr
    assert "4/4" in result.stdout
    data = json.loads(report.read_text())
    assert [d["depth"] for d in data["depths"]] == [2, "auto"]
    assert all(d["identical"] == 4 and not d["mismatches"] for d in data["depths"])


def test_check_fails_on_a_mismatch(tiny_models, prompts_file, monkeypatch, capsys):
    """A broken engine (here: one that alters its speculative output) makes the check exit 1."""
    real = Engine.generate

    def broken(self, prompt, params=None, depth=None, **kwargs):
        out = real(self, prompt, params, depth, **kwargs)
        if depth == 0 or len(out.token_ids) <= 5:
            return out
        tokens = out.token_ids[:5] + [(out.token_ids[5] + 1) % 64] + out.token_ids[6:]
        return Completion(tokens, out.text, out.finish_reason, out.stats)

    monkeypatch.setattr(Engine, "generate", broken)
    settings = load_settings({"target": tiny_models["llama"], "draft": tiny_models["llama-draft"], "max_new_tokens": 16})
    assert run_check(settings, prompts_file, depths=["3"]) == 1
    assert "first difference at new token 5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "a, b, expected",
    [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([1, 2], [1, 2, 3], 2), ([], [4], 0)],
)
def test_first_difference(a, b, expected):
    assert first_difference(a, b) == expected
