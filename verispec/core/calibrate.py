"""Measuring what a proposer's draft token costs on this machine, for depth auto, where the engine
cannot time it as part of its own passes (`goodput.measure_pass_costs` times the verifier's and a
batched draft model's passes)."""

from __future__ import annotations

import logging
import statistics
import threading
import time

from verispec.config import SamplingParams
from verispec.proposers.base import DraftPolicy, Proposer

log = logging.getLogger(__name__)


def measure_draft_cost(proposer: Proposer, vocab_size: int, max_depth: int, budget_s: float, context_len: int = 256, repeats: int = 5) -> float:
    """Seconds per draft token of a proposer the engine cannot batch (a plug-in, a lookup, a draft
    model on the transformers backend): medians of a few proposals over a synthetic context, on a
    thread of its own, so that a proposer that never returns does not hold the start-up either. A
    broken proposer is priced so that depth auto keeps it off (but probes it)."""
    context = [i % vocab_size for i in range(1, context_len + 1)]
    outcome: list = []
    thread = threading.Thread(
        target=lambda: outcome.append(_attempt(_draft_cost, proposer, context, max_depth, repeats)),
        name="verispec-calibrate-proposer", daemon=True,
    )
    thread.start()
    thread.join(budget_s)
    result = outcome[0] if outcome else TimeoutError(f"no answer in {budget_s:g}s")
    if isinstance(result, Exception):  # a broken proposer must not take the server down with it
        log.warning("the proposer %s failed while its cost was measured (%r); depth auto will keep it off but probe it",
                    getattr(proposer, "name", proposer), result)  # fmt: skip
        return UNUSABLE_DRAFT_S
    log.info("proposer %s: %.3f ms per draft token", getattr(proposer, "name", proposer), result * 1e3)
    return result


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
