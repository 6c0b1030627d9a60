"""The teacher: the verifier's greedy continuations and its top-k log-probabilities, computed once.

The verifier is loaded as the engine loads it (`verispec.models.load_model`: the lean backend
where it runs the checkpoint) and decodes through its own KV cache, so the continuations are the
engine's verifier-only output and the teacher's distributions are the logits the verifier will
score drafts with. `greedy` decodes as the engine does at depth 0: the prompt but its last token
prefilled, then one token per pass. Prompts decode together where the backend batches passes
(the lean Llama backend, through the batched engine's runner, `verispec.core.runner`): every row
is its own sequence, with no padding, and on the CPU kernel step a row's logits are the same bits
alone or in a batch, so the batch is each prompt's own decoding. Other backends decode one
prompt at a time, each in its own KV cache.

The examples are cached in shards under out/teacher, so that epochs, an interrupted build and a
`--resume` never rerun the verifier for what is already there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from verispec.prompts import Prompt
from verispec.training.distill.data import prompt_ids, text_chunks

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from verispec.models.backend import CausalLM
    from verispec.training.distill.command import DistillSettings

BLOCK_SIZE = 16  # positions per block of the batched decoding's KV cache


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


@dataclass
class Decoded:
    """A greedy continuation, up to and including its first EOS, and with `top_k` the top-k rows
    of the distributions its tokens were chosen from."""

    tokens: list[int]
    top_ids: torch.Tensor | None = None  # (N, k) int32
    top_logp: torch.Tensor | None = None  # (N, k) float16


def top(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row of logits (..., V) and their log-probabilities."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, k, dim=-1)
    return ids.to(torch.int32).cpu(), values.to(torch.float16).cpu()


def greedy(
    lm: CausalLM, prompts: list[list[int]], max_new_tokens: int, eos: frozenset[int], top_k: int = 0
) -> list[Decoded]:
    """Each prompt's greedy continuation of at most `max_new_tokens` tokens (see the module's docstring)."""
    import torch

    from verispec.core.runner import batchable

    with torch.inference_mode():
        rows = (
            _Batched(lm, prompts, max_new_tokens)
            if batchable(lm) is None
            else _Sequential(lm, prompts, max_new_tokens)
        )
        last = [p[-1] for p in prompts]
        tokens: list[list[int]] = [[] for _ in prompts]
        tops: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        for _ in range(max_new_tokens):
            logits = rows.step(live, [last[i] for i in live])  # (len(live), V)
            chosen = logits.argmax(-1).tolist()
            top_ids, top_logp = top(logits, top_k) if top_k else (None, None)
            for row, (i, token) in enumerate(zip(live, chosen, strict=True)):
                tokens[i].append(token)
                last[i] = token
                if top_k:
                    tops[i].append((top_ids[row], top_logp[row]))
            live = [i for i in live if last[i] not in eos]
            if not live:
                break
    if not top_k:
        return [Decoded(t) for t in tokens]
    return [
        Decoded(t, torch.stack([r[0] for r in k]), torch.stack([r[1] for r in k]))
        for t, k in zip(tokens, tops, strict=True)
    ]


class _Sequential:
    """One KV session per prompt: a pass feeds one row of one sequence."""

    def __init__(self, lm: CausalLM, prompts: list[list[int]], max_new_tokens: int):
        self.sessions = [lm.session(capacity=len(p) + max_new_tokens) for p in prompts]
        for session, prompt in zip(self.sessions, prompts, strict=True):
            if len(prompt) > 1:
                session.extend(prompt[:-1], last_only=True)

    def step(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        import torch

        return torch.cat(
            [self.sessions[i].extend([t], last_only=True) for i, t in zip(rows, tokens, strict=True)]
        )


class _Batched:
    """The batched engine's runner over a paged KV cache sized for these prompts: a pass feeds one
    row of every sequence still decoding."""

    def __init__(self, lm: CausalLM, prompts: list[list[int]], max_new_tokens: int):
        from verispec.core.kv_cache import BlockTable
        from verispec.core.runner import ModelRunner, Segment

        # Every prompt's positions, and at least the runner's floor: one sequence at the full window.
        blocks = sum(-(-(len(p) + max_new_tokens) // BLOCK_SIZE) for p in prompts)
        blocks = max(blocks, lm.max_positions // BLOCK_SIZE + 1)
        # Keys and values of every layer, in float32 (the verifier is loaded so).
        per_block = 2 * len(lm.layers) * lm.kv_heads * BLOCK_SIZE * lm.head_dim * 4
        self.runner = ModelRunner(lm, blocks * per_block, BLOCK_SIZE, prefix_cache=False)
        self.tables = [BlockTable(self.runner.pool) for _ in prompts]
        self.lengths = [len(p) - 1 for p in prompts]
        for prompt, table in zip(prompts, self.tables, strict=True):
            if len(prompt) > 1:
                self.runner.forward([Segment(prompt[:-1], 0, table, logits=0)])

    def step(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        import torch

        from verispec.core.runner import Segment

        segments = [Segment([t], self.lengths[i], self.tables[i]) for i, t in zip(rows, tokens, strict=True)]
        logits = self.runner.forward(segments)
        for i in rows:
            self.lengths[i] += 1
        return torch.cat(logits)


def on_policy_examples(
    lm: CausalLM, prompts: list[list[int]], max_new_tokens: int, top_k: int, eos: frozenset[int]
) -> list[Example]:
    """The verifier's greedy continuation of each prompt, trained on at every new position (the
    EOS included: it is proposed too)."""
    import torch

    examples = []
    for prompt, decoded in zip(prompts, greedy(lm, prompts, max_new_tokens, eos, top_k), strict=True):
        ids = torch.tensor(prompt + decoded.tokens[:-1], dtype=torch.int32)
        examples.append(Example(ids, len(prompt) - 1, decoded.top_ids, decoded.top_logp))
    return examples


def text_examples(lm: CausalLM, chunks: list[list[int]], top_k: int) -> list[Example]:
    """The verifier's top-k at every position of each text chunk, one pass per chunk."""
    import torch

    examples = []
    with torch.inference_mode():
        for chunk in chunks:
            top_ids, top_logp = top(lm.session(capacity=len(chunk)).extend(chunk), top_k)  # (T, k)
            examples.append(Example(torch.tensor(chunk, dtype=torch.int32), 0, top_ids, top_logp))
    return examples


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def build_teacher(
    settings: DistillSettings,
    verifier: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    training: list[Prompt],
    log: Callable[[str], None],
) -> tuple[list[Example], dict]:
    """The training examples with the verifier's distributions, built once and cached in shards
    under out/teacher so that an interrupted build resumes at the next shard."""
    import torch
    from tqdm import tqdm

    from verispec.models.loading import weights_digest

    on_policy = bool(training) and not settings.off_policy
    if on_policy:
        sequences = prompt_ids(settings, tokenizer, training)
        size = settings.gen_batch_size
    else:
        sequences = text_chunks(settings, tokenizer, training)
        size = max(1, settings.gen_batch_size // 4)  # full-length passes: fewer rows to a shard
    if settings.head and not on_policy:
        # A head reads the verifier's features and greedy choices, which it takes from a pass of its
        # own (`head.Sequences`): text needs no teacher pass.
        no_ids, no_logp = torch.empty(0, 0, dtype=torch.int32), torch.empty(0, 0, dtype=torch.float16)
        examples = [Example(torch.tensor(c, dtype=torch.int32), 0, no_ids, no_logp) for c in sequences]
        return examples, _summary(on_policy, examples, 0.0, 0.0)
    batches = [sequences[i : i + size] for i in range(0, len(sequences), size)]
    from verispec.core.rounds import stop_tokens  # where a greedy decode ends, as in the engine

    eos = stop_tokens(verifier, tokenizer)
    digest = fingerprint(
        weights_digest(settings.target),
        on_policy,
        batches,
        settings.max_new_tokens,
        settings.top_k,
        sorted(eos),
    )
    folder = settings.out / "teacher"
    manifest = folder / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") != digest:
        shutil.rmtree(folder)  # other data or another verifier: rebuild
    folder.mkdir(parents=True, exist_ok=True)
    manifest.write_text(
        json.dumps({"fingerprint": digest, "shards": len(batches), "on_policy": on_policy}) + "\n"
    )
    examples: list[Example] = []
    built = cpu = 0.0
    done = sum((folder / f"shard-{i:05d}.pt").is_file() for i in range(len(batches)))
    if done < len(batches):
        log(
            f"verifier {'greedy continuations' if on_policy else 'distributions'} for {len(sequences)} "
            f"{'prompts' if on_policy else 'chunks'} ({done}/{len(batches)} batches cached)"
        )
    for i, rows in enumerate(
        tqdm(batches, desc="teacher", unit="batch", file=sys.stderr, disable=done == len(batches))
    ):
        shard = folder / f"shard-{i:05d}.pt"
        if not shard.is_file():
            wall, cpu0 = time.perf_counter(), time.process_time()
            part = (
                on_policy_examples(verifier, rows, settings.max_new_tokens, settings.top_k, eos)
                if on_policy
                else text_examples(verifier, rows, settings.top_k)
            )
            torch.save([asdict(e) for e in part], shard.with_suffix(".tmp"))
            shard.with_suffix(".tmp").rename(shard)  # a shard exists only when complete
            built += time.perf_counter() - wall
            cpu += time.process_time() - cpu0
        examples.extend(Example(**e) for e in torch.load(shard))
    return examples, _summary(on_policy, examples, built, cpu)


def _summary(on_policy: bool, examples: list[Example], built: float, cpu: float) -> dict:
    """The report's "teacher" part: what the examples hold and what building them cost."""
    return {
        "mode": "on-policy" if on_policy else "text",
        "examples": len(examples),
        "positions": sum(len(e.top_ids) for e in examples),
        "tokens": sum(len(e.ids) for e in examples),
        "build_wall_s": built,
        "build_cpu_s": cpu,
    }
