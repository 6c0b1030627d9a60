"""Planning one pass: admission by KV memory, rounds and depths, chunked prefill, preemption.

- Admission: a waiting request joins while fewer than `max_running` run and the cache has blocks
  for its whole prompt (after the prefix cache's share) plus one spare block per running request.
  A preempted request goes first; then a free slot goes to the request whose share key (the
  server's API key) holds the fewest running slots, the longest waiting among equals, so one
  key's requests never keep another key's request waiting past its fair share of the slots.
  Parked requests (verify-API sessions waiting for their clients' drafts) take no slot; their
  blocks are the first to go when a request needs them, and a parked request that lost them waits
  for its drafts before it is admitted again.
- Rounds: every running request past its prompt runs one round; depths come from the engine
  (`Engine.choose_depths`: configured, or by the batch's goodput).
- Chunked prefill: prompts get rows, oldest first, up to `max_pass_tokens` when nothing else
  runs; beside running rounds only as many as keep the pass within `prefill_slowdown` times the
  measured cost of those rounds alone, so a long prompt shares passes with running streams and
  never stalls them for more than one small chunk's cost; where several prompts wait together
  that allowance grows by (prompts + 1) / streams (`Engine.chunk_budget`), so one stream's cheap
  one-row rounds cannot starve them.
- Preemption: when blocks run out, a parked request gives its blocks back first, else the newest
  running request gives all its blocks back and waits first in line, to be recomputed later (its verified tokens are kept: recomputing them gives the
  same bits); nobody is failed. The oldest request always makes progress.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from verispec.core.kv_cache import OutOfBlocks

if TYPE_CHECKING:
    from verispec.core.engine import Engine
    from verispec.core.request import Request


@dataclass
class Plan:
    rounds: list[Request] = field(default_factory=list)
    depths: dict[Request, int] = field(default_factory=dict)
    chunks: list[tuple[Request, int]] = field(default_factory=list)  # (request, prompt tokens this pass)
    preempted: list[Request] = field(default_factory=list)


def plan_pass(engine: Engine) -> Plan:
    plan = Plan()
    _admit(engine)
    plan.rounds = [r for r in engine.running if not r.prefilling and not r.parked]
    plan.depths = engine.choose_depths(plan.rounds)
    for request in list(plan.rounds):  # oldest first
        if request not in engine.running:
            continue  # preempted to make room for an older one
        if not _reserve(engine, plan, request, request.table.computed + 1 + plan.depths[request]):
            continue
    plan.rounds = [r for r in plan.rounds if r in engine.running]
    prompts = [r for r in engine.running if r.prefilling]
    budget = engine.chunk_budget(sum(1 + plan.depths[r] for r in plan.rounds), len(plan.rounds), len(prompts))
    for request in prompts:
        if budget <= 0:
            break
        if request not in engine.running:
            continue
        n = min(len(request.tokens) - 1 - request.table.computed, budget)
        if _reserve(engine, plan, request, request.table.computed + n):
            plan.chunks.append((request, n))
            budget -= n
    plan.chunks = [(r, n) for r, n in plan.chunks if r in engine.running]
    return plan


def _admit(engine: Engine) -> None:
    while engine.active < engine.max_running:
        request = _next_fair(engine)
        if request is None:
            return
        while not engine.admit(request):
            parked = [r for r in engine.running if r.parked and r.table.blocks]
            if not parked:
                return
            engine.preempt(max(parked, key=lambda r: r.order))  # a parked session's blocks go first


def _next_fair(engine: Engine) -> Request | None:
    """The waiting request to admit next: a preempted one first, else the one whose share key
    holds the fewest running slots, the longest waiting among equals; one that is parked waits
    for its drafts."""
    candidates = [r for r in engine.waiting if not r.parked]
    if not candidates:
        return None
    held = Counter(r.share_key for r in engine.running if not r.parked)
    return min(candidates, key=lambda r: (r.preemptions == 0, held[r.share_key]))  # the first of the least


def _reserve(engine: Engine, plan: Plan, request: Request, positions: int) -> bool:
    """Blocks for `positions` positions of `request`, preempting the newest running requests as
    needed; False if `request` itself had to go."""
    while True:
        try:
            request.table.reserve(positions)
            return True
        except OutOfBlocks:
            victim = max(engine.running, key=lambda r: (r.parked, r.order))  # parked sessions first
            engine.preempt(victim)
            plan.preempted.append(victim)
            if victim is request:
                return False
