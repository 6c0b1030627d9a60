"""`verispec distill` on tiny random models: the verifier's batched greedy decoding is each prompt's
own and the engine's, the loss falls, agreement rises, a run resumes, the result loads, bad input
is refused."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from tests.conftest import llama, make_engine, random_prompts, save, write_prompts
from verispec.cli import settings_from
from verispec.config import SamplingParams
from verispec.errors import UserError
from verispec.models import load_model, load_tokenizer
from verispec.models.kernels import kernel_library
from verispec.prompts import load_prompts, stdlib_windows
from verispec.training.distill import (
    DistillSettings,
    add_distill_command,
    agreement,
    distill,
    greedy,
    kd_loss,
    split_prompts,
)

QUIET = lambda line: None  # noqa: E731


def config(models: dict[str, str], out: Path, prompts: Path, **overrides) -> DistillSettings:
    fields = dict(
        target=models["llama"],
        draft=models["llama-draft"],
        out=out,
        prompts=prompts,
        no_eval=True,
        steps=24,
        batch_size=8,
        seq_len=48,
        max_new_tokens=16,
        lr=3e-3,
        checkpoint_every=8,
        eval_new_tokens=16,
    )
    return DistillSettings(**{**fields, **overrides})


@pytest.fixture(scope="module")
def exact_models(tmp_path_factory) -> dict[str, str]:
    """A target whose weights 16 bits hold exactly: on the CPU kernel step, where batching is exact."""
    from tests.test_batching import exact_pair

    return exact_pair(tmp_path_factory.mktemp("distill-exact"), seed=5)


@pytest.mark.parametrize(
    "model, backend",
    [("exact-llama", "auto"), ("llama", "auto"), ("gpt2", "auto"), ("llama", "transformers")],
    ids=["lean-kernel-batched", "lean-torch-batched", "lean-gpt2-one-by-one", "transformers-one-by-one"],
)
def test_batched_greedy_is_each_prompts_own_and_the_engines_verifier_only_output(
    tiny_models, exact_models, model, backend
):
    """The verifier's continuations distill trains and evaluates on: prompts of different lengths
    decoded together, token for token each prompt decoded alone and `verispec generate --depth 0`."""
    path = exact_models["target"] if model == "exact-llama" else tiny_models[model]
    lm = load_model(path, torch.device("cpu"), torch.float32, backend=backend)
    if model == "exact-llama" and not lm.kernel_step:
        pytest.skip("no CPU kernel step here (no C compiler or no AVX2/FMA/F16C)")
    vocab = 96 if model == "exact-llama" else 64
    prompts = random_prompts(8, vocab, seed=4, min_len=1, max_len=30)
    assert len({len(p) for p in prompts}) > 4  # rows of many lengths share each pass
    eos = frozenset({0})
    together = greedy(lm, prompts, 20, eos, top_k=4)
    alone = [greedy(lm, [p], 20, eos)[0].tokens for p in prompts]
    engine = make_engine(path, proposer="none", backend=backend, depth=0)
    reference = [
        engine.generate(p, SamplingParams(max_new_tokens=20, temperature=0.0)).token_ids for p in prompts
    ]
    # Bit-exact on the kernel step and one sequence per pass; on the lean torch pass (float32 weights)
    # up to the rounding of batched matrix products, which flips no token of these fixed models.
    assert [d.tokens for d in together] == alone == reference
    for decoded in together:
        assert decoded.top_ids.shape == (len(decoded.tokens), 4)
        assert decoded.top_ids[:, 0].tolist() == decoded.tokens  # column 0 is the chosen token
        assert all(t != 0 for t in decoded.tokens[:-1])  # nothing past an EOS


@pytest.fixture(scope="module")
def distilled(tiny_models, tmp_path_factory) -> dict:
    """One short on-policy run on prompts whose last 4 are held out for its evaluation, then
    agreement measured on its training prompts too, before and after."""
    root = tmp_path_factory.mktemp("distill")
    prompts = write_prompts(root / "prompts.jsonl", 20)
    report = distill(
        config(tiny_models, root / "out", prompts, no_eval=False, eval_prompts=prompts, eval_limit=4),
        log=QUIET,
    )
    tokenizer = load_tokenizer(tiny_models["llama"])
    train_ids = [tokenizer(p.text).input_ids for p in load_prompts(prompts)[:-4]]
    verifier = load_model(tiny_models["llama"], torch.device("cpu"), torch.float32)
    continuations = [d.tokens for d in greedy(verifier, train_ids, 16, eos=frozenset({0}))]
    for name, draft in (("train_before", tiny_models["llama-draft"]), ("train_after", report["final"])):
        report[name] = agreement(draft, train_ids, continuations, torch.device("cpu"))["agreement"]
    return report


def test_distillation_lowers_the_loss_and_raises_agreement(distilled):
    training = distilled["training"]
    assert training["steps"] == 24
    assert training["last_loss"] < 0.8 * training["first_loss"]
    assert distilled["teacher"]["mode"] == "on-policy"
    assert distilled["train_after"] > distilled["train_before"] + 0.1
    assert "last 4 prompts are held out" in distilled["data"]
    assert distilled["before"]["prompts"] == distilled["after"]["prompts"] == 4
    assert distilled["teacher"]["examples"] == 16
    written = json.loads((Path(distilled["final"]).parent / "eval.json").read_text())
    assert written["after"]["agreement"] == distilled["after"]["agreement"]
    assert written["cpu_s"] > 0


def test_final_folder_loads_as_a_draft(distilled, tiny_models):
    final = Path(distilled["final"])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (final / name).is_file()
    # float16 by default: the weights a 16-bit kernel step takes as they are
    assert all(t.dtype == torch.float16 for t in load_file(final / "model.safetensors").values())
    draft = load_model(str(final), torch.device("cpu"), torch.float32, role="draft")
    logits = draft.session().extend([1, 2, 3])
    assert logits.shape == (3, 64)
    if kernel_library() is not None:
        assert draft.kernel_step, draft.path_report()


def test_resume_after_an_interruption_reaches_the_same_step_and_weights(tiny_models, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 8)
    whole = distill(
        config(tiny_models, tmp_path / "whole", prompts, steps=6, checkpoint_every=2, batch_size=4), log=QUIET
    )

    def interrupt(step: int) -> None:
        if step == 3:  # one step past the checkpoint at 2: that step is lost and redone
            raise KeyboardInterrupt

    cut = config(tiny_models, tmp_path / "cut", prompts, steps=6, checkpoint_every=2, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        distill(cut, log=QUIET, on_step=interrupt)
    assert (tmp_path / "cut" / "checkpoints" / "step-000002" / "trainer.pt").is_file()
    with pytest.raises(UserError, match="--resume"):
        distill(cut, log=QUIET)
    resumed = distill(cut.model_copy(update={"resume": True}), log=QUIET)
    assert resumed["training"]["steps"] == whole["training"]["steps"] == 6
    a, b = (
        load_file(Path(whole["final"]) / "model.safetensors"),
        load_file(Path(resumed["final"]) / "model.safetensors"),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(UserError, match="lr"):  # a resumed run must be the same run
        distill(cut.model_copy(update={"resume": True, "lr": 1e-2}), log=QUIET)


def test_training_prompts_equal_to_evaluation_prompts_are_left_out(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    evaluation = tmp_path / "e.jsonl"
    evaluation.write_text("".join(prompts.read_text().splitlines(keepends=True)[4:]))
    cfg = DistillSettings(target="t", draft="d", out=tmp_path, prompts=prompts, eval_prompts=evaluation)
    training, held_out, note = split_prompts(cfg)
    assert (len(training), len(held_out)) == (4, 2)
    assert "2 training prompts identical to evaluation prompts left out" in note
    copy = tmp_path / "copy.jsonl"
    copy.write_text(evaluation.read_text())
    with pytest.raises(UserError, match="every training prompt"):
        split_prompts(
            DistillSettings(target="t", draft="d", out=tmp_path, prompts=copy, eval_prompts=evaluation)
        )


def test_text_mode_distils_on_given_text(tiny_models, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": " ".join(f"t{(i * j) % 63 + 1}" for j in range(40))}) + "\n" for i in range(6)
        )
    )
    report = distill(
        config(tiny_models, tmp_path / "out", None, data=(str(data),), steps=4, seq_len=16), log=QUIET
    )
    assert report["teacher"]["mode"] == "text"
    assert report["teacher"]["positions"] == report["teacher"]["examples"] * 16


def test_kd_loss_is_zero_at_the_teacher_and_tvd_is_bounded():
    torch.manual_seed(0)
    teacher = torch.randn(5, 10)
    logp = torch.log_softmax(teacher, -1)
    top_logp, top_ids = torch.topk(logp, 4)
    assert kd_loss(teacher, top_ids, top_logp).abs().max() < 1e-5
    other = torch.randn(5, 10)
    assert (kd_loss(other, top_ids, top_logp) > 0).all()
    tvd = kd_loss(other, top_ids, top_logp, kind="tvd")
    assert ((tvd >= 0) & (tvd <= 1)).all()
    assert (kd_loss(other, top_ids, top_logp, ce_weight=1.0) > kd_loss(other, top_ids, top_logp)).all()


def test_stdlib_windows_leave_out_held_out_modules(tmp_path):
    body = "".join(f"value_{i} = {i} * 2  # a line of code long enough\n" for i in range(200))
    for name in (
        "alpha.py",
        "sched.py",
        "queue.py",
        "resources/beta.py",
        "test/gamma.py",
        "idlelib/delta.py",
        "email/shlex.py",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(body)
    windows = stdlib_windows(4, root=tmp_path)
    assert {w.id.split(":")[0] for w in windows} == {"alpha.py"}
    assert all(w.text.count("\n") == 40 for w in windows)
    with pytest.raises(UserError, match="only"):
        stdlib_windows(50, root=tmp_path)


def test_bad_input_is_a_user_error(tiny_models, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    with pytest.raises(UserError, match="does not exist"):
        distill(config(tiny_models, tmp_path / "o1", prompts, target=str(tmp_path / "missing")), log=QUIET)
    with pytest.raises(ValidationError, match="one training source"):  # refused by the settings themselves
        config(tiny_models, tmp_path / "o2", None)
    with pytest.raises(UserError, match="--data"):
        distill(config(tiny_models, tmp_path / "o3", None, data=(str(tmp_path / "nothing-*.py"),)), log=QUIET)
    with pytest.raises(ValidationError, match="steps"):
        config(tiny_models, tmp_path / "o4", prompts, steps=0)
    other = save(llama(80, layers=1, seed=5), tmp_path / "other-vocab", 80)
    with pytest.raises(UserError, match="tokenizers differ"):
        distill(config(tiny_models, tmp_path / "o5", prompts, draft=other), log=QUIET)


def test_command_line_flags(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("VERISPEC_")]:  # only what the test sets
        monkeypatch.delenv(name)
    parser = argparse.ArgumentParser()
    add_distill_command(parser.add_subparsers())
    base = ["distill", "--target", "t", "--draft", "d", "--out", "o"]

    def settings(*flags: str) -> DistillSettings:
        return settings_from(parser.parse_args([*base, *flags]), DistillSettings)

    given = settings("--stdlib-prompts", "8", "--steps", "5", "--no-eval", "--threads", "1")
    assert (given.stdlib_prompts, given.steps, given.prompts, given.resume) == (8, 5, None, False)
    assert (given.no_eval, given.threads, given.out, given.lr) == (True, 1, Path("o"), 5e-4)
    assert settings("--data", "a", "b", "--data", "c").data == ("a", "b", "c")
    with pytest.raises(UserError, match="--data: give one training source"):
        settings()
    with pytest.raises(
        UserError, match="--stdlib-prompts: give one training source, not --data and --stdlib-prompts"
    ):
        settings("--stdlib-prompts", "8", "--data", "x")
    with pytest.raises(UserError, match="--steps: must be greater than or equal to 1"):
        settings("--prompts", "p", "--steps", "0")
    with pytest.raises(UserError, match="--loss: must be 'fkl' or 'tvd'"):
        settings("--prompts", "p", "--loss", "kl")
    # one settings source: a config file, then VERISPEC_* variables, then flags
    (tmp_path / "distill.toml").write_text("steps = 7\nlr = 0.01\nbatch_size = 4\n")
    monkeypatch.setenv("VERISPEC_LR", "0.5")  # another command's variable: ignored
    monkeypatch.setenv("VERISPEC_DISTILL_LR", "0.02")
    layered = settings("--prompts", "p", "--config", str(tmp_path / "distill.toml"), "--batch-size", "2")
    assert (layered.steps, layered.lr, layered.batch_size) == (7, 0.02, 2)
    with pytest.raises(SystemExit):  # the model folders are required flags
        parser.parse_args(["distill", "--target", "t", "--stdlib-prompts", "8"])


def test_a_bad_flag_is_one_line_and_exit_2(capsys):
    from verispec.cli import main

    assert main(["distill", "--target", "t", "--draft", "d", "--out", "o", "--stdlib-prompts", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("verispec: error: --stdlib-prompts: must be greater than or equal to 1")
    assert "Traceback" not in err


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    return "postgresql://postgres@127.0.0.1:5432/test"  # a real server: .ci/run makes sure one is up


def test_distils_on_the_prompts_of_served_requests_from_the_audit_trail(tiny_models, tmp_path, audit_url):
    import uuid
    from datetime import UTC, datetime, timedelta

    from tests.test_audit_store import record
    from verispec.audit.store import AuditStore

    model = f"distill-{uuid.uuid4().hex[:8]}"  # this test's records only, in a shared database
    now = datetime.now(UTC)
    texts = [" ".join(f"t{(i * 5 + j) % 60 + 1}" for j in range(12)) for i in range(6)]
    rows = []
    for i, text in enumerate([*texts, texts[0], "sha256:" + "0" * 64, None]):  # a repeat, a hash, no content
        row = record(f"{model}-{i}", now + timedelta(seconds=i), outcome="ok" if i % 4 else "fallback")
        rows.append({**row, "model": model, "prompt": text, "output": "t1 t2"})
    rows.append({**record(f"{model}-err", now), "model": model, "prompt": "t9 t9 t9", "outcome": "error"})
    rows.append({**record(f"{model}-other", now), "model": "another-model", "prompt": "t7 t8 t9 t10"})
    store = AuditStore(audit_url)
    store.write(rows)
    store.close()

    report = distill(
        config(
            tiny_models,
            tmp_path / "out",
            None,
            audit_db=audit_url,
            audit_model=model,
            steps=4,
            checkpoint_every=4,
        ),
        log=QUIET,
    )
    assert report["data"].startswith("6 distinct prompts of served requests")
    assert report["teacher"]["examples"] == 6 and report["training"]["steps"] == 4
    assert (Path(report["final"]) / "config.json").is_file()

    with pytest.raises(UserError, match="--audit-content"):
        distill(
            config(tiny_models, tmp_path / "none", None, audit_db=audit_url, audit_model="no-such-model"),
            log=QUIET,
        )
    with pytest.raises(UserError, match="no audit database"):
        distill(
            config(tiny_models, tmp_path / "x", None, audit_db=f"sqlite:///{tmp_path / 'missing.db'}"),
            log=QUIET,
        )


def test_evaluation_falls_back_to_held_out_stdlib_text_without_the_shared_prompts(tmp_path, monkeypatch):
    import verispec.training.distill.data as module

    monkeypatch.setattr(module, "DEFAULT_EVAL_PROMPTS", tmp_path / "absent.jsonl")
    cfg = DistillSettings(target="t", draft="d", out=tmp_path, stdlib_prompts=2)
    training, evaluation, note = split_prompts(cfg)
    assert len(training) == 2 and len(evaluation) == 32 and "q/r/s" in note
    for prompt in evaluation:
        assert any(part.lower().startswith(("q", "r", "s")) for part in Path(prompt.id).parts)
