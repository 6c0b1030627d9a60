"""Measuring what a round costs on this machine, for the adaptive depth policy: the first estimate,
which the rounds the engine runs then refine (`goodput.LiveCosts`)."""

from __future__ import annotations

import logging
import statistics
import threading
import time

from verispec.config import SamplingParams
from verispec.core.depth import StepCosts
from verispec.models.backend import CausalLM
from verispec.proposers.base import DraftPolicy, Proposer

log = logging.getLogger(__name__)


def measure_step_costs(
    target: CausalLM, proposer: Proposer | None, max_depth: int, context_len: int = 256, repeats: int = 5,
    proposer_budget_s: float = 60.0,
) -> StepCosts:
    """Time verifier passes of every width up to max_depth+1, and draft tokens.

    Medians of a few repeats over a synthetic context. A pass's cost depends on its width in ways
    no formula captures (the kernels chosen for small matrices), so it is measured, not assumed.
    """
    widths = max_depth + 1
    if target.max_positions is not None:
        context_len = min(context_len, target.max_positions - 2 * widths - 1)
    context = [i % target.vocab_size for i in range(1, context_len + 1)]
    session = target.session()
    session.extend(context, last_only=True)
    verify = []
    for width in range(1, widths + 1):
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.extend(context[:width])
            samples.append(time.perf_counter() - t0)
            session.rollback(context_len)
        verify.append(statistics.median(samples))
    draft = 0.0
    if proposer is not None:
        # On a thread of its own: a proposer that never returns must not hold the start-up either.
        outcome: list = []
        thread = threading.Thread(
            target=lambda: outcome.append(_attempt(_draft_cost, proposer, context, max_depth, repeats)),
            name="verispec-calibrate-proposer", daemon=True,
        )
        thread.start()
        thread.join(proposer_budget_s)
        result = outcome[0] if outcome else TimeoutError(f"no answer in {proposer_budget_s:g}s")
        if isinstance(result, Exception):  # a broken proposer must not take the server down with it
            log.warning("the proposer failed while its cost was measured (%r); depth auto will keep it off but probe it", result)
            draft = UNUSABLE_DRAFT_S
        else:
            draft = result
    log.info("step costs: verify %s ms by pass width, draft %.2f ms per token", [round(v * 1e3, 2) for v in verify], draft * 1e3)
    return StepCosts(tuple(verify), draft)


UNUSABLE_DRAFT_S = 3600.0  # finite, so that k * cost stays a number at k = 0


def _attempt(function, *args):
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 (reported by the caller)
        return exc


def _draft_cost(proposer: Proposer, context: list[int], max_depth: int, repeats: int) -> float:
    drafting = proposer.session()
    policy = DraftPolicy(sampling=SamplingParams())
    drafting.propose(context, 1, policy)  # prefill, not timed
    samples = []
    for i in range(repeats):
        t0 = time.perf_counter()
        proposal = drafting.propose(context + context[: i + 1], max_depth, policy)
        samples.append((time.perf_counter() - t0) / max(len(proposal.tokens), 1))
    return statistics.median(samples)
