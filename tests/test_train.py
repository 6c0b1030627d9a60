"""`verispec train` on a small corpus: the tokenizer round-trips code, validation loss falls, a
target and a draft trained on one tokenizer make an exact speculative pair, a run resumes, and bad
input is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from tests.test_server import cli_generate
from verispec.errors import UserError
from verispec.models import load_tokenizer
from verispec.models.loading import check_compatible
from verispec.training.corpus import stdlib_files, stdlib_root
from verispec.training.train import TrainSettings, train_model

QUIET = lambda line: None  # noqa: E731
CORPUS = str(stdlib_root() / "json")  # ~40 KB of real Python


def tiny(out: Path, **overrides) -> TrainSettings:
    fields = dict(
        out=out,
        data=(CORPUS,),
        vocab_size=400,
        layers=2,
        hidden=32,
        heads=2,
        kv_heads=1,
        context=128,
        steps=40,
        batch_size=8,
        seq_len=48,
        lr=5e-3,
        checkpoint_every=20,
        save_dtype="float32",
    )
    return TrainSettings(**{**fields, **overrides})


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    target = train_model(tiny(root / "target"), log=QUIET)
    draft = train_model(tiny(root / "draft", layers=1, tokenizer=target["final"], steps=20), log=QUIET)
    return {"target": target, "draft": draft}


def test_validation_loss_falls(pair):
    report = pair["target"]
    assert report["validation_final"]["nats_per_token"] < report["validation_initial"]["nats_per_token"] - 1.0
    assert [v["step"] for v in report["validation"]] == [20, 40]
    assert report["training"]["steps"] == 40 and report["training"]["tokens"] == 40 * 8 * 49
    saved = json.loads((Path(report["final"]).parent / "train.json").read_text())
    assert saved["validation_final"] == report["validation_final"]


def test_the_tokenizer_round_trips_code(pair):
    tokenizer = load_tokenizer(pair["target"]["final"])
    assert len(tokenizer) == 400 and tokenizer.eos_token == "<|endoftext|>"
    text = "def f(x):\n\tif x:\n        return {'a': [1, 2]}  # é → ü\n\n\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_a_target_and_a_draft_on_one_tokenizer_make_an_exact_pair(pair):
    target, draft = pair["target"]["final"], pair["draft"]["final"]
    check_compatible(load_tokenizer(target), load_tokenizer(draft))
    for prompt in ("import json\n\ndef ", "class JSONDecoder(object):\n    "):
        expected = cli_generate(target, draft, prompt, 24, "--depth", "0")
        assert cli_generate(target, draft, prompt, 24, "--depth", "3") == expected
        assert expected  # the model produced text


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path):
    whole = train_model(tiny(tmp_path / "whole", steps=12, checkpoint_every=4), log=QUIET)

    def interrupt(step: int) -> None:
        if step == 6:
            raise KeyboardInterrupt

    cut = tiny(tmp_path / "cut", steps=12, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        train_model(cut, log=QUIET, on_step=interrupt)
    with pytest.raises(UserError, match="--resume"):
        train_model(cut, log=QUIET)
    with pytest.raises(UserError, match="lr"):
        train_model(tiny(tmp_path / "cut", steps=12, checkpoint_every=4, resume=True, lr=1e-2), log=QUIET)
    resumed = train_model(tiny(tmp_path / "cut", steps=12, checkpoint_every=4, resume=True), log=QUIET)
    assert resumed["training"]["steps"] == 12
    assert [v["step"] for v in resumed["validation"]] == [4, 8, 12]
    a = load_file(Path(whole["final"]) / "model.safetensors")
    b = load_file(Path(resumed["final"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_stdlib_corpus_leaves_the_held_out_modules_to_validation():
    training, held = stdlib_files(), stdlib_files(held_out=True)
    assert training and held and not set(training) & set(held)
    for path in held:
        assert any(p.lower().startswith(("q", "r", "s")) for p in path.relative_to(stdlib_root()).parts)
    assert not any(p.name.startswith(("q", "r", "s")) for p in training)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data": ()}, "one corpus"),
        ({"stdlib": True}, "one corpus"),
        ({"seq_len": 256}, "--context"),
        ({"hidden": 30, "heads": 4}, "multiple of --heads"),
        ({"hidden": 30}, "even head size"),
        ({"data": ("/nonexistent/x.py",)}, "no such file"),
        ({"vocab_size": 100}, "--vocab-size"),
        ({"tokenizer": "/nonexistent-model"}, "--tokenizer"),
    ],
)
def test_bad_input_is_a_user_error(tmp_path, overrides, message):
    # Refused by the settings themselves (ValidationError) or, for what only the files tell, by the run.
    with pytest.raises((ValidationError, UserError), match=message):
        train_model(tiny(tmp_path / "out", **overrides), log=QUIET)


def test_command_line(tmp_path):
    from tests.test_cli import run_verispec

    result = run_verispec("train", "--data", CORPUS, "--out", str(tmp_path / "cli"), "--vocab-size", "300", "--layers",
                          "1", "--hidden", "16", "--heads", "2", "--kv-heads", "1", "--context", "64", "--seq-len", "32",
                          "--steps", "4", "--checkpoint-every", "2", "--batch-size", "4", "--threads", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "validation:" in result.stdout and (tmp_path / "cli" / "final" / "config.json").is_file()
    result = run_verispec("train", "--stdlib", "--data", CORPUS, "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(
        "verispec: error: --stdlib: give one corpus, not --data and --stdlib together"
    )
    result = run_verispec("train", "--stdlib", "--out", str(tmp_path / "x"), "--hidden", "30", "--heads", "4")
    assert result.returncode == 2 and "--hidden: must be a multiple of --heads 4" in result.stderr


def test_flags_are_the_settings_fields(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("VERISPEC_")]:  # only what the test sets
        monkeypatch.delenv(name)
    import argparse

    from verispec.cli import settings_from
    from verispec.training.train import add_train_command

    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers())

    def settings(*flags: str) -> TrainSettings:
        return settings_from(parser.parse_args(["train", "--out", "o", *flags]), TrainSettings)

    defaults = settings("--stdlib")
    assert (defaults.vocab_size, defaults.layers, defaults.hidden, defaults.steps, defaults.lr) == (
        4096,
        4,
        256,
        1000,
        2e-3,
    )
    assert (defaults.save_dtype, defaults.device, defaults.threads, defaults.resume) == (
        "float16",
        "auto",
        None,
        False,
    )
    given = settings(
        "--data", "a", "b", "--tokenizer", "t", "--intermediate", "96", "--warmup", "3", "--resume"
    )
    assert (given.data, given.tokenizer, given.ffn(), given.warmup, given.resume) == (
        ("a", "b"),
        "t",
        96,
        3,
        True,
    )
    monkeypatch.setenv("VERISPEC_TRAIN_LAYERS", "2")
    assert settings("--stdlib").layers == 2 and settings("--stdlib", "--layers", "3").layers == 3
    with pytest.raises(UserError, match="--layers: must be greater than or equal to 1"):
        settings("--stdlib", "--layers", "0")
    with pytest.raises(UserError, match="--data: give one corpus: --data or --stdlib"):
        settings()
