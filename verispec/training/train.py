"""`verispec train`: a small causal LM, and its tokenizer, from a text corpus.

For users without a draft of the right tokenizer (train one on the tokenizer of their verifier
with `--tokenizer`, then `verispec distill` it), and the way the built-in demo pair was made.

- Tokenizer: byte-level BPE (the Hugging Face `tokenizers` library) trained on the corpus, with
  `<|endoftext|>` as BOS, EOS and padding (id 0), or an existing model's tokenizer (`--tokenizer`).
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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from verispec.errors import UserError
from verispec.training.corpus import stdlib_files, text_documents
from verispec.training.loop import (
    Schedule,
    StepResult,
    add_run_flags,
    add_typed_flags,
    apply_threads,
    batch_indices,
    checkpoints,
    claim_run,
    finish_report,
    fit,
    inference_mode,
    mean,
    save_final,
)

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

EOS = "<|endoftext|>"
VALIDATION_CHUNKS = 48  # validation loss over at most this many chunks, the same ones every time


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    data: tuple[str, ...] = ()
    stdlib: bool = False
    tokenizer: str | None = None  # a model folder whose tokenizer to use; else train one
    vocab_size: int = 4096
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int | None = None  # default: 8/3 of hidden, rounded up to a multiple of 64
    context: int = 1024
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int | None = None
    weight_decay: float = 0.1
    clip: float = 1.0
    checkpoint_every: int = 100
    save_dtype: str = "float16"
    seed: int = 0
    device: str = "auto"
    resume: bool = False

    def ffn(self) -> int:
        return self.intermediate or 64 * math.ceil(self.hidden * 8 / 3 / 64)

    def training_fields(self) -> dict:
        """What a resumed run must share with the run it continues."""
        kept = {f.name: getattr(self, f.name) for f in fields(self)} | {"intermediate": self.ffn()}
        for name in ("out", "resume", "checkpoint_every", "device", "save_dtype"):
            kept.pop(name)
        return json.loads(json.dumps(kept, default=str))


# -- data ----------------------------------------------------------------------------------------


def corpus(config: TrainConfig) -> tuple[list[str], list[str], str]:
    """Training documents, validation documents, and a line saying what they are."""
    if config.stdlib:
        train = [p.read_text(encoding="utf-8") for p in stdlib_files()]
        held = [p.read_text(encoding="utf-8") for p in stdlib_files(held_out=True)]
        return train, held, f"standard library: {len(train)} files; validation: {len(held)} q/r/s modules"
    documents = text_documents(config.data)
    order = list(range(len(documents)))
    random.Random(config.seed).shuffle(order)
    held_count = max(1, len(documents) // 50) if len(documents) > 1 else 0
    held = {order[i] for i in range(held_count)}
    train = [d for i, d in enumerate(documents) if i not in held]
    validation = [documents[i] for i in sorted(held)] or documents  # one document: validate on it
    note = f"{len(train)} documents; validation: {held_count or 'the same'} document{'s' if held_count != 1 else ''}"
    return train, validation, note


def build_tokenizer(
    config: TrainConfig, documents: list[str], log: Callable[[str], None]
) -> PreTrainedTokenizerBase:
    """The given model's tokenizer, or a byte-level BPE trained on the documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = config.out / "tokenizer"
    if config.tokenizer is not None:
        try:
            return AutoTokenizer.from_pretrained(config.tokenizer)
        except (OSError, ValueError) as exc:
            raise UserError(f"--tokenizer {config.tokenizer}: no tokenizer there ({exc})") from None
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)  # trained by the run being resumed
    if config.vocab_size < 300:
        raise UserError(f"--vocab-size {config.vocab_size}: give at least 300 (256 bytes plus merges)")
    started = time.perf_counter()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    bpe.train_from_iterator(documents, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=EOS)
    tokenizer.model_max_length = config.context
    tokenizer.save_pretrained(folder)
    log(
        f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained in {time.perf_counter() - started:.0f}s"
    )
    return tokenizer


def token_chunks(documents: list[str], tokenizer: PreTrainedTokenizerBase, length: int) -> torch.Tensor:
    """(N, length) chunks of the documents' tokens, each document followed by EOS."""
    import torch

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False, verbose=False).input_ids:
        stream.extend(ids)
        stream.append(eos)
    count = len(stream) // length
    if count == 0:
        raise UserError(f"the text holds {len(stream)} tokens, fewer than --seq-len + 1 = {length}")
    return torch.tensor(stream[: count * length], dtype=torch.int32).view(count, length)


# -- model ---------------------------------------------------------------------------------------


def new_model(config: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.hidden % config.heads:
        raise UserError(f"--hidden {config.hidden} must be a multiple of --heads {config.heads}")
    if (config.hidden // config.heads) % 2:
        raise UserError(
            f"--hidden {config.hidden} / --heads {config.heads} = {config.hidden // config.heads} per head; "
            "rotary embeddings need an even head size"
        )
    if config.heads % config.kv_heads:
        raise UserError(f"--heads {config.heads} must be a multiple of --kv-heads {config.kv_heads}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.ffn(),
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(config.seed)
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


def _check(config: TrainConfig) -> None:
    if bool(config.data) == config.stdlib:
        raise UserError("give one corpus: --data PATH... or --stdlib")
    for name in (
        "layers",
        "hidden",
        "heads",
        "kv_heads",
        "context",
        "steps",
        "batch_size",
        "seq_len",
        "checkpoint_every",
    ):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(config, name)}")
    if config.lr <= 0:
        raise UserError(f"--lr must be positive, got {config.lr}")
    if config.seq_len > config.context:
        raise UserError(f"--seq-len {config.seq_len} is longer than the model's --context {config.context}")
    if config.out.exists() and not config.out.is_dir():
        raise UserError(f"--out {config.out} is a file; give a folder")


def train_model(
    config: TrainConfig, log: Callable[[str], None] = print, on_step: Callable[[int], None] | None = None
) -> dict:
    """Tokenizer, model, training, validation; returns what train.json holds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from verispec.models.loading import resolve_device

    started_wall, started_cpu = time.perf_counter(), time.process_time()
    _check(config)
    kept = config.training_fields()
    claim_run(config.out, kept, config.resume)
    device = resolve_device(config.device)

    train_docs, validation_docs, note = corpus(config)
    log(note)
    tokenizer = build_tokenizer(config, train_docs, log)
    chunks = token_chunks(train_docs, tokenizer, config.seq_len + 1)
    validation = token_chunks(validation_docs, tokenizer, config.seq_len + 1)
    pick = torch.randperm(len(validation), generator=torch.Generator().manual_seed(config.seed))[
        :VALIDATION_CHUNKS
    ]
    validation = validation[pick.sort().values]
    text_bytes = sum(len(d.encode()) for d in validation_docs)
    text_tokens = sum(
        len(ids) + 1 for ids in tokenizer(validation_docs, add_special_tokens=False, verbose=False).input_ids
    )
    bytes_per_token = text_bytes / text_tokens

    init = config.out / "init"
    if not (init / "config.json").is_file():
        save_final(new_model(config, tokenizer), tokenizer, init, "float32")
    model_config = LlamaConfig.from_pretrained(init)
    parameters = sum(p.numel() for p in LlamaForCausalLM(model_config).parameters())
    log(
        f"model: Llama, {config.layers} layers, hidden {config.hidden}, {config.heads} heads ({config.kv_heads} KV), "
        f"SwiGLU {config.ffn()}, {parameters / 1e6:.2f}M parameters; {len(chunks)} chunks of {config.seq_len} tokens "
        f"({len(chunks) * config.seq_len / 1e6:.2f}M tokens), {config.steps * config.batch_size / len(chunks):.2f} epochs"
    )
    report: dict = {"data": note, "config": kept, "parameters": parameters, "vocab_size": len(tokenizer),
                    "train_tokens": len(chunks) * config.seq_len, "bytes_per_token": bytes_per_token, "validation": []}  # fmt: skip
    earlier = earlier_report(config.out) if config.resume and checkpoints(config.out) else {}
    if "validation_initial" in earlier:  # a resumed run keeps the figures of the steps it does not redo
        done = int(checkpoints(config.out)[-1].name.split("-")[1])
        report["validation_initial"] = earlier["validation_initial"]
        report["validation"] = [v for v in earlier.get("validation", []) if v["step"] <= done]
    else:
        initial = LlamaForCausalLM.from_pretrained(init, dtype=torch.float32).to(device).eval()
        report["validation_initial"] = validation_loss(initial, validation, bytes_per_token, device)
        del initial
    checkpoint_losses = report["validation"]
    log(f"initial validation: {report['validation_initial']['nats_per_token']:.3f} nats/token")

    def step_loss(model: PreTrainedModel, step: int) -> StepResult:
        batch = chunks[batch_indices(step, config.batch_size, len(chunks), config.seed)]
        loss, accuracy = next_token_loss(model, batch, device)
        return StepResult(loss, batch.numel(), batch.numel() - len(batch), accuracy)

    def on_checkpoint(model: PreTrainedModel, step: int, history: dict) -> None:
        figures = validation_loss(model, validation, bytes_per_token, device)
        checkpoint_losses.append({"step": step, **figures})
        (config.out / "progress.json").write_text(json.dumps(report, indent=2) + "\n")
        log(
            f"step {step}: validation {figures['nats_per_token']:.3f} nats/token, {figures['bits_per_byte']:.3f} bits/byte"
        )

    model, history = fit(init, config.out, Schedule(config.steps, config.lr, config.warmup, config.weight_decay, config.clip,
                         config.checkpoint_every), step_loss, device, config.resume, log, "train", on_step, on_checkpoint)  # fmt: skip
    final = config.out / "final"
    save_final(model, tokenizer, final, config.save_dtype)
    report["final"] = str(final)
    report["validation_final"] = (
        checkpoint_losses[-1]
        if checkpoint_losses
        else validation_loss(model, validation, bytes_per_token, device)
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
    finish_report(report, config.out / "train.json", started_wall, started_cpu, device)
    return report


# -- command line --------------------------------------------------------------------------------


def add_train_command(commands) -> None:
    defaults = TrainConfig(out=Path())
    command = commands.add_parser(
        "train", help="train a small causal LM (and its tokenizer) from a text corpus"
    )
    command.add_argument(
        "--out", type=Path, required=True, help="output folder: tokenizer/, checkpoints/, final/, train.json"
    )
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="JSONL files ('text'/'prompt'), folders of .py files, files, globs",
    )
    source.add_argument(
        "--stdlib",
        action="store_true",
        help="this machine's Python standard library (q/r/s modules validate)",
    )
    command.add_argument(
        "--tokenizer", help="use this model folder's tokenizer instead of training one (e.g. your verifier's)"
    )
    add_typed_flags(command, defaults, (
        ("--vocab-size", int, "BPE vocabulary when training a tokenizer"),
        ("--layers", int, "transformer layers"),
        ("--hidden", int, "hidden size"),
        ("--heads", int, "attention heads"),
        ("--kv-heads", int, "key/value heads (grouped-query attention)"),
        ("--intermediate", int, "SwiGLU width (default: 8/3 of --hidden, rounded up to 64)"),
        ("--context", int, "context window (rotary positions)"),
        ("--steps", int, "optimizer steps"),
        ("--batch-size", int, "sequences per step"),
        ("--seq-len", int, "tokens per training sequence"),
        ("--lr", float, "peak learning rate"),
        ("--warmup", int, "warm-up steps (default: 5%% of --steps)"),
        ("--weight-decay", float, "AdamW weight decay"),
        ("--clip", float, "gradient norm clip"),
        ("--checkpoint-every", int, "steps between checkpoints (and validation)"),
        ("--seed", int, "seed of initial weights, data order and validation split"),
    ))  # fmt: skip
    add_run_flags(command, defaults.save_dtype, "final weights; they load as float32 on the CPU either way")
    command.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    names = {f.name for f in fields(TrainConfig)} - {"out", "data", "stdlib", "tokenizer"}
    config = TrainConfig(
        out=args.out, data=tuple(args.data or ()), stdlib=args.stdlib, tokenizer=args.tokenizer,
        **{name: getattr(args, name) for name in names},
    )  # fmt: skip
    report = train_model(config, log=lambda line: print(line, file=sys.stderr))
    v = report["validation_final"]
    t = report["training"]
    print(
        f"validation: {v['nats_per_token']:.4f} nats/token, {v['bits_per_byte']:.4f} bits/byte ({v['chunks']} chunks); "
        f"trained {t['steps']} steps, {t['tokens']} tokens; wall {report['wall_s']:.0f}s, CPU {report['cpu_s']:.0f}s; "
        f"model in {report['final']}"
    )
    return 0
