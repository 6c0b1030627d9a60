"""Speculation depth: how many tokens to draft in the next round."""

from __future__ import annotations

from typing import Protocol

from verispec.config import SpeculationSettings


class DepthPolicy(Protocol):
    def depth(self) -> int: ...

    def update(self, proposed: int, accepted: int, propose_s: float, verify_s: float) -> None:
        """Learn from a finished round: its draft count, accepted count and timings."""
        ...


class FixedDepth:
    def __init__(self, depth: int):
        self._depth = depth

    def depth(self) -> int:
        return self._depth

    def update(self, proposed: int, accepted: int, propose_s: float, verify_s: float) -> None:
        pass


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per round when each draft is accepted with probability alpha: (1 - a^(k+1)) / (1 - a)."""
    return k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class AdaptiveDepth:
    """Per-request depth that follows the observed acceptance and the measured costs.

    It keeps a decaying estimate of alpha, the chance that a draft token is accepted given that
    the ones before it were, and of the time a draft token and a verifier pass take. Each round
    it picks the k that maximises expected tokens per second, (1 - a^(k+1)) / (1 - a) divided by
    (verify + k * draft). A wholly accepted round raises alpha, so the depth grows; an early
    rejection lowers it, so the depth shrinks, down to 0 (verifier only) when drafting does not
    pays least (never below 1: a request keeps probing; turning speculation off altogether is a
    server-level decision). Within a round the draft model also stops once its confidence drops
    (DraftPolicy).
    """

    def __init__(self, max_depth: int = 8, start: int = 3, prior_alpha: float = 0.6, memory: float = 0.9):
        self.max_depth = max_depth
        self.memory = memory  # weight of the past per round; about the last 10 rounds count
        # Pseudo-counts for alpha: a weak prior worth a couple of draft positions.
        self._hits, self._trials = 2.0 * prior_alpha, 2.0
        self._draft_s: float | None = None  # per draft token
        self._verify_s: float | None = None  # per verifier pass
        self._depth = min(start, max_depth)

    @property
    def alpha(self) -> float:
        return self._hits / self._trials

    def depth(self) -> int:
        return self._depth

    def update(self, proposed: int, accepted: int, propose_s: float, verify_s: float) -> None:
        self._verify_s = _blend(self._verify_s, verify_s, self.memory)
        if proposed:
            # Positions 1..accepted were hits; the first rejected position (if any) was a miss;
            # positions after it were never tested.
            self._hits = self.memory * self._hits + accepted
            self._trials = self.memory * self._trials + accepted + (accepted < proposed)
        if proposed and proposed == self._depth:
            # A full-depth proposal took exactly `proposed` draft passes; a shorter one (the draft
            # lost confidence) took one more than it returned, so it would overstate the cost.
            self._draft_s = _blend(self._draft_s, propose_s / proposed, self.memory)
        if self._draft_s is None:  # no timing yet: keep the starting depth
            return
        self._depth = max(
            range(1, self.max_depth + 1), key=lambda k: expected_tokens(self.alpha, k) / (self._verify_s + k * self._draft_s)
        )


def _blend(old: float | None, new: float, memory: float) -> float:
    return new if old is None else memory * old + (1.0 - memory) * new


def depth_policy(settings: SpeculationSettings) -> DepthPolicy:
    if settings.depth == "auto":
        return AdaptiveDepth(max_depth=settings.max_depth)
    return FixedDepth(settings.depth)
