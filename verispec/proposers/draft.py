"""A smaller causal LM as the proposer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from verispec.core.sampling import align_vocab, draw_draft
from verispec.errors import ProposerError
from verispec.models.backend import CausalLM
from verispec.proposers.base import DraftPolicy, Proposal

if TYPE_CHECKING:
    from verispec.proposers import ProposerInputs


def build(inputs: ProposerInputs) -> DraftModelProposer:
    """The "draft" proposer's builder (its row in `verispec/proposers/names.py` names it)."""
    assert inputs.draft is not None, "the draft proposer needs a draft model"
    return DraftModelProposer(inputs.draft, target_vocab_size=inputs.target.vocab_size)


class DraftModelProposer:
    inline = False  # a model's passes: not on the engine thread between its own passes

    def __init__(self, lm: CausalLM, target_vocab_size: int):
        self.lm = lm
        self.name = f"draft:{lm.name}"
        self.target_vocab_size = target_vocab_size

    @property
    def draft_model(self) -> CausalLM:
        """The batched engine may draft with this model for all its requests at once."""
        return self.lm

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
        policy_greedy = policy.sampling.greedy and policy.min_confidence == 0 and not policy.want_probs
        if policy_greedy and depth > 1 and getattr(self.kv, "greedy_native", lambda: False)():
            # The whole greedy draft in one native call: the same tokens as the loop below, without
            # Python's and torch's cost per draft step (most of a small draft's step).
            first = int(logits.argmax())
            rest = self.kv.greedy(first, depth - 1, vocab=min(logits.shape[-1], self.lm.vocab_size))
            self.cached.extend([first, *rest[:-1]])
            return Proposal([first, *rest], None)
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(depth):
            token, dist = draw_draft(logits, policy, first=i == 0, position=len(context) + i)
            if token is None:
                break  # the draft is unsure; further tokens would mostly be rejected
            if dist is not None:
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
        return align_vocab(logits, self.target_vocab_size)
