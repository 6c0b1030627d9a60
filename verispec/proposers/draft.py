"""A smaller causal LM as the proposer."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from verispec.core.sampling import sample, warp
from verispec.errors import ProposerError
from verispec.models.backend import CausalLM
from verispec.proposers.base import DraftPolicy, Proposal


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
            token, dist = _draw(logits, policy, first=i == 0)
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
        return _align(logits, self.target_vocab_size)


def _align(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Draft logits over the target's vocabulary width (embedding matrices are often padded)."""
    if logits.shape[-1] == width:
        return logits
    if logits.shape[-1] > width:
        return logits[..., :width]
    return torch.nn.functional.pad(logits, (0, width - logits.shape[-1]), value=float("-inf"))


class DraftState:
    """One request's place in a `DraftBatch`: its blocks in the draft's cache and the tokens they hold."""

    def __init__(self, table):
        self.table = table
        self.cached: list[int] = []


class DraftBatch:
    """The draft model drafting for many requests at once: one draft pass per draft position,
    over the rows of every request still drafting, on a paged cache of its own (`core/runner.py`).

    Each request's state is kept in step with its verified context as `DraftModelSession` does
    it: roll back to the longest prefix shared with the context (dropping rejected drafts), feed
    what is new, then draft. The same requests get the same drafts whatever else is in the batch
    (the kernel step computes every row alone; sampled drafts draw from the request's generator)."""

    def __init__(self, proposer: DraftModelProposer, memory_bytes: int, block_size: int):
        from verispec.core.runner import ModelRunner

        self.proposer = proposer
        self.name = proposer.name
        self.runner = ModelRunner(proposer.lm, memory_bytes, block_size, prefix_cache=True)

    def state(self) -> DraftState:
        from verispec.core.kv_cache import BlockTable

        return DraftState(BlockTable(self.runner.pool))

    def release(self, state: DraftState) -> None:
        state.table.free()
        state.cached = []

    def propose(self, items: Sequence[tuple[DraftState, Sequence[int], int, DraftPolicy]]) -> list[Proposal]:
        from verispec.core.runner import Segment

        started = time.perf_counter()
        window = self.proposer.lm.max_positions
        for _, context, depth, _ in items:
            if window is not None and len(context) + depth > window:
                raise ProposerError(f"context of {len(context)} tokens is beyond the draft's window of {window}")
        segments = []
        for state, context, _, _ in items:
            fed = self._catch_up(state, context)
            segments.append(Segment(fed, len(state.cached), state.table, logits=1))
            state.cached.extend(fed)
        logits = [out[-1] for out in self.runner.forward(segments)]
        for state, context, _, _ in items:
            state.table.verified(len(context), context)
        tokens: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        active = [i for i, (_, _, depth, _) in enumerate(items) if depth > 0]
        while active:
            fed = []
            for i in active:
                state, _, depth, policy = items[i]
                token, dist = _draw(_align(logits[i], self.proposer.target_vocab_size), policy, first=not tokens[i])
                if token is None:
                    continue  # the draft is unsure: stop here
                tokens[i].append(token)
                if dist is not None:
                    probs[i].append(dist)
                if len(tokens[i]) < depth and time.perf_counter() - started <= policy.time_budget_s:
                    fed.append(i)
            if not fed:
                break
            segments = [Segment([tokens[i][-1]], len(items[i][0].cached), items[i][0].table, logits=1) for i in fed]
            for i, out in zip(fed, self.runner.forward(segments), strict=True):
                items[i][0].cached.append(tokens[i][-1])
                logits[i] = out[-1]
            active = fed
        return [Proposal(t, torch.stack(p) if p else None) for t, p in zip(tokens, probs, strict=True)]

    @staticmethod
    def _catch_up(state: DraftState, context: Sequence[int]) -> list[int]:
        """Roll the state back to what it shares with the context; the tokens to feed (at least the last)."""
        if not state.cached and not state.table.blocks:
            state.cached = list(context[: state.table.reuse_prefix(context)])
        limit = min(len(state.cached), len(context) - 1)
        common = 0
        while common < limit and state.cached[common] == context[common]:
            common += 1
        del state.cached[common:]
        state.table.computed = common
        return list(context[common:])


def _draw(logits: torch.Tensor, policy: DraftPolicy, first: bool) -> tuple[int | None, torch.Tensor | None]:
    """The next draft token and, where the acceptance rule or an inspection needs it, its
    distribution; None once the draft's confidence falls below the policy's floor."""
    greedy = policy.sampling.greedy
    if greedy:
        token = int(logits.argmax())
        dist = torch.softmax(logits.float(), dim=-1) if policy.min_confidence > 0 or policy.want_probs else None
        confidence = float(dist[token]) if dist is not None else 1.0
    else:
        dist = warp(logits, policy.sampling)
        confidence = float(dist.max())
    if not first and confidence < policy.min_confidence:
        return None, None
    if not greedy:
        token = int(sample(dist, policy.generator))
    return token, dist if (not greedy or policy.want_probs) else None
