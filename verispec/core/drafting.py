"""Drafts for every round of a pass: the propose half of the step.

The engine calls its proposers through one protocol (`proposers/base.py`) and two capabilities
they declare, never by their classes:

- a proposer with a `draft_model` (or a draft head, `head_model`) the runner can batch drafts for
  every request of the pass in one draft pass per position (`draft_batch.py`, `head_batch.py`), on
  this thread: it is verispec's own pass (its
  time budget is checked between draft positions), and its kernels' OpenMP team must stay this
  thread's, for a second team on another thread makes every later pass fight it for the cores;
- an `inline` proposer (the n-gram lookup: microseconds of our own code) is called on this thread;
- any other is called off this thread within the time budget (`proposing.py`), so that one that
  hangs holds no pass.

An edge client's drafts (the verify API) stand in for a proposer. Whatever goes wrong, a proposer
error, junk, a missed budget, costs the round its drafts, never the output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from verispec.core.draft_batch import DraftBatch
from verispec.core.head_batch import HeadBatch
from verispec.core.proposing import Busy, Proposing, TimedOut
from verispec.core.request import Request
from verispec.core.rounds import validate
from verispec.core.runner import batchable
from verispec.proposers.base import DraftPolicy, Proposal, Proposer

log = logging.getLogger(__name__)


def open_session(proposer: Proposer, share_key: str = ""):
    """A request's session; a proposer that keeps what earlier requests said (the suffix cache)
    takes the request's API key, whose pool the session reads and writes."""
    if getattr(proposer, "per_key", False):
        return proposer.session(share_key)
    return proposer.session()


def _widened(policy: DraftPolicy, width: int) -> DraftPolicy:
    return policy if policy.width == width else replace(policy, width=width)


class Drafting:
    def __init__(self, runner, vocab_size: int):
        self.runner = runner  # the verifier's: draft caches are sized by its pool
        self.vocab_size = vocab_size
        self.proposing = Proposing()
        self.batches: dict[int, DraftBatch] = {}  # per draft proposer (by id)
        self.failed: set[Request] = set()  # this pass's rounds that fell back to verifier-only
        # Each proposal's draft passes as measured: its median pass after the first, and its first.
        self.on_draft_pass: Callable[[float | None, float | None], None] | None = None

    def batch(self, proposer: Proposer | None) -> DraftBatch | HeadBatch | None:
        """The batched drafter of a proposer that offers a draft model (or a draft head) the runner
        can batch."""
        head = getattr(proposer, "head_model", None)
        lm = head if head is not None else getattr(proposer, "draft_model", None)
        if lm is None or batchable(lm) is not None:
            return None
        batch = self.batches.get(id(proposer))
        if batch is None:
            # As many positions as the verifier's cache holds, in the draft's (smaller) blocks.
            pool = self.runner.pool
            per_position = 2 * len(lm.layers) * lm.kv_heads * lm.head_dim * 4
            memory = max(pool.num_blocks * pool.block_size * per_position, (lm.max_positions + 64) * per_position)
            if head is not None:
                batch = HeadBatch(head, memory, pool.block_size)
            else:
                batch = DraftBatch(lm, self.vocab_size, memory, pool.block_size)
            self.batches[id(proposer)] = batch
        return batch

    def observe(self, request: Request, start: int, features) -> None:
        """The verifier's features of a request's verified positions start.., for its draft head's
        state (made here if the request has none yet); then the features of the blocks its table
        has registered in the prefix cache are kept for the next request with that prefix
        (`HeadBatch.remember`)."""
        batch = self.batch(request.proposer)
        state = self._head_state(request, batch)
        state.observe(start, features)
        if request.table.keys:
            batch.remember(state, request.table.keys, self.runner.pool)

    def heads(self) -> list[HeadBatch]:
        """The draft heads loaded (their batches are made when the engine prepares its proposers)."""
        return [b for b in self.batches.values() if isinstance(b, HeadBatch)]

    def keeps_features(self) -> bool:
        """Whether prompt chunks of requests whose proposer is no head should give their features:
        a head is loaded and the prefix cache is on, so the features of their cached blocks are kept
        for a head's request with the same prefix (without them that request recomputes it)."""
        return bool(self.heads()) and self.runner.pool.prefix_cache

    def keep(self, request: Request, start: int, features) -> None:
        """The verifier's features of positions start.. (a prompt chunk's) of a request whose
        proposer is no head: each head's read of them, kept beside the blocks its table registers
        in the prefix cache (`HeadBatch.remember`). A request that took cached blocks whose features no head kept
        (or lost some) keeps none: a head's features must run from position 0."""
        for batch in self.heads():
            state = request.feature_logs.get(id(batch))
            if state is None:
                state = request.feature_logs[id(batch)] = batch.state()
            # cached blocks: their kept features, where the head has them all
            if state.known < start and not self._take_kept(batch, state, request, start):
                del request.feature_logs[id(batch)]
                continue
            state.observe(start, features)
            if request.table.keys:
                batch.remember(state, request.table.keys, self.runner.pool)

    def _head_state(self, request: Request, batch: HeadBatch):
        if request.session is None:
            request.session = batch.state()
        return request.session

    def recall(self, request: Request, tokens: list[int]) -> int:
        """For a draft head's request about to take the prefix cache's blocks of `tokens`: how many
        of its positions the head has features for, kept from earlier requests
        (`HeadBatch.recall`), at least what its session already knows."""
        pool = self.runner.pool
        known = getattr(request.session, "known", 0)
        if not pool.prefix_cache:
            return known
        kept = self.batch(request.proposer).recall(pool.keys(tokens, (len(tokens) - 1) // pool.block_size))
        return max(known, len(kept) * pool.block_size)

    def restore(self, request: Request, reused: int) -> None:
        """Give a draft head's request that took `reused` positions from the prefix cache their
        kept features, past what its session knows."""
        batch = self.batch(request.proposer)
        self._take_kept(batch, self._head_state(request, batch), request, reused)

    def _take_kept(self, batch: HeadBatch, state, request: Request, upto: int) -> bool:
        """Give `state` the features `batch` kept of the request's cached blocks, from the block it
        knows only in part up to position `upto`; whether they were all kept."""
        bs = self.runner.pool.block_size
        first, last = state.known // bs, upto // bs
        rows = batch.recall(request.table.keys[first:last])
        if rows:
            state.restore(first * bs, torch.cat(rows))
        return len(rows) == last - first and last * bs >= upto

    def busy(self, request: Request) -> bool:
        """Whether a plug-in's previous call for this request has not returned."""
        return self.proposing.busy(request)

    def propose(
        self, rounds: list[Request], depths: dict[Request, int], widths: dict[Request, int] | None = None
    ) -> tuple[dict[Request, Proposal], dict[Request, float]]:
        """Drafts for every round with a depth; an empty proposal wherever the proposer cannot help.
        `widths`: candidates per draft position where a round may take a token tree (a batched
        drafter offers alternatives beside its chain). Also the proposing time charged to each request."""
        widths = widths or {}
        self.failed = set()
        proposals = {r: Proposal.empty() for r in rounds}
        calls, inline, members = {}, {}, {}
        for request in rounds:
            if request.early is not None:  # drafted while its prompt prefilled
                proposals[request] = request.early.cut(depths[request])
                request.early = None
            elif request.remote is not None:
                proposals[request] = self._remote(request, depths[request])
            elif request.repeat is not None:  # the text's own repeat drafts this round, its depth its length (`repeats.py`)
                proposals[request] = request.repeat
            elif depths[request] > 0 and request.proposer is not None:
                batch = self.batch(request.proposer)
                if batch is not None:
                    if request.session is None:
                        request.session = batch.state()
                    members.setdefault(batch, []).append(request)
                    continue
                if request.session is None:  # a call per request (a stateless proposer's session is shared)
                    request.session = open_session(request.proposer, request.share_key)
                call = lambda r=request: r.session.propose(r.tokens, depths[r], r.draft_policy)  # noqa: E731
                (inline if getattr(request.proposer, "inline", False) else calls)[request] = call
                members[request] = [request]
        drafting = [r for group in members.values() for r in group]
        budget = min((r.speculation.proposer_timeout_s for r in drafting), default=0.0)
        started = time.perf_counter()
        results = self.proposing.start(calls)
        for key, call in inline.items():
            try:
                results[key] = call()
            except Exception as exc:  # noqa: BLE001
                results[key] = exc
        for batch, requests in members.items():
            if isinstance(batch, DraftBatch | HeadBatch):
                results[batch] = self._draft_batch(batch, requests, depths, widths)
        results |= self.proposing.collect(max(0.0, budget - (time.perf_counter() - started)))
        waited = time.perf_counter() - started
        propose_s = {}
        for key, requests in members.items():
            result = results[key]
            outcomes = result if isinstance(result, list) else [result] * len(requests)
            for request, outcome in zip(requests, outcomes, strict=True):
                propose_s[request] = waited / len(drafting)
                request.stats.propose_s += propose_s[request]
                if isinstance(outcome, Busy):
                    request.stats.fallback_rounds += 1
                    self.failed.add(request)
                    continue
                if isinstance(outcome, Proposal):
                    try:
                        validate(outcome, depths[request], self.vocab_size)
                    except Exception as exc:  # noqa: BLE001 (a proposer bug costs a round, never the output)
                        outcome = exc
                if isinstance(outcome, Proposal):
                    proposals[request] = outcome
                    request.consecutive_failures = 0
                else:
                    self._fall_back(request, outcome)
        return proposals, propose_s

    def _draft_batch(
        self, batch: DraftBatch | HeadBatch, requests: list[Request], depths: dict[Request, int], widths: dict[Request, int]
    ) -> list[Proposal] | Exception:
        items = [(r.session, r.tokens, depths[r], _widened(r.draft_policy, widths.get(r, 1))) for r in requests]
        try:
            proposals = batch.propose(items)
        except Exception as exc:  # noqa: BLE001 (every request of the batch falls back)
            return exc
        if self.on_draft_pass is not None:
            self.on_draft_pass(*batch.pass_s)
        return proposals

    def _remote(self, request: Request, depth: int) -> Proposal:
        """The edge client's drafts for this round (the handler checked them; a bad one costs the
        round its drafts, never the output)."""
        proposal = request.remote.take(depth)
        try:
            validate(proposal, depth, self.vocab_size)
        except Exception as exc:  # noqa: BLE001
            log.warning("request %s: the client's drafts were refused: %s; this round runs verifier-only", request.id, exc)
            request.stats.fallback_rounds += 1
            self.failed.add(request)
            return Proposal.empty()
        return proposal

    def _fall_back(self, request: Request, error: BaseException) -> None:
        stats = request.stats
        stats.fallback_rounds += 1
        self.failed.add(request)
        if isinstance(error, TimedOut):
            stats.proposer_timeouts += 1
            why = f"proposal took longer than {request.speculation.proposer_timeout_s}s"
        else:
            stats.proposer_failures += 1
            why = f"proposer failed: {error!r}"
            self._reset(request)
        request.consecutive_failures += 1
        log.warning("request %s: %s; this round runs verifier-only", request.id, why)
        if request.consecutive_failures == request.speculation.max_proposer_failures:
            log.warning("request %s: %d proposer failures in a row; it continues verifier-only", request.id, request.consecutive_failures)

    def _reset(self, request: Request) -> None:
        """Forget the proposer's state for this request (it may be half-updated)."""
        if request.session is None or self.proposing.busy(request):
            return
        if not self.release(request):
            request.session.reset()

    def release(self, request: Request) -> bool:
        """Give back the request's blocks in the draft model's cache; False if it has none there."""
        request.feature_logs.clear()
        batch = self.batch(request.proposer) if request.proposer is not None else None
        if batch is None or request.session is None:
            return False
        batch.release(request.session)
        request.session = None
        return True

    def close(self) -> None:
        self.proposing.close()
