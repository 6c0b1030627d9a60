"""A smaller causal LM as the proposer."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from verispec.errors import ProposerError
from verispec.models.backend import CausalLM
from verispec.proposers.base import DraftPolicy, Proposal
from verispec.sampling import sample, warp


class DraftModelProposer:
    def __init__(self, lm: CausalLM, target_vocab_size: int):
        self.lm = lm
        self.name = f"draft:{lm.name}"
        self.target_vocab_size = target_vocab_size

    def session(self) -> DraftModelSession:
        return DraftModelSession(self.lm, self.target_vocab_size)


class DraftModelSession:
    """Keeps the draft's own KV cache in step with the verified context.

    The cache holds `cached` tokens. Each proposal first rolls it back to the longest prefix it
    shares with the context (dropping drafts the verifier rejected), feeds what is new, then
    drafts one token per forward pass. The last draft token is never fed: if it is accepted it
    arrives with the next context.
    """

    def __init__(self, lm: CausalLM, target_vocab_size: int):
        self.lm = lm
        self.kv = lm.session()
        self.cached: list[int] = []
        self.target_vocab_size = target_vocab_size
        self.context_seen = 0  # contexts only grow: positions below this are known to match

    def reset(self) -> None:
        self.kv = self.lm.session()
        self.cached = []
        self.context_seen = 0

    def propose(self, context: Sequence[int], depth: int, policy: DraftPolicy) -> Proposal:
        started = time.perf_counter()
        if self.lm.max_positions is not None and len(context) + depth > self.lm.max_positions:
            raise ProposerError(f"context of {len(context)} tokens is beyond the draft's window of {self.lm.max_positions}")
        logits = self._catch_up(context)
        greedy = policy.sampling.greedy
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(depth):
            if greedy:
                token = int(logits.argmax())
                # Greedy acceptance needs no draft distribution: build it only to test confidence
                # or when the request is inspected.
                dist = torch.softmax(logits.float(), dim=-1) if policy.min_confidence > 0 or policy.want_probs else None
                confidence = float(dist[token]) if dist is not None else 1.0
            else:
                dist = warp(logits, policy.sampling)  # (V,)
                confidence = float(dist.max())
            if i > 0 and confidence < policy.min_confidence:
                break  # the draft is unsure; further tokens would mostly be rejected
            if not greedy:
                token = int(sample(dist, policy.generator))
            if not greedy or policy.want_probs:
                probs.append(dist)
            tokens.append(token)
            if i == depth - 1 or time.perf_counter() - started > policy.time_budget_s:
                break
            logits = self._feed([token])
        return Proposal(tokens, torch.stack(probs) if probs else None)

    def _catch_up(self, context: Sequence[int]) -> torch.Tensor:
        limit = min(len(self.cached), len(context) - 1)  # feed at least the last context token
        common = min(self.context_seen, limit)
        while common < limit and self.cached[common] == context[common]:
            common += 1
        self.kv.rollback(common)
        del self.cached[common:]
        self.context_seen = len(context)
        return self._feed(context[common:])

    def _feed(self, tokens: Sequence[int]) -> torch.Tensor:
        logits = self.kv.extend(tokens, last_only=True)[-1]  # (V_draft,)
        self.cached.extend(tokens)
        return _align(logits, self.target_vocab_size)


def _align(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Draft logits over the target's vocabulary width (embedding matrices are often padded)."""
    if logits.shape[-1] == width:
        return logits
    if logits.shape[-1] > width:
        return logits[..., :width]
    return torch.nn.functional.pad(logits, (0, width - logits.shape[-1]), value=float("-inf"))
