"""The circuit breaker: speculation off when it stops paying, probed again later.

Closed (speculating) it watches every round: the acceptance rate over the last `window` draft
tokens, and proposer failures (errors, timeouts) over the last 64 rounds that asked for drafts.
It opens when the rate falls below `min_acceptance` (once half a window of drafts is seen) or the
failures reach `max_failures`. Open, new requests run verifier-only, and so do the remaining
rounds of requests in flight; every request's output stays exact either way. After `cooldown_s` it
turns half-open: requests speculate again as probes, and the first half window of drafts (or
`max_failures` failures) decides between closed and open.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from verispec.core.rounds import Round

log = logging.getLogger(__name__)

FAILURE_WINDOW = 64  # rounds


class BreakerState(enum.IntEnum):
    CLOSED = 0  # speculating
    OPEN = 1  # verifier only
    HALF_OPEN = 2  # speculating on probation


class CircuitBreaker:
    def __init__(
        self,
        min_acceptance: float,
        window: int,
        max_failures: int,
        cooldown_s: float,
        on_change: Callable[[BreakerState, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.min_acceptance = min_acceptance
        self.window = window
        self.max_failures = max_failures
        self.cooldown_s = cooldown_s
        self.on_change = on_change
        self.clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._drafts: deque[tuple[int, int]] = deque()  # (proposed, accepted) per round
        self._proposed = self._accepted = 0
        self._failures: deque[bool] = deque(maxlen=FAILURE_WINDOW)
        self._lock = threading.Lock()

    @property
    def state(self) -> BreakerState:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def speculating(self) -> bool:
        return self.state != BreakerState.OPEN

    @property
    def acceptance_rate(self) -> float | None:
        return self._accepted / self._proposed if self._proposed else None

    def record(self, round_: Round) -> None:
        """Feed one engine round (rounds that asked for no drafts tell nothing and are skipped)."""
        if round_.depth == 0:
            return
        with self._lock:
            if self._state == BreakerState.OPEN:
                return  # rounds finishing after the trip were started before it
            self._failures.append(round_.proposer_failed)
            if round_.proposed:
                self._drafts.append((round_.proposed, round_.accepted))
                self._proposed += round_.proposed
                self._accepted += round_.accepted
                while self._proposed - self._drafts[0][0] >= self.window:
                    proposed, accepted = self._drafts.popleft()
                    self._proposed -= proposed
                    self._accepted -= accepted
            self._judge()

    def _judge(self) -> None:
        failures = sum(self._failures)
        if failures >= self.max_failures:
            self._move(BreakerState.OPEN, f"{failures} proposer failures in the last {len(self._failures)} rounds")
            return
        if self._proposed < self.window // 2:
            return
        rate = self._accepted / self._proposed
        if rate < self.min_acceptance:
            self._move(
                BreakerState.OPEN,
                f"acceptance rate {rate:.2f} over the last {self._proposed} draft tokens is below {self.min_acceptance}",
            )
        elif self._state == BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED, f"probe acceptance rate {rate:.2f} over {self._proposed} draft tokens")

    def _maybe_half_open(self) -> None:
        if self._state == BreakerState.OPEN and self.clock() - self._opened_at >= self.cooldown_s:
            self._move(BreakerState.HALF_OPEN, f"{self.cooldown_s:g}s cool-down over; probing speculation again")

    def _move(self, state: BreakerState, why: str) -> None:
        if state == self._state:
            return
        self._state = state
        self._drafts.clear()
        self._proposed = self._accepted = 0
        self._failures.clear()
        if state == BreakerState.OPEN:
            self._opened_at = self.clock()
        level = logging.WARNING if state == BreakerState.OPEN else logging.INFO
        log.log(level, "speculation circuit breaker %s: %s", state.name.lower().replace("_", "-"), why)
        if self.on_change is not None:
            self.on_change(state, why)
