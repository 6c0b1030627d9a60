"""Speculation depth under batching: the depths that maximise the batch's goodput.

One verifier pass scores every running request's round; its cost grows with its total rows
(SmartSpec, Liu et al. 2024: on a CPU slowly at first, while streaming the weights dominates, then
about linearly). A request at depth k with per-draft acceptance alpha gains
(1 - alpha^(k+1)) / (1 - alpha) tokens from a pass, so the batch's goodput is

    sum_i E_i(k_i) / (pass(sum_i (1 + k_i)) + max_i draft_i(k_i))

where draft_i(k) is a first draft pass (which also reads what the last round verified) and k - 1
passes after it (`DraftCost`).

Starting from depth 0 everywhere, the choice repeatedly raises one request's depth by the step
that raises goodput most, until none does. With one request that is the single-stream argmax; as
the batch fills, each extra row costs more than the few tokens it is expected to add and depths
shrink to 0, so speculation never lowers throughput and a load-dependent cap is not needed.

pass() and draft() are measured at start (`measure_pass_costs`) and then follow the passes the
engine runs (`LiveCosts`), so that a start on a busy machine does not price speculation out.
"""

from __future__ import annotations

import bisect
import logging
import math
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

from verispec.core.depth import expected_tokens

log = logging.getLogger(__name__)


class Acceptance:
    """A request's decaying estimate of alpha, the chance a draft is accepted given the ones
    before it were (as `depth.AdaptiveDepth` keeps it), and its rounds without drafts."""

    def __init__(self, prior: float = 0.6, memory: float = 0.9):
        self.memory = memory
        self.hits, self.trials = 2.0 * prior, 2.0
        self.rounds_off = 0

    @property
    def alpha(self) -> float:
        return self.hits / self.trials

    def update(self, proposed: int, accepted: int) -> None:
        if proposed:
            self.hits = self.memory * self.hits + accepted
            self.trials = self.memory * self.trials + accepted + (accepted < proposed)
            self.rounds_off = 0
        else:
            self.rounds_off += 1



@dataclass(frozen=True)
class DraftCost:
    """Seconds a proposal of depth k costs: its first pass, which also reads what was verified
    since the last proposal, and each position after it. Where the later positions run in one
    native call (greedy chains of a draft model or a draft head) a position costs a fraction of a
    first pass, so pricing every position like the first would keep depths too shallow."""

    first_s: float = 0.0
    step_s: float = 0.0

    def __call__(self, depth: int) -> float:
        return 0.0 if depth <= 0 else self.first_s + (depth - 1) * self.step_s


@dataclass(frozen=True)
class PassCosts:
    """Measured seconds of a verifier pass by its total rows (interpolated between samples), and of
    a batched drafter's passes (all requests' draft tokens at one position): a position after the
    first (`draft_s`) and a proposal's first (`draft_first_s`; as `draft_s` where not measured)."""

    rows: tuple[int, ...]
    seconds: tuple[float, ...]
    draft_s: float = 0.0
    draft_first_s: float | None = None

    @property
    def draft(self) -> DraftCost:
        return DraftCost(self.draft_s if self.draft_first_s is None else self.draft_first_s, self.draft_s)

    def verify(self, rows: int) -> float:
        i = bisect.bisect_left(self.rows, rows)
        if i < len(self.rows) and self.rows[i] == rows:
            return self.seconds[i]
        if i == 0:
            return self.seconds[0]
        if i == len(self.rows):  # beyond the samples: extend the last slope
            (r0, r1), (s0, s1) = self.rows[-2:], self.seconds[-2:]
        else:
            r0, r1, s0, s1 = self.rows[i - 1], self.rows[i], self.seconds[i - 1], self.seconds[i]
        return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)


class LiveCosts:
    """Pass costs that follow the passes the engine runs, the start-up measurement only their prior.

    A measurement taken while something else loads the machine can be far off (one taken beside
    a busy process read 260 ms for passes that take 1 ms), and every later depth choice would pay
    for it. So the sample row nearest each pass the engine runs keeps the seconds of its last
    `window` passes, the prior's own counting as one: once two passes came, that row costs their
    median. A single slow pass moves no median, while a prior 100x off is outvoted by the second
    pass at its rows.

    A sample row no pass came near takes the ratio to the prior of the nearest rows that did
    (interpolated between them), so that a prior too high everywhere heals everywhere. A prior off
    unevenly (the load came and went during the measurement) is capped by the live costs around
    it too: a pass costs no more than a narrower one scaled by their rows, nor more than a wider
    one. A width priced too low soon runs and is corrected; one priced too high might never run,
    which is why the estimates lean low. The draft pass keeps its median the same way.
    """

    def __init__(self, prior: PassCosts, window: int = 15):
        self.prior = prior
        self._ratios = [deque([0.0], maxlen=window) for _ in prior.rows]  # log(pass / prior) per sample row
        self._medians: list[float | None] = [None] * len(prior.rows)  # None: fewer than two passes near it
        self._draft = deque([0.0], maxlen=window)  # log(pass / prior): a draft position after the first
        self._draft_median: float | None = None
        self._first = deque([0.0], maxlen=window)  # the same for a proposal's first pass
        self._first_median: float | None = None
        self._current: PassCosts | None = prior
        self._logged = prior
        self._lock = threading.Lock()  # passes are reported by the engine thread, costs read by any

    def observe(self, rows: int, seconds: float) -> None:
        """One verifier pass the engine ran: its total rows and its seconds. It counts for the
        sample row nearest its rows (they lie close: a few percent of cost apart)."""
        if rows < 1 or seconds <= 0:
            return
        i = bisect.bisect_left(self.prior.rows, rows)
        if i == len(self.prior.rows) or (i > 0 and rows - self.prior.rows[i - 1] < self.prior.rows[i] - rows):
            i -= 1
        with self._lock:
            self._medians[i] = _add(self._ratios[i], math.log(seconds / self.prior.seconds[i]))
            self._current = None

    def observe_draft(self, step_s: float | None, first_s: float | None = None) -> None:
        """A proposal's draft passes (a draft position for every request drafting): its median
        pass after the first, and its first."""
        prior = self.prior.draft
        with self._lock:
            if step_s is not None and step_s > 0 and prior.step_s > 0:
                self._draft_median = _add(self._draft, math.log(step_s / prior.step_s))
                self._current = None
            if first_s is not None and first_s > 0 and prior.first_s > 0:
                self._first_median = _add(self._first, math.log(first_s / prior.first_s))
                self._current = None

    def current(self) -> PassCosts:
        changed = False
        with self._lock:
            if self._current is None:
                self._current = self._rebuild()
                changed = _swing(self._current, self._logged) >= math.log(2)
            current, logged = self._current, self._logged
            if changed:
                self._logged = current
        if changed:
            log.info(
                "pass costs follow the live passes: %s ms by rows %s, draft passes %.2f ms first, %.2f ms after"
                " (were %s ms, %.2f ms, %.2f ms)",
                [round(s * 1e3, 2) for s in current.seconds], list(current.rows), current.draft.first_s * 1e3,
                current.draft_s * 1e3, [round(s * 1e3, 2) for s in logged.seconds], logged.draft.first_s * 1e3,
                logged.draft_s * 1e3,
            )
        return current

    def _rebuild(self) -> PassCosts:
        rows, prior, medians = self.prior.rows, self.prior.seconds, self._medians
        seen = [i for i, m in enumerate(medians) if m is not None]
        seconds = [p if m is None else p * math.exp(m) for p, m in zip(prior, medians, strict=True)]
        for i in [i for i, m in enumerate(medians) if m is None] if seen else []:
            j = bisect.bisect_left(seen, i)
            below, above = seen[j - 1] if j > 0 else None, seen[j] if j < len(seen) else None
            if below is None:
                ratio = medians[above]
            elif above is None:
                ratio = medians[below]
            else:
                ratio = medians[below] + (medians[above] - medians[below]) * (i - below) / (above - below)
            estimate = prior[i] * math.exp(ratio)
            if below is not None:
                estimate = min(estimate, seconds[below] * rows[i] / rows[below])
            if above is not None:
                estimate = min(estimate, seconds[above])
            seconds[i] = estimate
        # A kind of draft pass none came of yet moves as the other did (a prior off everywhere): at
        # depth 1 a proposal has no later pass, and a position priced too high would never run.
        step, first = self._draft_median, self._first_median
        step = first if step is None else step
        first = step if first is None else first
        prior_draft = self.prior.draft
        return PassCosts(
            rows, tuple(seconds), prior_draft.step_s * math.exp(step or 0.0), prior_draft.first_s * math.exp(first or 0.0)
        )


def _add(window: deque, ratio: float) -> float | None:
    """Add a pass's log ratio; the window's median once it holds two passes beside the prior's."""
    window.append(ratio)
    return statistics.median(window) if len(window) > 2 else None


def _swing(a: PassCosts, b: PassCosts) -> float:
    """The largest log ratio between two curves over the same rows, the draft pass included."""
    pairs = [*zip(a.seconds, b.seconds, strict=True), (a.draft_s, b.draft_s), (a.draft.first_s, b.draft.first_s)]
    return max((abs(math.log(x / y)) for x, y in pairs if x > 0 and y > 0), default=0.0)


def choose_depths(
    alphas: list[float], limits: list[int], costs: PassCosts, draft_costs: list[DraftCost] | None = None,
    base_rows: int = 0,
) -> list[int]:
    """Depth per request: `alphas[i]` its acceptance estimate, `limits[i]` the most it may take
    (0 = verifier-only), `draft_costs[i]` what its proposer's drafts cost (nothing for model-free
    proposers); `base_rows` rows of other requests share the pass."""
    n = len(alphas)
    draft_costs = draft_costs or [costs.draft] * n
    gains = [[expected_tokens(a, k) for k in range(limit + 1)] for a, limit in zip(alphas, limits, strict=True)]
    drafts = [[cost(k) for k in range(limit + 1)] for cost, limit in zip(draft_costs, limits, strict=True)]
    verify = [costs.verify(rows) for rows in range(base_rows + n + sum(limits) + 1)]
    depths = [0] * n
    tokens, rows, drafting = float(n), base_rows + n, 0.0
    best = tokens / verify[rows]
    while True:
        choice = None
        for i in range(n):
            k0 = depths[i]
            for k in range(k0 + 1, limits[i] + 1):
                value = (tokens - gains[i][k0] + gains[i][k]) / (verify[rows + k - k0] + max(drafting, drafts[i][k]))
                if value > best * (1 + 1e-9):
                    best, choice = value, (i, k)
        if choice is None:
            return depths
        i, k = choice
        tokens += gains[i][k] - gains[i][depths[i]]
        rows += k - depths[i]
        drafting = max(drafting, drafts[i][k])
        depths[i] = k


SAMPLE_ROWS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)


def measure_pass_costs(runner, max_rows: int, draft_s: float = 0.0, context: int = 128, repeats: int = 3) -> PassCosts:
    """Time passes of 1..max_rows rows over a synthetic context (medians), on the runner's own
    cache: a few blocks are taken for the measurement and returned."""
    from verispec.core.kv_cache import BlockTable
    from verispec.core.runner import Segment

    vocab, window = runner.lm.vocab_size, runner.lm.max_positions
    if window is not None:  # a small model's window bounds both: rows first, the context the rest
        max_rows = max(1, min(max_rows, window // 2))
        context = max(0, min(context, window - max_rows))
    tokens = [1 + i % (vocab - 1) for i in range(context + max_rows)]
    table = BlockTable(runner.pool)
    try:
        if context:
            runner.forward([Segment(tokens[:context], 0, table, logits=0)])
        rows, seconds = [], []
        for width in [r for r in SAMPLE_ROWS if r <= max_rows] or [1]:
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                runner.forward([Segment(tokens[context : context + width], context, table)])
                samples.append(time.perf_counter() - t0)
            rows.append(width)
            seconds.append(statistics.median(samples))
    finally:
        table.free()
    if len(rows) == 1:
        rows.append(rows[0] + 1)
        seconds.append(seconds[0])
    return PassCosts(tuple(rows), tuple(seconds), draft_s)
