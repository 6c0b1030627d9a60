"""Speculation depth: how many tokens to draft in the next round."""

from __future__ import annotations

from typing import Protocol

from verispec.config import SpeculationSettings


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


class AdaptiveDepth:
    """Per-request depth that follows the observed acceptance.

    Grow by one after a full-depth round that was wholly accepted (the draft is on a run); shrink by one when fewer
    than half the drafts were accepted (the tail of the draft was wasted work). The draft model
    additionally stops early within a round when its own confidence drops (see DraftPolicy).
    """

    def __init__(self, start: int = 3, min_depth: int = 1, max_depth: int = 8):
        self._depth = max(min_depth, min(start, max_depth))
        self.min_depth = min_depth
        self.max_depth = max_depth

    def depth(self) -> int:
        return self._depth

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == proposed == self._depth:
            self._depth = min(self._depth + 1, self.max_depth)
        elif 2 * accepted < proposed:
            self._depth = max(self._depth - 1, self.min_depth)


def depth_policy(settings: SpeculationSettings) -> DepthPolicy:
    if settings.depth == "auto":
        return AdaptiveDepth(max_depth=settings.max_depth)
    return FixedDepth(settings.depth)
