"""Speculation depth under batching: the depths that maximise the batch's goodput.

One verifier pass scores every running request's round; its cost grows with its total rows
(SmartSpec, Liu et al. 2024: on a CPU slowly at first, while streaming the weights dominates, then
about linearly). A request at depth k with per-draft acceptance alpha gains
(1 - alpha^(k+1)) / (1 - alpha) tokens from a pass, so the batch's goodput is

    sum_i E_i(k_i) / (pass(sum_i (1 + k_i)) + draft(max_i k_i))

Starting from depth 0 everywhere, the choice repeatedly raises one request's depth by the step
that raises goodput most, until none does. With one request that is the single-stream argmax; as
the batch fills, each extra row costs more than the few tokens it is expected to add and depths
shrink to 0, so speculation never lowers throughput and a load-dependent cap is not needed.
"""

from __future__ import annotations

import bisect
import statistics
import time
from dataclasses import dataclass

from verispec.core.depth import expected_tokens


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
class PassCosts:
    """Measured seconds of a verifier pass by its total rows (interpolated between samples), and of
    one draft pass (all requests' draft tokens at one position)."""

    rows: tuple[int, ...]
    seconds: tuple[float, ...]
    draft_s: float = 0.0

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


def choose_depths(
    alphas: list[float], limits: list[int], costs: PassCosts, draft_costs: list[float] | None = None, base_rows: int = 0
) -> list[int]:
    """Depth per request: `alphas[i]` its acceptance estimate, `limits[i]` the most it may take
    (0 = verifier-only), `draft_costs[i]` the seconds of a draft pass for its proposer (0 for
    model-free proposers); `base_rows` rows of other requests share the pass."""
    n = len(alphas)
    draft_costs = draft_costs or [costs.draft_s] * n
    gains = [[expected_tokens(a, k) for k in range(limit + 1)] for a, limit in zip(alphas, limits, strict=True)]
    verify = [costs.verify(rows) for rows in range(base_rows + n + sum(limits) + 1)]
    depths = [0] * n
    tokens, rows, drafting = float(n), base_rows + n, 0.0
    best = tokens / verify[rows]
    while True:
        choice = None
        for i in range(n):
            k0 = depths[i]
            for k in range(k0 + 1, limits[i] + 1):
                value = (tokens - gains[i][k0] + gains[i][k]) / (verify[rows + k - k0] + max(drafting, k * draft_costs[i]))
                if value > best * (1 + 1e-9):
                    best, choice = value, (i, k)
        if choice is None:
            return depths
        i, k = choice
        tokens += gains[i][k] - gains[i][depths[i]]
        rows += k - depths[i]
        drafting = max(drafting, k * draft_costs[i])
        depths[i] = k


SAMPLE_ROWS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)


def measure_pass_costs(runner, max_rows: int, draft_s: float = 0.0, context: int = 128, repeats: int = 3) -> PassCosts:
    """Time passes of 1..max_rows rows over a synthetic context (medians), on the runner's own
    cache: a few blocks are taken for the measurement and returned."""
    from verispec.core.kv_cache import BlockTable
    from verispec.core.runner import Segment

    vocab = runner.lm.vocab_size
    tokens = [1 + i % (vocab - 1) for i in range(context + max_rows)]
    table = BlockTable(runner.pool)
    try:
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
