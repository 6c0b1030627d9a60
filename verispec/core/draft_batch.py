"""A draft model drafting for every request of a batched pass at once (`batch.py`): core machinery
beside the runner it drives, not a proposer of its own. A proposer offers its model for this by
its `draft_model` (`proposers/base.py`); the draft model proposer does."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from verispec.core.kv_cache import BlockTable
from verispec.core.runner import ModelRunner, Segment
from verispec.core.sampling import align_vocab, draw_draft
from verispec.core.trees import Growth, top_tokens
from verispec.errors import ProposerError
from verispec.models.lean import LeanLM
from verispec.proposers.base import DraftPolicy, Proposal

CATCH_UP_ROWS = 16  # rows a request may feed in a pass that still counts as a draft pass


def draft_pass_s(timed: list[tuple[int, int, float]]) -> tuple[float | None, float | None]:
    """What a proposal's draft passes cost, for depth auto (`goodput.LiveCosts.observe_draft`):
    the median seconds of its passes after the first, and its first (each pass as rows, requests,
    seconds; None where it had none). Only a pass that fed at most CATCH_UP_ROWS rows a request
    counts (a draft position, or catching up on a few verified tokens): one that reads a new
    request's prompt would price every later draft like a prefill."""
    drafts = [s if rows <= CATCH_UP_ROWS * requests else None for rows, requests, s in timed]
    later = sorted(s for s in drafts[1:] if s is not None)
    return (later[len(later) // 2] if later else None), (drafts[0] if drafts else None)


def greedy_native(runner: ModelRunner, items) -> bool:
    """Whether a batched drafter's whole proposal can run in one native call: greedy chains with
    no confidence floor and no distributions wanted, on the kernel step."""
    return runner.greedy_native() and all(
        policy.sampling.greedy and policy.min_confidence == 0 and not policy.want_probs and policy.width == 1
        for _, _, _, policy in items
    )


class DraftState:
    """One request's place in a `DraftBatch`: its blocks in the draft's cache and the tokens they hold."""

    def __init__(self, table: BlockTable):
        self.table = table
        self.cached: list[int] = []


class DraftBatch:
    """The draft model drafting for many requests at once: one draft pass per draft position,
    over the rows of every request still drafting, on a paged cache of its own (`runner.py`).

    Each request's state is kept in step with its verified context as `DraftModelSession` does
    it: roll back to the longest prefix shared with the context (dropping rejected drafts), feed
    what is new, then draft. The same requests get the same drafts whatever else is in the batch
    (the kernel step computes every row alone; sampled drafts draw from the request's generator)."""

    def __init__(self, lm: LeanLM, target_vocab_size: int, memory_bytes: int, block_size: int):
        self.lm = lm
        self.target_vocab_size = target_vocab_size
        self.runner = ModelRunner(lm, memory_bytes, block_size, prefix_cache=True)
        self.pass_s: tuple[float | None, float | None] = (None, None)  # the last proposal's (`draft_pass_s`)

    def state(self) -> DraftState:
        return DraftState(BlockTable(self.runner.pool))

    def release(self, state: DraftState) -> None:
        state.table.free()
        state.cached = []

    def propose(self, items: Sequence[tuple[DraftState, Sequence[int], int, DraftPolicy]]) -> list[Proposal]:
        started = time.perf_counter()
        window = self.lm.max_positions
        for _, context, depth, _ in items:
            if window is not None and len(context) + depth > window:
                raise ProposerError(f"context of {len(context)} tokens is beyond the draft's window of {window}")
        segments = []
        for state, context, _, _ in items:
            fed = self._catch_up(state, context)
            segments.append(Segment(fed, len(state.cached), state.table, logits=1))
            state.cached.extend(fed)
        t0 = time.perf_counter()
        logits = [out[-1] for out in self.runner.forward(segments)]
        timed = [(sum(len(s.tokens) for s in segments), len(segments), time.perf_counter() - t0)]
        for state, context, _, _ in items:
            state.table.verified(len(context), context)
        if greedy_native(self.runner, items):
            t0 = time.perf_counter()
            proposals = self._greedy(items, logits)
            steps = max((items[i][2] for i in range(len(items))), default=1) - 1
            if steps > 0:  # one native call for every position after the first
                timed.append((len(items), len(items), (time.perf_counter() - t0) / steps))
            self.pass_s = draft_pass_s(timed)
            return proposals
        tokens: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        trees = {i: Growth(context[-1], policy.width, depth) for i, (_, context, depth, policy) in enumerate(items) if depth > 0 and policy.width > 1 and self.runner.trees}
        active = [i for i, (_, _, depth, _) in enumerate(items) if depth > 0 and i not in trees]
        while active:
            fed = []
            for i in active:
                state, _, depth, policy = items[i]
                position = len(items[i][1]) + len(tokens[i])
                token, dist = draw_draft(align_vocab(logits[i], self.target_vocab_size), policy, first=not tokens[i], position=position)
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
            t0 = time.perf_counter()
            outputs = self.runner.forward(segments)
            timed.append((len(segments), len(segments), time.perf_counter() - t0))
            for i, out in zip(fed, outputs, strict=True):
                items[i][0].cached.append(tokens[i][-1])
                logits[i] = out[-1]
            active = fed
        self._grow(items, trees, logits, started, timed)
        self.pass_s = draft_pass_s(timed)
        return [
            trees[i].proposal(items[i][3].width * items[i][2]) if i in trees else Proposal(t, torch.stack(p) if p else None)
            for i, (t, p) in enumerate(zip(tokens, probs, strict=True))
        ]

    def _grow(self, items, trees: dict[int, Growth], logits: list[torch.Tensor], started: float, timed: list) -> None:
        """Grow each token tree a level per draft pass (`trees.Growth`), from its root's row: the
        fed nodes as one tree segment from the root's position (the last context token, fed
        again: the same bits), the frontier's rows read."""
        for i, tree in trees.items():
            tree.expand([top_tokens(align_vocab(logits[i], self.target_vocab_size), tree.width)])
        budget = min((policy.time_budget_s for _, _, _, policy in items), default=0.0)
        growing = [i for i, tree in trees.items() if tree.growing]
        while growing:
            segments = []
            for i in growing:
                ids, parents, frontier = trees[i].segment()
                segments.append(Segment(ids, len(items[i][1]) - 1, items[i][0].table, logits=len(frontier), parents=parents))
            t0 = time.perf_counter()
            outputs = self.runner.forward(segments)
            timed.append((sum(len(s.tokens) for s in segments), len(segments), time.perf_counter() - t0))
            for i, out in zip(growing, outputs, strict=True):
                tree = trees[i]
                tree.expand([top_tokens(align_vocab(row, self.target_vocab_size), tree.width) for row in out])
            growing = [i for i in growing if trees[i].growing and time.perf_counter() - started <= budget]

    def _greedy(self, items, logits: list[torch.Tensor]) -> list[Proposal]:
        """Greedy drafts for every item in one native call after the first token (`ModelRunner.greedy`):
        the tokens the loop in `propose` would choose, without Python's cost per draft position
        (most of a small draft's step). Rows that want fewer drafts than the deepest are cut."""
        vocab = min(logits[0].shape[-1], self.target_vocab_size) if logits else 0
        firsts = [int(align_vocab(row, self.target_vocab_size).argmax()) for row in logits]
        drafting = [i for i, (_, _, depth, _) in enumerate(items) if depth > 1]
        steps = max((items[i][2] for i in drafting), default=1) - 1
        rest: dict[int, list[int]] = {}
        if drafting:
            states = [items[i][0] for i in drafting]
            rows = self.runner.greedy(
                [state.table for state in states], [firsts[i] for i in drafting], [len(state.cached) for state in states], steps, vocab
            )  # fmt: skip
            rest = dict(zip(drafting, rows, strict=True))
        proposals = []
        for i, (state, _, depth, _) in enumerate(items):
            drafted = ([firsts[i], *rest.get(i, [])])[:depth]
            state.cached.extend(drafted[:-1])  # the last draft is never fed: if accepted it comes with the context
            proposals.append(Proposal(drafted))
        return proposals

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
