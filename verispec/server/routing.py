"""Which proposer serves a request: a bandit over the configured ones, and canary rollouts.

**Per-request choice.** With several proposers configured (draft models, n-gram, none), each
request goes to the one expected to produce the most tokens per second of engine time, as
observed so far: Thompson sampling over each proposer's throughput (generated tokens over the
engine time their requests' rounds took: proposing, verifying, accepting and emitting, the prefills
of verifier and draft included, other requests' rounds not; a ratio of sums, with a normal
posterior around it of the ratio estimator's standard error). Every
proposer is tried `min_trials` times first. Rewards are kept per key (a request attribute such as
the user or a task tag) and over all traffic (for requests without a key). Each key explores on its own: every
proposer is tried `min_trials` times under the key before its figures decide, since what pays
for one kind of request says little about another (borrowing the global figures instead would let
the proposer that wins overall starve the others of the trials that would show them better for
this key). `none` competes like any other arm, so it wins wherever speculation does not pay.

**Canary.** A candidate proposer takes a `fraction` of the traffic beside the current one. Once
each side has `min_requests` requests, their per-request acceptance rates and throughputs are
compared with a one-sided Mann-Whitney U test (no assumption of normality; requests are the
independent units, not tokens, which are correlated within a request). The candidate is promoted
when its acceptance is significantly higher and its throughput not significantly lower; rolled
back when its acceptance is significantly lower by more than `margin` (median difference) or its
throughput significantly lower. Exactness is untouched either way: every proposer's drafts are
verified.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Throughput:
    """An arm's throughput as the ratio estimator sum(tokens) / sum(seconds) over its requests, with
    the delta-method standard error. Unlike the mean of per-request rates, a short request (an
    early stop, where the prefill dominates) weighs by its size instead of swinging the figure."""

    n: int = 0
    tokens: float = 0.0
    seconds: float = 0.0
    tokens2: float = 0.0
    seconds2: float = 0.0
    cross: float = 0.0

    def add(self, tokens: float, seconds: float) -> None:
        self.n += 1
        self.tokens += tokens
        self.seconds += seconds
        self.tokens2 += tokens * tokens
        self.seconds2 += seconds * seconds
        self.cross += tokens * seconds

    @property
    def mean(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def stderr(self) -> float:
        if self.n < 2:
            return 0.0
        r = self.mean
        residual = (self.tokens2 - 2 * r * self.cross + r * r * self.seconds2) / (self.n - 1)  # var of t - r s
        return math.sqrt(max(residual, 0.0) / self.n) / (self.seconds / self.n)


class ProposerBandit:
    def __init__(self, arms: Sequence[str], min_trials: int = 3, rng: random.Random | None = None):
        if not arms:
            raise ValueError("the bandit needs at least one proposer")
        self.arms = list(arms)
        self.min_trials = min_trials
        self.rng = rng or random.Random()
        self._global: dict[str, Throughput] = {arm: Throughput() for arm in self.arms}
        self._keyed: dict[str, dict[str, Throughput]] = defaultdict(lambda: {arm: Throughput() for arm in self.arms})
        self._lock = threading.Lock()

    def choose(self, key: str | None = None) -> str:
        with self._lock:
            stats = {arm: self._figures(key, arm) for arm in self.arms}
            untried = [arm for arm, s in stats.items() if s.n < self.min_trials]
            if untried:
                return min(untried, key=lambda arm: (stats[arm].n, self.arms.index(arm)))
            return max(self.arms, key=lambda arm: self._draw(stats[arm]))

    def update(self, key: str | None, arm: str, tokens: int, busy_s: float) -> None:
        if busy_s <= 0 or tokens <= 0:
            return
        with self._lock:
            self._global[arm].add(tokens, busy_s)  # all traffic: the figures of requests without a key
            if key is not None:
                self._keyed[key][arm].add(tokens, busy_s)

    def means(self, key: str | None = None) -> dict[str, float]:
        return {arm: self._figures(key, arm).mean for arm in self.arms}

    def _figures(self, key: str | None, arm: str) -> Throughput:
        if key is None:
            return self._global[arm]
        return self._keyed[key][arm] if key in self._keyed else Throughput()

    def _draw(self, s: Throughput) -> float:
        # Posterior of the throughput: normal around the estimate with its standard error, floored
        # so that a few near-identical requests cannot make an arm look certain.
        spread = max(s.stderr, 0.05 * s.mean / math.sqrt(s.n))
        return self.rng.gauss(s.mean, spread)


# -- the canary ------------------------------------------------------------------------------------


def mann_whitney_greater(xs: Sequence[float], ys: Sequence[float]) -> float:
    """One-sided p-value that xs tend to be greater than ys (normal approximation with tie
    correction; sound for the 20+ samples per side a canary waits for)."""
    n1, n2 = len(xs), len(ys)
    if not n1 or not n2:
        return 1.0
    pooled = sorted([(x, 0) for x in xs] + [(y, 1) for y in ys])
    ranks = [0.0] * len(pooled)
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        rank = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[k] = rank
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    r1 = sum(r for r, (_, side) in zip(ranks, pooled, strict=True) if side == 0)
    u = r1 - n1 * (n1 + 1) / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)  # continuity correction
    return 0.5 * math.erfc(z / math.sqrt(2))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Arm:
    acceptance: list[float] = field(default_factory=list)  # per request
    throughput: list[float] = field(default_factory=list)  # tokens per busy second, per request


@dataclass(frozen=True)
class Decision:
    verdict: str  # promote or rollback
    why: str


class Canary:
    """A candidate proposer on a slice of traffic, promoted or rolled back by a test."""

    RUNNING, PROMOTED, ROLLED_BACK = "running", "promoted", "rolled_back"

    def __init__(
        self,
        fraction: float,
        min_requests: int = 30,
        alpha: float = 0.05,
        margin: float = 0.05,
        on_decision: Callable[[Decision], None] | None = None,
        rng: random.Random | None = None,
    ):
        self.fraction = fraction
        self.min_requests = min_requests
        self.alpha = alpha
        self.margin = margin
        self.on_decision = on_decision or (lambda d: None)
        self.rng = rng or random.Random()
        self.state = self.RUNNING
        self.arms = {"current": Arm(), "candidate": Arm()}
        self._lock = threading.Lock()

    def route(self) -> str:
        """'candidate' for a `fraction` of requests while the canary runs, else 'current'."""
        if self.state == self.RUNNING and self.rng.random() < self.fraction:
            return "candidate"
        return "current"

    def record(self, arm: str, proposed: int, accepted: int, tokens: int, busy_s: float, failures: int = 0) -> Decision | None:
        """One finished request. A request whose proposals all failed counts as acceptance 0; one that
        never tried to speculate (depth 0, or too short) says nothing about the proposer."""
        if (proposed == 0 and failures == 0) or busy_s <= 0:
            return None
        with self._lock:
            if self.state != self.RUNNING:
                return None
            self.arms[arm].acceptance.append(accepted / proposed if proposed else 0.0)
            self.arms[arm].throughput.append(tokens / busy_s)
            decision = self._judge()
            if decision is not None:
                self.state = self.PROMOTED if decision.verdict == "promote" else self.ROLLED_BACK
        if decision is not None:
            log.warning("canary %s: %s", decision.verdict, decision.why)
            self.on_decision(decision)
        return decision

    def adopted(self) -> Decision | None:
        """A verdict reached elsewhere (by the deployment's judge, `scale/shared.py`) that the router
        has not applied yet; a canary judged here never has one."""
        return None

    def _judge(self) -> Decision | None:
        cur, cand = self.arms["current"], self.arms["candidate"]
        if min(len(cur.acceptance), len(cand.acceptance)) < self.min_requests:
            return None
        n = f"{len(cand.acceptance)} candidate vs {len(cur.acceptance)} current requests"
        better = mann_whitney_greater(cand.acceptance, cur.acceptance)
        worse = mann_whitney_greater(cur.acceptance, cand.acceptance)
        slower = mann_whitney_greater(cur.throughput, cand.throughput)
        gap = _median(cand.acceptance) - _median(cur.acceptance)
        if worse < self.alpha and gap < -self.margin:
            return Decision("rollback", f"acceptance median {gap:+.3f} (p={worse:.2g}) over {n}")
        if slower < self.alpha:
            ratio = _median(cand.throughput) / _median(cur.throughput)
            return Decision("rollback", f"throughput x{ratio:.2f} (p={slower:.2g}) over {n}")
        if better < self.alpha:
            return Decision("promote", f"acceptance median {gap:+.3f} (p={better:.2g}) over {n}")
        return None


class Router:
    """The proposers a request may go to, by name (all drafting for the one verifier), and the
    policy that picks one: the canary's split if a canary runs, else the bandit if several
    proposers are configured, else the configured one."""

    def __init__(self, proposers: dict[str, object], default: str, bandit: ProposerBandit | None = None,
                 canary: Canary | None = None, candidate: str | None = None):
        self.proposers = proposers
        self.current = default
        self.bandit = bandit
        self.canary = canary
        self.candidate = candidate

    def choose(self, key: str | None) -> str:
        if self.canary is not None and (decision := self.canary.adopted()) is not None:
            self._apply(decision)
        if self.canary is not None and self.canary.state == Canary.RUNNING and self.canary.route() == "candidate":
            return self.candidate
        if self.bandit is not None:
            return self.bandit.choose(key)
        return self.current

    def on_trial(self, name: str) -> bool:
        """Whether requests on this proposer are the canary's candidate slice, judged by the canary
        rather than by the circuit breaker that guards the proposer in service."""
        return self.canary is not None and self.canary.state == Canary.RUNNING and name == self.candidate

    def finished(
        self, name: str, key: str | None, proposed: int, accepted: int, tokens: int, busy_s: float, failures: int = 0
    ) -> Decision | None:
        if self.bandit is not None and name in self.bandit.arms:
            self.bandit.update(key, name, tokens, busy_s)
        if self.canary is None or self.canary.state != Canary.RUNNING:
            return None
        if name not in (self.current, self.candidate):
            return None
        arm = "candidate" if name == self.candidate else "current"
        decision = self.canary.record(arm, proposed, accepted, tokens, busy_s, failures)
        self._apply(decision)
        return decision

    def _apply(self, decision: Decision | None) -> None:
        if decision is not None and decision.verdict == "promote":
            self.current = self.candidate  # all traffic to the candidate from now on
            if self.bandit is not None:
                self.bandit = None  # the operator asked for this proposer; the bandit's arms predate it
