"""`verispec distill`: its settings and flags, the whole run, and its report.

A run evaluates the draft, builds the teacher, trains, saves and evaluates again. Files under
--out: teacher/ (cached verifier data), eval-verifier.pt (cached verifier greedy continuations of
the evaluation prompts), checkpoints/step-N/ (draft weights, optimizer, step, RNG), final/ (the
distilled draft as a Hugging Face model folder), eval.json (before and after agreement, CPU and
wall time).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from verispec.config import AlsoNamed, command_config
from verispec.errors import UserError
from verispec.flags import add_common_flags, add_settings_flags, settings_from
from verispec.training.distill.data import SPLIT_EVAL_LIMIT, split_prompts
from verispec.training.distill.evaluation import agreement, verifier_continuations
from verispec.training.distill.loss import train
from verispec.training.distill.teacher import build_teacher
from verispec.training.loop import claim_run, finish_report, mean, save_final
from verispec.training.settings import RunSettings, add_data_flag, field_error, one_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SOURCES = ("data", "prompts", "stdlib_prompts", "audit_db")


class DistillSettings(RunSettings):
    """What `verispec distill` distils from, how it trains, and how it measures the draft."""

    model_config = command_config("distill")

    target: str = Field(description="verifier model folder (the teacher)")
    draft: str | None = Field(None, description="draft model folder to start from (same tokenizer); not with --head")
    head: bool = Field(
        False, description="train a draft head on the verifier's own features (EAGLE-style) instead of a draft model"
    )
    head_layers: int = Field(1, ge=1, description="with --head: decoder layers of the head")
    head_vocab: int = Field(
        4096, ge=2, description="with --head: draft vocabulary, the tokens the verifier chooses most often"
    )
    head_ffn: int | None = Field(None, ge=1, description="with --head: the head's MLP width (default: the verifier's)")
    head_fuse: bool = Field(
        False,
        description="with --head: also read the verifier's residual streams after three layers (low, middle, high: "
        "1, N/2-1 and N-4 of N), fused with its final feature by a linear layer (EAGLE-3)",
    )
    head_unroll: int = Field(
        3, ge=1, description="with --head: draft steps unrolled in training (each feeds on the previous one's predictions)"
    )
    feature_weight: float = Field(1.0, ge=0, description="with --head: weight of the feature regression beside cross-entropy")
    head_minutes: float | None = Field(
        None, gt=0, description="with --head: stop training after this many minutes (the head is saved as it is)"
    )
    out: Path = Field(description="output folder: cache, checkpoints, final/, eval.json")
    data: tuple[str, ...] = Field(
        (), description="text mode: JSONL files ('text'/'prompt'), folders or globs of .py files"
    )
    prompts: Path | None = Field(
        None, description="JSONL prompts; distilled on the verifier's greedy continuations"
    )
    stdlib_prompts: int | None = Field(
        None, ge=1, description="N ~40-line windows of this machine's stdlib (q/r/s modules left out)"
    )
    audit_db: str | None = Field(
        None,
        description="prompts of served requests from an audit trail (sqlite:///... or postgresql://...; content audited)",
    )
    audit_model: str | None = Field(
        None, description="with --audit-db: only requests to this served model name"
    )
    audit_since: str | None = Field(
        None, description="with --audit-db: only requests this recent (ISO time, or an age: 7d)"
    )
    off_policy: bool = Field(
        False,
        description="train on the prompts' own text, not the verifier's continuations (with --head: far more "
        "positions for the same verifier time, one pass per --seq-len chunk instead of a decode step per token)",
    )
    steps: int = Field(400, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="sequences per step")
    seq_len: int = Field(
        512, ge=1, description="tokens per training sequence (on-policy: prompt left-trimmed to fit)"
    )
    max_new_tokens: Annotated[int, AlsoNamed("max_tokens")] = Field(128, ge=1, description="on-policy continuation length")
    lr: float = Field(5e-4, gt=0, description="peak learning rate")
    warmup: int | None = Field(None, ge=0, description="warm-up steps (default: a twentieth of --steps)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    clip: float = Field(1.0, gt=0, description="gradient norm clip")
    loss: Literal["fkl", "tvd"] = Field(
        "fkl", description="divergence: forward KL (fkl) or total variation (tvd)"
    )
    ce_weight: float = Field(0.0, ge=0, description="weight of cross-entropy on the verifier's argmax")
    top_k: int = Field(32, ge=1, description="verifier log-probs kept per position")
    gen_batch_size: int = Field(16, ge=1, description="prompts decoded together by the verifier")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    eval_prompts: Path | None = Field(
        None,
        description="held-out JSONL prompts (default: the shared prompts where present, else 32 windows of the "
        "stdlib's q/r/s modules)",
    )
    no_eval: bool = Field(False, description="skip the before/after evaluation")
    eval_limit: int | None = Field(
        None,
        ge=1,
        description=f"evaluation prompts (default: all; the last {SPLIT_EVAL_LIMIT} when --prompts is the same file)",
    )
    eval_new_tokens: int = Field(128, ge=1, description="verifier tokens per evaluation prompt")
    seed: int = Field(0, description="seed of data order and windows")

    @model_validator(mode="after")
    def _one_source(self) -> DistillSettings:
        one_of(self, SOURCES, "one training source")
        if self.head and self.draft:
            raise field_error("draft", "--head trains a head from scratch on the verifier's features; leave out --draft", self.draft)
        if not self.head and not self.draft:
            raise field_error("draft", "give --draft PATH (the draft model to distil), or --head to train a draft head", None)
        return self

    def training_fields(self) -> dict:
        """What a resumed run must share with the run it continues."""
        # --head-minutes is a budget of training time: a resumed run may be given more.
        ignored = {"out", "resume", "checkpoint_every", "eval_prompts", "no_eval", "eval_limit", "eval_new_tokens",
                   "device", "threads", "save_dtype", "gen_batch_size", "head_minutes"}  # fmt: skip
        return self.model_dump(mode="json", exclude=ignored)


def _check_inputs(settings: DistillSettings) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """What settings alone cannot tell: the files and models are there and fit together."""
    from verispec.models.loading import check_compatible, load_tokenizer

    if settings.eval_prompts is not None and not settings.no_eval and not settings.eval_prompts.is_file():
        raise UserError(f"--eval-prompts {settings.eval_prompts} does not exist")
    if settings.out.exists() and not settings.out.is_dir():
        raise UserError(f"--out {settings.out} is a file; give a folder")
    target_tok = load_tokenizer(settings.target, "target")
    if settings.head:
        return target_tok, target_tok
    draft_tok = load_tokenizer(settings.draft, "draft")
    check_compatible(target_tok, draft_tok)
    return target_tok, draft_tok


def distill(
    settings: DistillSettings,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Evaluate the draft, distil it from the verifier, evaluate again; returns what eval.json holds."""
    import torch
    from transformers import AutoConfig

    from verispec.core.rounds import stop_tokens
    from verispec.models.loading import load_model, resolve_device

    started_wall, started_cpu = time.perf_counter(), time.process_time()
    target_tok, draft_tok = _check_inputs(settings)
    training, evaluation, note = split_prompts(settings)
    log(note)
    fields = settings.training_fields()
    claim_run(settings.out, fields, settings.resume)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)

    verifier = load_model(settings.target, device, torch.float32, role="target")
    if settings.head:
        from verispec.models.lean import LeanLM

        if type(verifier) is not LeanLM:
            raise UserError(
                f"--head reads the verifier's features, which only the lean backend's Llama-family models give; "
                f"{settings.target} runs on {getattr(verifier, 'backend', '?')} ({type(verifier).__name__})"
            )
    elif (draft_vocab := AutoConfig.from_pretrained(settings.draft).vocab_size) != verifier.vocab_size:
        raise UserError(
            f"the draft's vocabulary ({draft_vocab}) and the verifier's ({verifier.vocab_size}) differ in size; "
            "distillation matches them token by token"
        )
    window = verifier.max_positions
    if window is not None and settings.seq_len > window:
        raise UserError(f"--seq-len {settings.seq_len} is beyond the verifier's context window of {window}")
    report: dict = {"target": settings.target, "draft": settings.draft, "data": note, "config": fields}
    eos = stop_tokens(verifier, target_tok)
    eval_ids = [target_tok(p.text).input_ids for p in evaluation]
    longest = max(map(len, eval_ids), default=0) + settings.eval_new_tokens
    if window is not None and longest > window:
        raise UserError(
            f"an evaluation prompt plus --eval-new-tokens is {longest} tokens, beyond the verifier's "
            f"context window of {window}; lower --eval-new-tokens or use shorter --eval-prompts"
        )
    continuations: list[list[int]] = []
    if evaluation:
        eval_started = time.process_time()
        continuations = verifier_continuations(settings, verifier, eval_ids, eos, log)
        report["eval_verifier_cpu_s"] = time.process_time() - eval_started
        if not settings.head:  # a head has no "before"
            before = agreement(settings.draft, eval_ids, continuations, device)
            log(
                f"before: greedy agreement {before['agreement']:.3f} over {before['positions']} positions of {before['prompts']} prompts"
            )
            report["before"] = before

    examples, report["teacher"] = build_teacher(settings, verifier, target_tok, training, log)
    if settings.head:
        from verispec.training.distill.head import train_head

        pairs = list(zip(eval_ids, continuations, strict=True))
        report |= train_head(settings, verifier, examples, pairs, log, on_step)
        if "after" in report:
            by_position = ", ".join(f"{a:.3f}" for a in report["after"]["by_draft_position"])
            log(f"head agreement by draft position: {by_position}")
        return finish_report(report, settings.out / "eval.json", started_wall, started_cpu, device)
    del verifier
    log(
        f"training on {report['teacher']['examples']} examples, {report['teacher']['positions']} distilled positions"
    )
    model, history = train(settings, examples, device, log, on_step)
    final = settings.out / "final"
    save_final(model, draft_tok, final, settings.save_dtype)
    report["final"] = str(final)
    report["training"] = {
        "steps": len(history["loss"]),
        "positions": history["positions"],
        "tokens": history["tokens"],
        "wall_s": history["wall_s"],
        "cpu_s": history["cpu_s"],
        "first_loss": mean(history["loss"][:10]),
        "last_loss": mean(history["loss"][-10:]),
        "first_batch_agreement": mean(history["agree"][:10]),
        "last_batch_agreement": mean(history["agree"][-10:]),
    }
    if evaluation:
        after = agreement(str(final), eval_ids, continuations, device)
        log(f"after:  greedy agreement {after['agreement']:.3f} (before {report['before']['agreement']:.3f})")
        report["after"] = after
    finish_report(report, settings.out / "eval.json", started_wall, started_cpu, device)
    return report


def add_distill_command(commands) -> None:

    command = commands.add_parser(
        "distill", help="distil a draft from its verifier to raise greedy agreement"
    )
    add_data_flag(command, DistillSettings)
    add_settings_flags(command, DistillSettings, skip=("data", *RunSettings.model_fields))
    add_settings_flags(command, RunSettings)
    add_common_flags(command)
    command.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:

    settings = settings_from(args, DistillSettings)
    settings.apply_threads()
    report = distill(settings, log=lambda line: print(line, file=sys.stderr))
    for k in ("before", "after"):
        if k in report:
            v = report[k]
            print(
                f"{k}: greedy agreement {v['agreement']:.4f} ({v['positions']} positions, {v['prompts']} prompts)"
            )
            if "by_draft_position" in v:
                print("by draft position: " + ", ".join(f"{a:.4f}" for a in v["by_draft_position"]))
    t = report["training"]
    made = "head" if settings.head else "draft"
    print(
        f"trained {t['steps']} steps, {t['tokens']} tokens, {t['positions']} distilled positions; "
        f"wall {report['wall_s']:.0f}s, CPU {report['cpu_s']:.0f}s; {made} in {report['final']}"
    )
    return 0
