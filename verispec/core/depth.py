"""Speculation depth: how many tokens to draft in the next round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from verispec.config import SpeculationSettings


@dataclass(frozen=True)
class StepCosts:
    """Measured cost of the two halves of a round, for `AdaptiveDepth`: an edge client's, from its
    round trips to the verifier and its own draft tokens (the engine prices depths by its passes,
    `goodput.py`)."""

    verify_s: tuple[float, ...]  # [T-1]: one verifier pass over T tokens, T = 1 .. max_depth+1
    draft_s: float  # one draft token


class DepthPolicy(Protocol):
    def depth(self) -> int: ...

    def update(self, proposed: int, accepted: int) -> None: ...


class FixedDepth:
    def __init__(self, depth: int):
        self._depth = depth

    def depth(self) -> int:
        return self._depth

    def update(self, proposed: int, accepted: int) -> None:
        pass


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per round when each draft is accepted with probability alpha: (1 - a^(k+1)) / (1 - a)."""
    return k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class AdaptiveDepth:
    """Per-request depth that follows the observed acceptance, priced by measured step costs.

    It keeps a decaying estimate of alpha, the chance that a draft token is accepted given that
    the ones before it were, and each round picks the k that maximises expected tokens per second,
    (1 - a^(k+1)) / (1 - a) / (verify(k+1) + k * draft), using the verifier's measured cost for
    each pass width (which on real hardware is far from flat). A wholly accepted round raises
    alpha, so the depth grows; an early rejection lowers it, so the depth shrinks, down to 0
    (verifier only) when drafting does not pay. At depth 0 it still probes with one draft token
    every `probe_every` rounds, so that a request whose text turns predictable gets speculation back.
    Within a round the draft model also stops once its own confidence drops (DraftPolicy).
    `costs` may be replaced between rounds: the engine's follow the rounds it runs, an edge
    client's its round trips.
    """

    def __init__(
        self, costs: StepCosts, max_depth: int = 8, prior_alpha: float = 0.6, memory: float = 0.9, probe_every: int = 8
    ):
        self.costs = costs
        self.max_depth = min(max_depth, len(costs.verify_s) - 1)
        self.memory = memory  # weight of the past per round: about the last ten rounds count
        self.probe_every = probe_every
        self._hits, self._trials = 2.0 * prior_alpha, 2.0  # a weak prior worth two draft positions
        self._rounds_off = 0
        self._best = self._choose()

    @property
    def alpha(self) -> float:
        return self._hits / self._trials

    def depth(self) -> int:
        if self._best == 0 and self._rounds_off % self.probe_every == self.probe_every - 1:
            return 1
        return self._best

    def update(self, proposed: int, accepted: int) -> None:
        if proposed:
            # Positions 1..accepted were hits, the first rejected one (if any) a miss; later
            # positions were never tested.
            self._hits = self.memory * self._hits + accepted
            self._trials = self.memory * self._trials + accepted + (accepted < proposed)
        self._best = self._choose()
        self._rounds_off = self._rounds_off + 1 if self._best == 0 else 0

    def _choose(self) -> int:
        alpha, verify, draft = self.alpha, self.costs.verify_s, self.costs.draft_s
        return max(range(self.max_depth + 1), key=lambda k: expected_tokens(alpha, k) / (verify[k] + k * draft))


def depth_policy(settings: SpeculationSettings, costs: StepCosts | None) -> DepthPolicy:
    if settings.depth == "auto":
        assert costs is not None, "adaptive depth needs measured step costs"
        return AdaptiveDepth(costs, max_depth=settings.max_depth)
    return FixedDepth(settings.depth)
