"""`verispec train`: a small causal LM, and its tokenizer, from a text corpus.

For users without a draft of the right tokenizer (train one on the tokenizer of their verifier
with `--tokenizer`, then `verispec distill` it), and the way the built-in demo pair was made.

- Tokenizer: byte-level BPE (the Hugging Face `tokenizers` library) trained on the corpus, with
  `<|endoftext|>` as BOS, EOS and padding (id 0), or an existing model's tokenizer (`--tokenizer`);
  see `tokenizer.py`.
- Model: Llama architecture (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, tied
  embeddings), so the lean backend runs it; sizes from the flags.
- Data: the documents, each followed by EOS, concatenated and cut into `--seq-len`+1 token
  chunks; next-token cross-entropy. `--stdlib` uses this machine's standard library, leaving
  out the q/r/s modules the shared prompts are cut from, which then serve as validation text.
  Otherwise a seeded 2% of the `--data` documents (at least one) is held out.
- The loop (AdamW, warm-up, cosine decay, checkpoints, `--resume`) is `verispec.training.loop`'s.
  Validation loss is measured at every checkpoint and at the end, in nats per token and in bits
  per byte of text (comparable across tokenizers).

Files under --out: tokenizer/ , init/ (the initial weights), checkpoints/step-N/, final/ (the
model with its tokenizer, a Hugging Face folder), train.json (configuration, sizes, losses, time).

torch and transformers are imported where they are used, not at the top: `verispec` imports this
module to build its command line for every command, and they take seconds to import.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from verispec.config import command_config
from verispec.errors import UserError
from verispec.flags import add_common_flags, add_settings_flags, settings_from
from verispec.training.corpus import stdlib_files, text_documents
from verispec.training.loop import (
    Schedule,
    StepResult,
    batch_indices,
    checkpoints,
    claim_run,
    finish_report,
    fit,
    inference_mode,
    mean,
    save_final,
)
from verispec.training.settings import RunSettings, add_data_flag, field_error, one_of
from verispec.training.tokenizer import build_tokenizer, bytes_per_token, token_chunks

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

VALIDATION_CHUNKS = 48  # validation loss over at most this many chunks, the same ones every time


class TrainSettings(RunSettings):
    """What `verispec train` learns from, the model's shape, and the optimisation."""

    model_config = command_config("train")

    out: Path = Field(description="output folder: tokenizer/, checkpoints/, final/, train.json")
    data: tuple[str, ...] = Field(
        (), description="JSONL files ('text'/'prompt'), folders of .py files, files, globs"
    )
    stdlib: bool = Field(False, description="this machine's Python standard library (q/r/s modules validate)")
    tokenizer: str | None = Field(
        None, description="use this model folder's tokenizer instead of training one (e.g. your verifier's)"
    )
    vocab_size: int = Field(4096, ge=1, description="BPE vocabulary when training a tokenizer")
    layers: int = Field(4, ge=1, description="transformer layers")
    hidden: int = Field(256, ge=1, description="hidden size")
    heads: int = Field(4, ge=1, description="attention heads")
    kv_heads: int = Field(2, ge=1, description="key/value heads (grouped-query attention)")
    intermediate: int | None = Field(
        None, ge=1, description="SwiGLU width (default: 8/3 of --hidden, rounded up to a multiple of 64)"
    )
    context: int = Field(1024, ge=1, description="context window (rotary positions)")
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="sequences per step")
    seq_len: int = Field(256, ge=1, description="tokens per training sequence")
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    warmup: int | None = Field(None, ge=0, description="warm-up steps (default: a twentieth of --steps)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    clip: float = Field(1.0, gt=0, description="gradient norm clip")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (and validation)")
    seed: int = Field(0, description="seed of initial weights, data order and validation split")

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        one_of(self, ("data", "stdlib"), "one corpus")
        if self.hidden % self.heads:
            raise field_error("hidden", f"must be a multiple of --heads {self.heads}", self.hidden)
        if (self.hidden // self.heads) % 2:
            raise field_error(
                "hidden",
                f"{self.hidden} / --heads {self.heads} = {self.hidden // self.heads} per head; "
                "rotary embeddings need an even head size",
                self.hidden,
            )
        if self.heads % self.kv_heads:
            raise field_error("heads", f"must be a multiple of --kv-heads {self.kv_heads}", self.heads)
        if self.seq_len > self.context:
            raise field_error("seq_len", f"is longer than the model's --context {self.context}", self.seq_len)
        return self

    def ffn(self) -> int:
        return self.intermediate or 64 * math.ceil(self.hidden * 8 / 3 / 64)

    def training_fields(self) -> dict:
        """What a resumed run must share with the run it continues."""
        ignored = {"out", "resume", "checkpoint_every", "device", "threads", "save_dtype"}
        return self.model_dump(mode="json", exclude=ignored) | {"intermediate": self.ffn()}


# -- data and model -------------------------------------------------------------------------------


def corpus(settings: TrainSettings) -> tuple[list[str], list[str], str]:
    """Training documents, validation documents, and a line saying what they are."""
    if settings.stdlib:
        train = [p.read_text(encoding="utf-8") for p in stdlib_files()]
        held = [p.read_text(encoding="utf-8") for p in stdlib_files(held_out=True)]
        return train, held, f"standard library: {len(train)} files; validation: {len(held)} q/r/s modules"
    documents = text_documents(settings.data)
    order = list(range(len(documents)))
    random.Random(settings.seed).shuffle(order)
    held_count = max(1, len(documents) // 50) if len(documents) > 1 else 0
    held = {order[i] for i in range(held_count)}
    train = [d for i, d in enumerate(documents) if i not in held]
    validation = [documents[i] for i in sorted(held)] or documents  # one document: validate on it
    note = f"{len(train)} documents; validation: {held_count or 'the same'} document{'s' if held_count != 1 else ''}"
    return train, validation, note


def new_model(settings: TrainSettings, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden,
        intermediate_size=settings.ffn(),
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        max_position_embeddings=settings.context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(settings.seed)
    return LlamaForCausalLM(llama)


def next_token_loss(
    model: PreTrainedModel, chunks: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy of predicting each chunk's next token, and next-token accuracy."""
    import torch

    ids = chunks.to(device=device, dtype=torch.long)
    logits = model(input_ids=ids[:, :-1]).logits  # (B, T, V)
    targets = ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    accuracy = (logits.argmax(-1) == targets).float().mean().item()
    return loss, accuracy


@inference_mode
def validation_loss(
    model: PreTrainedModel, chunks: torch.Tensor, bytes_per_token: float, device: torch.device
) -> dict:
    losses = [
        next_token_loss(model, chunks[i : i + 8], device)[0].item() * len(chunks[i : i + 8])
        for i in range(0, len(chunks), 8)
    ]
    nats = sum(losses) / len(chunks)
    return {
        "nats_per_token": nats,
        "bits_per_byte": nats / math.log(2) / bytes_per_token,
        "chunks": len(chunks),
    }


# -- the whole run -------------------------------------------------------------------------------


def earlier_report(out: Path) -> dict:
    path = out / "progress.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def train_model(
    settings: TrainSettings, log: Callable[[str], None] = print, on_step: Callable[[int], None] | None = None
) -> dict:
    """Tokenizer, model, training, validation; returns what train.json holds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from verispec.models.loading import resolve_device

    s = settings
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    if s.out.exists() and not s.out.is_dir():
        raise UserError(f"--out {s.out} is a file; give a folder")
    kept = s.training_fields()
    claim_run(s.out, kept, s.resume)
    device = resolve_device(s.device)

    train_docs, validation_docs, note = corpus(s)
    log(note)
    tokenizer = build_tokenizer(train_docs, s.out / "tokenizer", s.vocab_size, s.context, s.tokenizer, log)
    chunks = token_chunks(train_docs, tokenizer, s.seq_len + 1)
    validation = token_chunks(validation_docs, tokenizer, s.seq_len + 1)
    pick = torch.randperm(len(validation), generator=torch.Generator().manual_seed(s.seed))[
        :VALIDATION_CHUNKS
    ]
    validation = validation[pick.sort().values]
    text_bytes_per_token = bytes_per_token(validation_docs, tokenizer)

    init = s.out / "init"
    if not (init / "config.json").is_file():
        save_final(new_model(s, tokenizer), tokenizer, init, "float32")
    parameters = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig.from_pretrained(init)).parameters())
    log(
        f"model: Llama, {s.layers} layers, hidden {s.hidden}, {s.heads} heads ({s.kv_heads} KV), "
        f"SwiGLU {s.ffn()}, {parameters / 1e6:.2f}M parameters; {len(chunks)} chunks of {s.seq_len} tokens "
        f"({len(chunks) * s.seq_len / 1e6:.2f}M tokens), {s.steps * s.batch_size / len(chunks):.2f} epochs"
    )
    report: dict = {"data": note, "config": kept, "parameters": parameters, "vocab_size": len(tokenizer),
                    "train_tokens": len(chunks) * s.seq_len, "bytes_per_token": text_bytes_per_token, "validation": []}  # fmt: skip
    earlier = earlier_report(s.out) if s.resume and checkpoints(s.out) else {}
    if "validation_initial" in earlier:  # a resumed run keeps the figures of the steps it does not redo
        done = int(checkpoints(s.out)[-1].name.split("-")[1])
        report["validation_initial"] = earlier["validation_initial"]
        report["validation"] = [v for v in earlier.get("validation", []) if v["step"] <= done]
    else:
        initial = LlamaForCausalLM.from_pretrained(init, dtype=torch.float32).to(device).eval()
        report["validation_initial"] = validation_loss(initial, validation, text_bytes_per_token, device)
        del initial
    checkpoint_losses = report["validation"]
    log(f"initial validation: {report['validation_initial']['nats_per_token']:.3f} nats/token")

    def step_loss(model: PreTrainedModel, step: int) -> StepResult:
        batch = chunks[batch_indices(step, s.batch_size, len(chunks), s.seed)]
        loss, accuracy = next_token_loss(model, batch, device)
        return StepResult(loss, batch.numel(), batch.numel() - len(batch), accuracy)

    def on_checkpoint(model: PreTrainedModel, step: int, history: dict) -> None:
        figures = validation_loss(model, validation, text_bytes_per_token, device)
        checkpoint_losses.append({"step": step, **figures})
        (s.out / "progress.json").write_text(json.dumps(report, indent=2) + "\n")
        log(
            f"step {step}: validation {figures['nats_per_token']:.3f} nats/token, {figures['bits_per_byte']:.3f} bits/byte"
        )

    schedule = Schedule(s.steps, s.lr, s.warmup, s.weight_decay, s.clip, s.checkpoint_every)
    model, history = fit(
        init, s.out, schedule, step_loss, device, s.resume, log, "train", on_step, on_checkpoint
    )
    final = s.out / "final"
    save_final(model, tokenizer, final, s.save_dtype)
    report["final"] = str(final)
    report["validation_final"] = (
        checkpoint_losses[-1]
        if checkpoint_losses
        else validation_loss(model, validation, text_bytes_per_token, device)
    )
    report["training"] = {
        "steps": len(history["loss"]),
        "tokens": history["tokens"],
        "first_loss": mean(history["loss"][:10]),
        "last_loss": mean(history["loss"][-10:]),
        "last_accuracy": mean(history["agree"][-10:]),
        "wall_s": history["wall_s"],
        "cpu_s": history["cpu_s"],
    }
    finish_report(report, s.out / "train.json", started_wall, started_cpu, device)
    return report


# -- command line --------------------------------------------------------------------------------


def add_train_command(commands) -> None:

    command = commands.add_parser(
        "train", help="train a small causal LM (and its tokenizer) from a text corpus"
    )
    add_data_flag(command, TrainSettings)
    add_settings_flags(command, TrainSettings, skip=("data", *RunSettings.model_fields))
    add_settings_flags(command, RunSettings)
    add_common_flags(command)
    command.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:

    settings = settings_from(args, TrainSettings)
    settings.apply_threads()
    report = train_model(settings, log=lambda line: print(line, file=sys.stderr))
    v = report["validation_final"]
    t = report["training"]
    print(
        f"validation: {v['nats_per_token']:.4f} nats/token, {v['bits_per_byte']:.4f} bits/byte ({v['chunks']} chunks); "
        f"trained {t['steps']} steps, {t['tokens']} tokens; wall {report['wall_s']:.0f}s, CPU {report['cpu_s']:.0f}s; "
        f"model in {report['final']}"
    )
    return 0
