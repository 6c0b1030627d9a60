"""`verispec distill`: train a draft to agree with its verifier (knowledge distillation, DistillSpec-style).

A draft is only as useful as its agreement with the verifier: under greedy verification a draft
token is accepted when it is the verifier's argmax, so the figure to raise is the greedy
agreement rate along the verifier's own output. This module fine-tunes a draft on the verifier's
next-token distributions and measures that rate before and after, on held-out prompts.

Training data, two modes:
- on-policy (the default for prompts: `--prompts`, `--stdlib-prompts`, or `--audit-db`, the prompts
  of served requests from the audit trail): the verifier first
  greedy-decodes a continuation of every prompt; the draft is then trained on the continuation
  positions, which are exactly the contexts it will see when proposing for this verifier
  (DistillSpec, Zhou et al. 2023). The verifier's distributions come out of that same decode, so
  the teacher costs nothing beyond the generation.
- text (`--data`, or `--off-policy`): chunks of given text, with the verifier's distributions at
  every position from one forward pass per chunk.
Either way the teacher is computed once, kept as its top-k log-probabilities per position (the
rest of the vocabulary as one tail bucket), and cached under `--out/teacher`, so epochs and a
`--resume` never rerun the verifier.

Loss: forward KL(p_verifier || q_draft) over the top-k tokens plus the tail bucket, which is the
exact KL of that coarse-grained distribution, optionally plus `--ce-weight` times the
cross-entropy on the verifier's argmax. Why forward KL: what sampled speculation accepts is
1 - TVD(p, q), and TVD <= sqrt(KL / 2) (Pinsker), so driving KL down drives the acceptance bound
up; unlike TVD its gradient does not vanish on tokens where q already exceeds p, and it is
mode-covering, so the draft puts mass on the verifier's top choice even where it is unsure, which
is what greedy agreement rewards. The argmax cross-entropy is the greedy decision itself, as a
sharper extra term. `--loss tvd` trains on TVD of the same buckets directly.

Measured on the reference pair (2 shared CPU cores, `--threads 1`): 640 stdlib windows on-policy,
400 steps of 16 sequences, 17 minutes wall in all, raised agreement on the 64 shared prompts
from 0.634 to 0.853 (96 windows and 80 steps, 4 minutes: 0.787).

Held-out evaluation: agreement is measured on `--eval-prompts` (default: the shared prompt set),
teacher-forced along the verifier's greedy continuation (the fraction of its tokens that are also
the draft's argmax given the same prefix). When training prompts come from the same file as the
evaluation prompts, the last `--eval-limit` (default 16) are held out and the rest train.
`--stdlib-prompts N` cuts N ~40-line windows from this machine's standard library, leaving out
the modules the shared prompts are cut from (any path part starting with q, r or s) and the
folders the reference pair never trained on.

Files under --out: teacher/ (cached verifier data), eval-verifier.pt (cached verifier greedy
continuations of the evaluation prompts), checkpoints/step-N/ (draft weights, optimizer, step,
RNG), final/ (the distilled draft as a Hugging Face model folder), eval.json (before and after
agreement, CPU and wall time).

torch, transformers and the model loaders are imported inside the functions that use them:
`verispec` imports this module to build its command line for every command, `--help` included.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from verispec.errors import UserError
from verispec.prompts import Prompt, load_prompts, stdlib_windows
from verispec.training.corpus import text_documents
from verispec.training.loop import (
    Schedule,
    StepResult,
    add_run_flags,
    add_typed_flags,
    apply_threads,
    batch_indices,
    claim_run,
    finish_report,
    fit,
    inference_mode,
    mean,
    save_final,
)

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_EVAL_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "prompts" / "code-completion.jsonl"
SPLIT_EVAL_LIMIT = 16  # held out when training and evaluation prompts share a file


@dataclass(frozen=True)
class DistillConfig:
    target: str
    draft: str
    out: Path
    data: tuple[str, ...] = ()  # text mode: JSONL files, folders or globs of .py files
    prompts: Path | None = None
    stdlib_prompts: int = 0
    audit_db: str | None = None  # prompts of served requests, from the audit trail (content opted in)
    audit_model: str | None = None  # only records of this served model name
    audit_since: str | None = None  # only records this recent (ISO time or age: 7d)
    off_policy: bool = False  # prompts as plain text instead of on-policy continuations
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 512
    max_new_tokens: int = 128  # on-policy continuation length
    lr: float = 5e-4
    warmup: int | None = None  # default: 5% of steps
    weight_decay: float = 0.0
    clip: float = 1.0
    loss: str = "fkl"  # fkl | tvd
    ce_weight: float = 0.0
    top_k: int = 32
    gen_batch_size: int = 16
    checkpoint_every: int = 50
    eval_prompts: Path | None = DEFAULT_EVAL_PROMPTS
    eval_limit: int | None = None
    eval_new_tokens: int = 128
    save_dtype: str = "float16"  # float16 keeps the draft on the CPU kernel step (float32 weights miss it)
    seed: int = 0
    device: str = "auto"
    resume: bool = False

    def training_fields(self) -> dict:
        """What a resumed run must share with the run it continues."""
        fields = asdict(self)
        for name in (
            "out",
            "resume",
            "checkpoint_every",
            "eval_prompts",
            "eval_limit",
            "eval_new_tokens",
            "device",
            "save_dtype",
            "gen_batch_size",
        ):
            fields.pop(name)
        return json.loads(json.dumps(fields, default=str))


@dataclass
class Example:
    """One training sequence and the verifier's distributions at its loss positions.

    Position `start + i` of `ids` predicts the next token, and the verifier's top-k log-probs
    there are row i of `top_logp`. On-policy examples start at the last prompt token, so every
    row is a continuation position; text examples start at 0."""

    ids: torch.Tensor  # (T,) int32
    start: int
    top_ids: torch.Tensor  # (N, k) int32, N <= T - start; column 0 is the verifier's argmax
    top_logp: torch.Tensor  # (N, k) float16, log-probabilities under the full vocabulary


# -- data sources ---------------------------------------------------------------------------------


def audit_prompts(url: str, model: str | None = None, since: str | None = None) -> list[Prompt]:
    """The distinct prompts of completed requests in an audit trail (SQLite or PostgreSQL URL): the
    traffic the draft will propose for. Content must have been audited (`--audit-content`) and
    redacted, not hashed; the redaction placeholders (such as <EMAIL>) stay in the text as stored,
    and the verifier's continuations are generated afresh from it. Records without usable content
    are skipped."""
    from verispec.audit.query import parse_time
    from verispec.audit.store import AuditStore

    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise UserError(f"--audit-db: no audit database at {url}; give the server's --audit-url")
    store = AuditStore(url)
    try:
        cutoff = parse_time(since, "--audit-since") if since else None
        rows = [
            r
            for outcome in ("ok", "fallback")
            for r in store.query(since=cutoff, outcome=outcome, model=model)
        ]
    finally:
        store.close()
    seen: set[str] = set()
    prompts = []
    for row in sorted(rows, key=lambda r: r["created_at"]):
        text = row["prompt"]
        if not text or text.startswith("sha256:") or text in seen:
            continue
        seen.add(text)
        prompts.append(Prompt(row["request_id"], text))
    if not prompts:
        raise UserError(
            f"--audit-db {url}: none of {len(rows)} completed requests"
            f"{f' of model {model}' if model else ''} holds a usable prompt; the server must store "
            "content (--audit-content) redacted rather than hashed (--audit-redaction redact)"
        )
    return prompts


def _same_file(a: Path | str | None, b: Path | None) -> bool:
    return (
        a is not None and b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    )


def split_prompts(config: DistillConfig) -> tuple[list[Prompt], list[Prompt], str]:
    """Training prompts (empty in --data mode), held-out evaluation prompts, and a line saying how
    they were split. A training prompt whose text is an evaluation prompt's is always dropped."""
    eval_source = str(config.eval_prompts)
    if config.eval_prompts is None:
        evaluation = []
    elif _same_file(config.eval_prompts, DEFAULT_EVAL_PROMPTS) and not DEFAULT_EVAL_PROMPTS.is_file():
        # No shared prompt set beside this checkout: held-out standard-library text, on every machine.
        evaluation = stdlib_windows(32, seed=3, lines=40, held_out=True)
        eval_source = "standard-library windows of the held-out q/r/s modules"
    else:
        evaluation = load_prompts(config.eval_prompts)
    if config.prompts is not None:
        training = load_prompts(config.prompts)
    elif config.stdlib_prompts:
        training = stdlib_windows(config.stdlib_prompts, config.seed)
    elif config.audit_db:
        training = audit_prompts(config.audit_db, config.audit_model, config.audit_since)
    else:
        training = []
    if _same_file(config.prompts, config.eval_prompts) or any(
        _same_file(d, config.eval_prompts) for d in config.data
    ):
        held = config.eval_limit or SPLIT_EVAL_LIMIT
        if held >= len(evaluation):
            raise UserError(
                f"training and evaluation prompts share {config.eval_prompts}: --eval-limit {held} "
                f"leaves no training prompt of {len(evaluation)}"
            )
        evaluation, training = evaluation[-held:], training[:-held]
        note = f"training and evaluation share {config.eval_prompts}: the last {held} prompts are held out for evaluation"
    else:
        evaluation = evaluation[: config.eval_limit] if config.eval_limit else evaluation
        if config.stdlib_prompts:
            note = f"{config.stdlib_prompts} stdlib windows (q/r/s modules left out)"
        elif config.audit_db:
            note = f"{len(training)} distinct prompts of served requests from the audit trail"
        else:
            note = "training data"

        if evaluation:
            note += f"; evaluation on {len(evaluation)} prompts of {eval_source}"
    held_out = {p.text for p in evaluation}
    copies = sum(p.text in held_out for p in training)
    if copies:
        training = [p for p in training if p.text not in held_out]
        note += f"; {copies} training prompts identical to evaluation prompts left out"
        if not training:
            raise UserError(
                "every training prompt is also an evaluation prompt; give other --prompts or --eval-prompts"
            )
    return training, evaluation, note


# -- the teacher ----------------------------------------------------------------------------------


def _cache_kwargs(model: PreTrainedModel, cache: DynamicCache) -> dict:
    # transformers 5.x renamed `past_key_values` to `cache` in model forwards.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def _top(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, k, dim=-1)
    return ids.to(torch.int32).cpu(), values.to(torch.float16).cpu()


@inference_mode
def on_policy_batch(
    model: PreTrainedModel, rows: list[list[int]], max_new_tokens: int, top_k: int, eos: set[int]
) -> list[Example]:
    """Greedy-decode equal-length prompts together and keep the verifier's top-k at every new position.

    Rows have one length (the caller trims them), so no padding, mask or position ids are needed
    and every row is decoded exactly as it would be alone, up to batched-matmul rounding."""
    import torch
    from transformers import DynamicCache

    device = model.device
    ids = torch.tensor(rows, dtype=torch.long, device=device)  # (B, P)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, logits_to_keep=1, **_cache_kwargs(model, cache)).logits[:, -1]  # (B, V)
    tokens, top_ids, top_logp = [], [], []
    for step in range(max_new_tokens):
        t_ids, t_logp = _top(logits, top_k)
        top_ids.append(t_ids)
        top_logp.append(t_logp)
        token = logits.argmax(dim=-1)  # (B,)
        tokens.append(token.cpu())
        if step + 1 < max_new_tokens:
            logits = model(input_ids=token[:, None], **_cache_kwargs(model, cache)).logits[:, -1]
    continuation = torch.stack(tokens, dim=1)  # (B, M)
    top_ids_all, top_logp_all = torch.stack(top_ids, dim=1), torch.stack(top_logp, dim=1)  # (B, M, k)
    examples = []
    for b, row in enumerate(rows):
        cont = continuation[b].tolist()
        end = next(
            (i + 1 for i, t in enumerate(cont) if t in eos), len(cont)
        )  # keep the EOS: it is proposed too
        seq = torch.tensor(row + cont[: end - 1], dtype=torch.int32)
        examples.append(
            Example(seq, len(row) - 1, top_ids_all[b, :end].clone(), top_logp_all[b, :end].clone())
        )
    return examples


@inference_mode
def text_batch(model: PreTrainedModel, chunks: list[list[int]], top_k: int) -> list[Example]:
    """The verifier's top-k at every position of equal-length text chunks, in one forward pass."""
    import torch

    ids = torch.tensor(chunks, dtype=torch.long, device=model.device)
    logits = model(input_ids=ids).logits  # (B, T, V)
    top_ids, top_logp = _top(logits, top_k)
    return [
        Example(torch.tensor(c, dtype=torch.int32), 0, top_ids[b], top_logp[b]) for b, c in enumerate(chunks)
    ]


def _equal_length_batches(sequences: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Batches of similar length, each trimmed from the left to its shortest member."""
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
    batches = []
    for i in range(0, len(order), batch_size):
        group = [sequences[j] for j in order[i : i + batch_size]]
        shortest = min(len(s) for s in group)
        batches.append([s[len(s) - shortest :] for s in group])
    return batches


def _eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Where a greedy decode ends: the model's generation EOS ids, else the tokenizer's."""
    from verispec.models.backend import generation_eos

    eos = set(generation_eos(model.generation_config))
    if not eos and tokenizer.eos_token_id is not None:
        eos = {tokenizer.eos_token_id}
    return eos


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def build_teacher(
    config: DistillConfig,
    verifier: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    training: list[Prompt],
    log: Callable[[str], None],
) -> tuple[list[Example], dict]:
    """The training examples with the verifier's distributions, built once and cached in shards
    under out/teacher so that an interrupted build resumes at the next shard."""
    import torch
    from tqdm import tqdm

    from verispec.models.loading import weights_digest

    on_policy = bool(training) and not config.off_policy
    if on_policy:
        keep = config.seq_len - config.max_new_tokens
        if keep < 8:
            raise UserError(
                f"--seq-len {config.seq_len} leaves no room for a prompt before {config.max_new_tokens} new tokens"
            )
        sequences = [tokenizer(p.text).input_ids[-keep:] for p in training]
        batches = _equal_length_batches([s for s in sequences if len(s) >= 2], config.gen_batch_size)
    else:
        texts = [p.text for p in training] if training else text_documents(config.data)
        stream: list[int] = []
        for text in texts:  # documents end with EOS, as in pre-training
            stream.extend(
                tokenizer(text).input_ids
                + [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
            )
        chunks = [
            stream[i : i + config.seq_len] for i in range(0, len(stream) - config.seq_len + 1, config.seq_len)
        ]
        if not chunks:
            raise UserError(
                f"the training text holds {len(stream)} tokens, fewer than --seq-len {config.seq_len}"
            )
        needed = min(
            len(chunks), config.steps * config.batch_size
        )  # no teacher pass for chunks never trained on
        order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(config.seed))[
            :needed
        ].tolist()
        chunks = [chunks[i] for i in sorted(order)]
        batch = max(1, config.gen_batch_size // 4)  # full-length forwards: fewer rows fit
        batches = [chunks[i : i + batch] for i in range(0, len(chunks), batch)]
    digest = _fingerprint(
        weights_digest(config.target), on_policy, batches, config.max_new_tokens, config.top_k
    )
    folder = config.out / "teacher"
    manifest = folder / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") != digest:
        shutil.rmtree(folder)  # other data or another verifier: rebuild
    folder.mkdir(parents=True, exist_ok=True)
    manifest.write_text(
        json.dumps({"fingerprint": digest, "shards": len(batches), "on_policy": on_policy}) + "\n"
    )
    eos = _eos(verifier, tokenizer)
    examples: list[Example] = []
    built = cpu = 0.0
    done = sum((folder / f"shard-{i:05d}.pt").is_file() for i in range(len(batches)))
    if done < len(batches):
        log(
            f"verifier {'greedy continuations' if on_policy else 'distributions'} for {sum(map(len, batches))} "
            f"{'prompts' if on_policy else 'chunks'} ({done}/{len(batches)} batches cached)"
        )
    for i, rows in enumerate(
        tqdm(batches, desc="teacher", unit="batch", file=sys.stderr, disable=done == len(batches))
    ):
        shard = folder / f"shard-{i:05d}.pt"
        if not shard.is_file():
            wall, cpu0 = time.perf_counter(), time.process_time()
            part = (
                on_policy_batch(verifier, rows, config.max_new_tokens, config.top_k, eos)
                if on_policy
                else text_batch(verifier, rows, config.top_k)
            )
            torch.save([asdict(e) for e in part], shard.with_suffix(".tmp"))
            shard.with_suffix(".tmp").rename(shard)  # a shard exists only when complete
            built += time.perf_counter() - wall
            cpu += time.process_time() - cpu0
        examples.extend(Example(**e) for e in torch.load(shard))
    info = {
        "mode": "on-policy" if on_policy else "text",
        "examples": len(examples),
        "positions": sum(len(e.top_ids) for e in examples),
        "tokens": sum(len(e.ids) for e in examples),
        "build_wall_s": built,
        "build_cpu_s": cpu,
    }
    return examples, info


# -- the loss -------------------------------------------------------------------------------------


def kd_loss(
    logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_logp: torch.Tensor,
    kind: str = "fkl",
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """Per-position loss, (N,), of draft logits (N, V) against the verifier's top-k log-probs (N, k).

    The verifier's distribution is taken as its top-k tokens plus one tail bucket holding the rest
    of the mass; the draft's is bucketed the same way, so the divergence is exact for those buckets."""
    import torch

    logq = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    top_ids = top_ids.long()
    p = top_logp.float().exp()  # (N, k)
    p_tail = (1 - p.sum(-1)).clamp_min(0)  # (N,)
    logq_top = logq.gather(-1, top_ids)  # (N, k)
    logq_tail = logq.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # (N,)
    if kind == "fkl":
        loss = (p * (top_logp.float() - logq_top)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * logq_tail
    elif kind == "tvd":
        loss = 0.5 * ((p - logq_top.exp()).abs().sum(-1) + (p_tail - logq_tail.exp()).abs())
    else:
        raise UserError(f"--loss {kind!r}: use fkl or tvd")
    if ce_weight:
        loss = loss - ce_weight * logq_top[:, 0]  # column 0: the verifier's argmax
    return loss


def _collate(
    examples: list[Example], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the flat loss positions with their teacher rows. Right padding
    needs no attention mask: under the causal mask no real position sees a pad after it."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    rows, cols = [], []
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = e.ids.long()
        n = len(e.top_ids)
        rows.append(torch.full((n,), b))
        cols.append(torch.arange(e.start, e.start + n))
    top_ids = torch.cat([e.top_ids for e in examples])
    top_logp = torch.cat([e.top_logp for e in examples])
    return (
        ids.to(device),
        torch.cat(rows).to(device),
        torch.cat(cols).to(device),
        top_ids.to(device),
        top_logp.to(device),
    )


def batch_loss(
    model: PreTrainedModel, batch: list[Example], config: DistillConfig, device: torch.device
) -> tuple[torch.Tensor, float, int]:
    """Mean loss over the batch's loss positions, the draft's agreement with the verifier's argmax
    there, and the position count. Output logits are computed at loss positions only."""
    ids, rows, cols, top_ids, top_logp = _collate(batch, device)
    hidden = model.base_model(input_ids=ids).last_hidden_state  # (B, T, D)
    logits = model.get_output_embeddings()(hidden[rows, cols])  # (N, V)
    loss = kd_loss(logits, top_ids, top_logp, config.loss, config.ce_weight).mean()
    agree = (logits.argmax(-1) == top_ids[:, 0].long()).float().mean().item()
    return loss, agree, len(rows)


# -- training -------------------------------------------------------------------------------------


def train(
    config: DistillConfig,
    examples: list[Example],
    device: torch.device,
    log: Callable[[str], None],
    on_step: Callable[[int], None] | None = None,
) -> tuple[PreTrainedModel, dict]:
    """The shared loop of `verispec.training.loop` over the teacher's examples; with `resume`,
    continues from the last checkpoint."""
    schedule = Schedule(
        config.steps, config.lr, config.warmup, config.weight_decay, config.clip, config.checkpoint_every
    )

    def step_loss(model: PreTrainedModel, step: int) -> StepResult:
        batch = [examples[i] for i in batch_indices(step, config.batch_size, len(examples), config.seed)]
        loss, agree, positions = batch_loss(model, batch, config, device)
        return StepResult(loss, sum(len(e.ids) for e in batch), positions, agree)

    return fit(config.draft, config.out, schedule, step_loss, device, config.resume, log, "distill", on_step)


# -- evaluation -----------------------------------------------------------------------------------


@inference_mode
def greedy_padded(
    model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, eos: set[int]
) -> list[list[int]]:
    """Greedy continuations of prompts of any length, decoded together: left-padded, with the
    padding masked out and positions counted from each prompt's first token. Up to the rounding
    of batched matrix products (a flip needs a near-tie) these are each prompt's own greedy tokens."""
    import torch
    from transformers import DynamicCache

    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        logits_to_keep=1,
        **_cache_kwargs(model, cache),
    ).logits[:, -1]
    tokens = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)  # (B,)
        tokens.append(token.cpu())
        done |= torch.isin(token, eos_ids)
        if done.all() or step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions,
            **_cache_kwargs(model, cache),
        ).logits[:, -1]
    rows = torch.stack(tokens, dim=1).tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


def verifier_continuations(
    config: DistillConfig,
    verifier: PreTrainedModel,
    prompts: list[list[int]],
    eos: set[int],
    log: Callable[[str], None],
) -> list[list[int]]:
    """The verifier's greedy continuation of each evaluation prompt, cached in out/eval-verifier.pt
    (the one costly part of an evaluation: the draft's side is a single forward per prompt)."""
    import torch
    from tqdm import tqdm

    from verispec.models.loading import weights_digest

    path = config.out / "eval-verifier.pt"
    digest = _fingerprint(weights_digest(config.target), prompts, config.eval_new_tokens, sorted(eos))
    if path.is_file():
        cached = torch.load(path)
        if cached["fingerprint"] == digest:
            return cached["continuations"]
    log(
        f"verifier greedy continuations of {len(prompts)} evaluation prompts ({config.eval_new_tokens} tokens each)"
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad least
    continuations: list[list[int]] = [[] for _ in prompts]
    batches = [order[i : i + config.gen_batch_size] for i in range(0, len(order), config.gen_batch_size)]
    for batch in tqdm(batches, desc="eval verifier", unit="batch", file=sys.stderr):
        for i, tokens in zip(
            batch,
            greedy_padded(verifier, [prompts[i] for i in batch], config.eval_new_tokens, eos),
            strict=True,
        ):
            continuations[i] = tokens
    torch.save({"fingerprint": digest, "continuations": continuations}, path)
    return continuations


def agreement(
    draft: str, prompts: list[list[int]], continuations: list[list[int]], device: torch.device
) -> dict:
    """Teacher-forced greedy agreement: the share of the verifier's tokens that are also the
    draft's argmax given the same prefix. The draft is loaded as `verispec generate` loads it."""
    import torch

    from verispec.models.loading import load_model

    model = load_model(draft, device, torch.float32, role="draft")
    agreed = total = 0
    per_prompt = []
    for ids, cont in zip(prompts, continuations, strict=True):
        logits = model.session(capacity=len(ids) + len(cont)).extend(ids + cont[:-1])  # (T, V)
        guesses = logits[len(ids) - 1 :].argmax(-1).tolist()
        hits = sum(g == t for g, t in zip(guesses, cont, strict=True))
        agreed += hits
        total += len(cont)
        per_prompt.append(hits / len(cont))
    return {
        "agreement": agreed / total,
        "positions": total,
        "prompts": len(prompts),
        "per_prompt": per_prompt,
    }


# -- the whole run --------------------------------------------------------------------------------


def _check_inputs(config: DistillConfig) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    from verispec.models.loading import check_compatible, load_tokenizer

    sources = sum(
        [bool(config.data), config.prompts is not None, config.stdlib_prompts > 0, bool(config.audit_db)]
    )
    if sources != 1:
        raise UserError("give one training source: --data, --prompts, --stdlib-prompts or --audit-db")
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "max_new_tokens",
        "top_k",
        "gen_batch_size",
        "checkpoint_every",
        "eval_new_tokens",
    ):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(config, name)}")
    if config.lr <= 0:
        raise UserError(f"--lr must be positive, got {config.lr}")
    if config.loss not in ("fkl", "tvd"):
        raise UserError(f"--loss {config.loss!r}: use fkl or tvd")
    if config.eval_prompts not in (None, DEFAULT_EVAL_PROMPTS) and not Path(config.eval_prompts).is_file():
        raise UserError(f"--eval-prompts {config.eval_prompts} does not exist")
    if config.out.exists() and not config.out.is_dir():
        raise UserError(f"--out {config.out} is a file; give a folder")
    target_tok, draft_tok = load_tokenizer(config.target, "target"), load_tokenizer(config.draft, "draft")
    check_compatible(target_tok, draft_tok)
    return target_tok, draft_tok


def distill(
    config: DistillConfig, log: Callable[[str], None] = print, on_step: Callable[[int], None] | None = None
) -> dict:
    """Evaluate the draft, distil it from the verifier, evaluate again; returns what eval.json holds."""
    import torch
    from transformers import AutoModelForCausalLM

    from verispec.models.loading import resolve_device

    started_wall, started_cpu = time.perf_counter(), time.process_time()
    target_tok, draft_tok = _check_inputs(config)
    training, evaluation, note = split_prompts(config)
    log(note)
    fields = config.training_fields()
    claim_run(config.out, fields, config.resume)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    verifier = AutoModelForCausalLM.from_pretrained(config.target, dtype=torch.float32).to(device).eval()
    draft_config = AutoModelForCausalLM.from_pretrained(config.draft, dtype=torch.float32).config
    if draft_config.vocab_size != verifier.config.vocab_size:
        raise UserError(
            f"the draft's vocabulary ({draft_config.vocab_size}) and the verifier's "
            f"({verifier.config.vocab_size}) differ in size; distillation matches them token by token"
        )
    report: dict = {"target": config.target, "draft": config.draft, "data": note, "config": fields}

    eval_ids = [target_tok(p.text).input_ids for p in evaluation]
    window = getattr(verifier.config, "max_position_embeddings", None)
    longest = max(map(len, eval_ids), default=0) + config.eval_new_tokens
    if window is not None and longest > window:
        raise UserError(
            f"an evaluation prompt plus --eval-new-tokens is {longest} tokens, beyond the verifier's "
            f"context window of {window}; lower --eval-new-tokens or use shorter --eval-prompts"
        )
    continuations: list[list[int]] = []
    if evaluation:
        eval_started = time.process_time()
        continuations = verifier_continuations(config, verifier, eval_ids, _eos(verifier, target_tok), log)
        report["eval_verifier_cpu_s"] = time.process_time() - eval_started
        before = agreement(config.draft, eval_ids, continuations, device)
        log(
            f"before: greedy agreement {before['agreement']:.3f} over {before['positions']} positions of {before['prompts']} prompts"
        )
        report["before"] = before

    examples, report["teacher"] = build_teacher(config, verifier, target_tok, training, log)
    del verifier
    log(
        f"training on {report['teacher']['examples']} examples, {report['teacher']['positions']} distilled positions"
    )
    model, history = train(config, examples, device, log, on_step)
    final = config.out / "final"
    save_final(model, draft_tok, final, config.save_dtype)
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
    finish_report(report, config.out / "eval.json", started_wall, started_cpu, device)
    return report


# -- command line ---------------------------------------------------------------------------------


def add_distill_command(commands) -> None:
    defaults = DistillConfig(target="", draft="", out=Path())
    command = commands.add_parser(
        "distill", help="distil a draft from its verifier to raise greedy agreement"
    )
    command.add_argument("--target", required=True, help="verifier model folder (the teacher)")
    command.add_argument("--draft", required=True, help="draft model folder to start from (same tokenizer)")
    command.add_argument(
        "--out", type=Path, required=True, help="output folder: cache, checkpoints, final/, eval.json"
    )
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="text mode: JSONL files ('text'/'prompt'), folders or globs of .py files",
    )
    source.add_argument(
        "--prompts", type=Path, help="JSONL prompts; distilled on the verifier's greedy continuations"
    )
    source.add_argument(
        "--stdlib-prompts",
        type=int,
        metavar="N",
        help="N ~40-line windows of this machine's stdlib (q/r/s modules left out)",
    )
    source.add_argument(
        "--audit-db",
        metavar="URL",
        help="prompts of served requests from an audit trail (sqlite:///... or postgresql://...; content audited)",
    )
    command.add_argument("--audit-model", help="with --audit-db: only requests to this served model name")
    command.add_argument(
        "--audit-since", help="with --audit-db: only requests this recent (ISO time, or an age: 7d)"
    )
    command.add_argument(
        "--off-policy",
        action="store_true",
        help="train on the prompts' own text, not the verifier's continuations",
    )
    add_typed_flags(command, defaults, (
        ("--steps", int, "optimizer steps"),
        ("--batch-size", int, "sequences per step"),
        ("--seq-len", int, "tokens per training sequence (on-policy: prompt left-trimmed to fit)"),
        ("--max-new-tokens", int, "on-policy continuation length"),
        ("--lr", float, "peak learning rate"),
        ("--warmup", int, "warm-up steps (default: 5%% of --steps)"),
        ("--weight-decay", float, "AdamW weight decay"),
        ("--clip", float, "gradient norm clip"),
        ("--ce-weight", float, "weight of cross-entropy on the verifier's argmax"),
        ("--top-k", int, "verifier log-probs kept per position"),
        ("--gen-batch-size", int, "prompts decoded together by the verifier"),
        ("--checkpoint-every", int, "steps between checkpoints"),
        (
            "--eval-limit",
            int,
            "evaluation prompts (default: all; the last 16 when --prompts is the same file)",
        ),
        ("--eval-new-tokens", int, "verifier tokens per evaluation prompt"),
        ("--seed", int, "seed of data order and windows"),
    ))  # fmt: skip
    command.add_argument(
        "--loss", choices=("fkl", "tvd"), default=defaults.loss, help="divergence (default: %(default)s)"
    )
    command.add_argument(
        "--eval-prompts",
        type=Path,
        default=defaults.eval_prompts,
        help="held-out JSONL prompts (default: the shared prompts where present, else 32 windows of the stdlib's q/r/s modules)",
    )
    command.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    add_run_flags(command, defaults.save_dtype)
    command.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    config = DistillConfig(
        target=args.target,
        draft=args.draft,
        out=args.out,
        data=tuple(args.data or ()),
        prompts=args.prompts,
        stdlib_prompts=args.stdlib_prompts or 0,
        audit_db=args.audit_db,
        audit_model=args.audit_model,
        audit_since=args.audit_since,
        off_policy=args.off_policy,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_new_tokens=args.max_new_tokens,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip=args.clip,
        loss=args.loss,
        ce_weight=args.ce_weight,
        top_k=args.top_k,
        gen_batch_size=args.gen_batch_size,
        checkpoint_every=args.checkpoint_every,
        eval_prompts=None if args.no_eval else args.eval_prompts,
        eval_limit=args.eval_limit,
        eval_new_tokens=args.eval_new_tokens,
        save_dtype=args.save_dtype,
        seed=args.seed,
        device=args.device,
        resume=args.resume,
    )
    if args.stdlib_prompts is not None and args.stdlib_prompts < 1:
        raise UserError(f"--stdlib-prompts must be 1 or more, got {args.stdlib_prompts}")
    report = distill(config, log=lambda line: print(line, file=sys.stderr))
    summary = {k: report[k] for k in ("before", "after") if k in report}
    for k, v in summary.items():
        print(
            f"{k}: greedy agreement {v['agreement']:.4f} ({v['positions']} positions, {v['prompts']} prompts)"
        )
    t = report["training"]
    print(
        f"trained {t['steps']} steps, {t['tokens']} tokens, {t['positions']} distilled positions; "
        f"wall {report['wall_s']:.0f}s, CPU {report['cpu_s']:.0f}s; draft in {report['final']}"
    )
    return 0
