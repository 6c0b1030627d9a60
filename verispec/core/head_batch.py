"""A draft head drafting for every request of a batched pass at once: core machinery beside the
runner it drives, as `draft_batch.py` is for a draft model. A proposer offers its head for this
by its `head_model` (`proposers/base.py`); the draft head proposer does.

A head reads the verifier's features (`models/head.py`): the engine hands each request's state
the features of its verified positions as the verifier's passes compute them (`HeadState.observe`:
a prompt chunk's rows, and a round's verified rows). A proposal first feeds the head every
verified position it has not read, then drafts one token per head pass, feeding its own predicted
feature back; positions fed with drafts are overwritten at the next proposal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from verispec.core.draft_batch import draft_pass_s, greedy_native
from verispec.core.kv_cache import BlockTable
from verispec.core.runner import ModelRunner, Segment
from verispec.core.sampling import draw_draft
from verispec.core.trees import Growth, top_tokens
from verispec.errors import ProposerError
from verispec.models.head import DraftHead
from verispec.proposers.base import DraftPolicy, Proposal


class HeadState:
    """One request's place in a `HeadBatch`: its blocks in the head's cache and the verifier's
    features of its verified positions.

    Position t of the head's cache is fed [token t+1, feature t]. Positions below `fed` hold
    verified inputs only (the verifier's features and verified tokens); the ones past them were fed
    drafts."""

    def __init__(self, table: BlockTable, width: int, device: torch.device, read=lambda rows: rows):
        self.table = table
        self.read = read  # the head's features of the verifier's (`DraftHead.read_features`)
        self.features = torch.empty((0, width), device=device)
        self.known = 0  # positions 0..known-1 have the verifier's features
        self.fed = 0
        self.remembered = 0  # leading blocks whose features the batch keeps (`HeadBatch.remember`)

    def observe(self, start: int, rows: torch.Tensor) -> None:
        """The verifier's features of positions start.. (rows (n, columns), as its pass gives them).
        A start before what is known (a preempted request recomputed) replaces what follows."""
        self.restore(start, self.read(rows))

    def restore(self, start: int, features: torch.Tensor) -> None:
        """The head's features (n, D) of positions start.., as `read` made them (from the verifier's
        pass, or kept with the prefix cache's blocks: `HeadBatch.recall`)."""
        if start > self.known:  # a gap: nothing past it can be fed until it is filled
            raise ProposerError(f"verifier features from position {start}, but only {self.known} are known")
        end = start + features.shape[0]
        if end > self.features.shape[0]:
            size = max(end, 2 * self.features.shape[0], 256)
            grown = torch.empty((size, self.features.shape[1]), device=self.features.device)
            grown[: self.known] = self.features[: self.known]
            self.features = grown
        self.features[start:end] = features
        self.known = end
        self.fed = min(self.fed, start)


class HeadBatch:
    """The head drafting for many requests at once: one head pass per draft position, over the
    rows of every request still drafting, on a paged cache of its own (`runner.py`). The same
    requests get the same drafts whatever else is in the batch (the kernel step computes every row
    alone; sampled drafts draw from the request's generator)."""

    def __init__(self, head: DraftHead, memory_bytes: int, block_size: int):
        self.head = head
        self.runner = ModelRunner(head, memory_bytes, block_size, prefix_cache=False)
        self.pass_s: tuple[float | None, float | None] = (None, None)  # the last proposal's (`draft_batch.draft_pass_s`)
        # The features of the verifier's cached blocks, by the prefix hash that names each block
        # (`kv_cache.py`): its prefix cache keeps keys and values, and a head reads a feature at
        # every position, so without these a request with a cached prefix would recompute it.
        self.kept: dict[bytes, torch.Tensor] = {}

    def remember(self, state: HeadState, keys: Sequence[bytes], pool) -> None:
        """Keep the features of a request's blocks that the verifier's prefix cache now names by
        `keys` (its table's, in order), so that a later request with that prefix reuses them whole.
        Entries whose block the pool has since evicted go once they outnumber its blocks by a
        quarter (so that the sweep costs a few lookups per entry kept)."""
        bs = pool.block_size
        end = min(len(keys), state.known // bs)
        for i in range(state.remembered, end):
            if keys[i] not in self.kept:
                self.kept[keys[i]] = state.features[i * bs : (i + 1) * bs].clone()
        state.remembered = max(state.remembered, end)
        if len(self.kept) > pool.num_blocks + pool.num_blocks // 4:
            self.kept = {key: rows for key, rows in self.kept.items() if pool.holds(key)}

    def recall(self, keys: Sequence[bytes]) -> list[torch.Tensor]:
        """The kept features of the leading blocks named by `keys`, as far as they are kept."""
        rows = []
        for key in keys:
            if (kept := self.kept.get(key)) is None:
                break
            rows.append(kept)
        return rows

    def state(self) -> HeadState:
        return HeadState(BlockTable(self.runner.pool), self.head.embed.shape[1], self.head.device, self.head.read_features)

    def release(self, state: HeadState) -> None:
        state.table.free()
        state.known = state.fed = state.remembered = 0

    def propose(self, items: Sequence[tuple[HeadState, Sequence[int], int, DraftPolicy]]) -> list[Proposal]:
        started = time.perf_counter()
        head, window = self.head, self.head.max_positions
        # A one-token context has no verified feature to start from: those items draft nothing.
        drafting = [i for i, (_, context, depth, _) in enumerate(items) if len(context) >= 2 and depth >= 1]
        for i in drafting:
            state, context, depth, _ = items[i]
            if state.known < len(context) - 1:
                raise ProposerError(
                    f"the verifier's features reach position {state.known}, the context {len(context) - 1}"
                )
            if window is not None and len(context) + depth > window:
                raise ProposerError(
                    f"context of {len(context)} tokens is beyond the draft head's window of {window}"
                )
        segments = []
        for i in drafting:  # every verified position the head has not read: rows fed..L-2
            state, context, _, _ = items[i]
            L = len(context)
            ids, inputs = list(context[state.fed + 1 : L]), state.features[state.fed : L - 1]
            segments.append(Segment(ids, state.fed, state.table, logits=1, features=True, inputs=inputs))
            state.table.computed = state.fed = L - 1
        if segments and greedy_native(self.runner, [items[i] for i in drafting]):
            return self._greedy(items, drafting, segments)
        # Greedy drafts need no distribution over the verifier's vocabulary: the draft vocabulary's
        # argmax, mapped back, is the same token (d2t is sorted, so ties break alike).
        greedy = {i: items[i][3].sampling.greedy and not items[i][3].want_probs for i in drafting}
        tokens: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        trees = {i: Growth(items[i][1][-1], items[i][3].width, items[i][2]) for i in drafting if items[i][3].width > 1 and self.runner.trees}
        timed = []
        while segments:
            t0 = time.perf_counter()
            outputs = self.runner.forward(segments)
            timed.append((sum(len(s.tokens) for s in segments), len(segments), time.perf_counter() - t0))
            going, following = [], []
            for i, segment, out in zip(drafting, segments, outputs, strict=True):
                state, context, depth, policy = items[i]
                if i in trees:  # grown a level per pass from here (`_grow`)
                    trees[i].expand([self._top(out[-1], trees[i].width)])
                    trees[i].hidden = {0: segment.hidden[-1]}
                    continue
                position = len(context) + len(tokens[i])  # of the token drafted now
                row = out[-1] if greedy[i] else head.target_logits(out[-1])
                token, dist = draw_draft(row, policy, first=not tokens[i], position=position)
                if token is None:
                    continue  # the head is unsure; further tokens would mostly be rejected
                tokens[i].append(int(head.d2t[token]) if greedy[i] else token)
                if dist is not None:
                    probs[i].append(dist)
                if len(tokens[i]) < depth and time.perf_counter() - started <= policy.time_budget_s:
                    going.append(i)  # fed at the position before its own, with the feature predicted there
                    inputs = segment.hidden[-1:]
                    following.append(
                        Segment(
                            [tokens[i][-1]], position - 1, state.table, logits=1, features=True, inputs=inputs
                        )
                    )
            drafting, segments = going, following
        self._grow(items, trees, started, timed)
        self.pass_s = draft_pass_s(timed)
        return [
            trees[i].proposal(items[i][3].width * items[i][2]) if i in trees else Proposal(t, torch.stack(p) if p else None)
            for i, (t, p) in enumerate(zip(tokens, probs, strict=True))
        ]

    def _greedy(self, items, drafting: list[int], segments: list[Segment]) -> list[Proposal]:
        """Greedy chains for every drafting item: the first token from the pass that reads what
        the head has not, the rest in one native call (`ModelRunner.greedy`, each row fed the
        feature the head predicted before it): the tokens the pass-per-position loop chooses,
        without Python's cost per position."""
        t0 = time.perf_counter()
        outputs = self.runner.forward(segments)
        timed = [(sum(len(s.tokens) for s in segments), len(segments), time.perf_counter() - t0)]
        firsts = [int(self.head.d2t[out[-1].argmax()]) for out in outputs]
        going = [k for k, i in enumerate(drafting) if items[i][2] > 1]
        steps = max((items[drafting[k]][2] for k in going), default=1) - 1
        rest: dict[int, list[int]] = {}
        if going:
            t0 = time.perf_counter()
            rows = self.runner.greedy(
                [items[drafting[k]][0].table for k in going], [firsts[k] for k in going],
                [len(items[drafting[k]][1]) - 1 for k in going], steps, self.head.vocab_size,
                torch.stack([segments[k].hidden[-1] for k in going]),
            )  # fmt: skip
            timed.append((len(going), len(going), (time.perf_counter() - t0) / steps))
            rest = {drafting[k]: row for k, row in zip(going, rows, strict=True)}
        self.pass_s = draft_pass_s(timed)
        proposals = [Proposal.empty() for _ in items]
        for k, i in enumerate(drafting):
            proposals[i] = Proposal([firsts[k], *rest.get(i, [])][: items[i][2]])
        return proposals

    def _top(self, row: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A head row's likeliest tokens, as the verifier's ids (the draft vocabulary's, mapped)."""
        ids, logps = top_tokens(row, width)
        return self.head.d2t[ids], logps

    def _grow(self, items, trees: dict[int, Growth], started: float, timed: list) -> None:
        """Grow each token tree a level per head pass (`trees.Growth`): the fed nodes as one tree
        segment from the root's position (the last verified position, fed again with the
        verifier's feature: the same bits), every other node fed its token with the feature the
        head predicted at its parent; the frontier's rows read."""
        budget = min((policy.time_budget_s for _, _, _, policy in items), default=0.0)
        growing = [i for i, tree in trees.items() if tree.growing]
        while growing:
            segments = []
            for i in growing:
                tree, (state, context, _, _) = trees[i], items[i]
                ids, parents, frontier = tree.segment()
                root = state.features[len(context) - 2 : len(context) - 1]
                inputs = torch.cat([root, *(tree.hidden[tree.parents[v]][None] for v in tree.fed[1:])])
                segments.append(
                    Segment(ids, len(context) - 2, state.table, logits=len(frontier), features=True, inputs=inputs, parents=parents)
                )
            t0 = time.perf_counter()
            outputs = self.runner.forward(segments)
            timed.append((sum(len(s.tokens) for s in segments), len(segments), time.perf_counter() - t0))
            for i, segment, out in zip(growing, segments, outputs, strict=True):
                tree = trees[i]
                for row, v in enumerate(tree.fed):
                    tree.hidden[v] = segment.hidden[row]
                tree.expand([self._top(r, tree.width) for r in out])
            growing = [i for i in growing if trees[i].growing and time.perf_counter() - started <= budget]
