"""What the replicas of one deployment share, through small named Ray actors (no CPU of their own):

- `MetricsBoard`: each replica posts its Prometheus exposition every few seconds (and at each
  scrape); a scrape of any replica answers every live replica's series with a `replica` label;
- `CanaryJudge`: one `Canary` for the whole deployment; replicas send it their finished requests'
  figures and adopt its verdict, so a candidate is promoted or rolled back once, on all replicas.

The actors are detached (a replica that dies takes nothing with it) and found by name, so the
first replica to start creates them and the others join.
"""

from __future__ import annotations

import logging
import threading
import time

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from verispec.server.routing import Arm, Canary, Decision

log = logging.getLogger(__name__)

NAMESPACE = "verispec"  # of the Ray actors the replicas share

POST_EVERY_S = 2.0  # how often a replica posts its metrics
FORGET_AFTER_S = 10.0  # a replica silent this long is gone (killed, or scaled down)


def _named(cls, name: str, *args):
    """The detached actor called `name`, created by the first caller."""
    remote = ray.remote(num_cpus=0, max_restarts=-1)(cls)
    return remote.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote(*args)


class MetricsBoard:
    """The latest exposition of every replica."""

    def __init__(self):
        self.posts: dict[str, tuple[float, bytes]] = {}

    def post(self, replica: str, text: bytes) -> None:
        self.posts[replica] = (time.monotonic(), text)

    def collect(self, max_age_s: float) -> dict[str, bytes]:
        now = time.monotonic()
        self.posts = {r: (t, text) for r, (t, text) in self.posts.items() if now - t <= max_age_s}
        return {r: text for r, (_, text) in self.posts.items()}


def merge_expositions(texts: dict[str, bytes]) -> bytes:
    """Replicas' expositions as one, each series labelled with its replica; HELP and TYPE once per family."""
    families: dict[str, Metric] = {}
    for replica in sorted(texts):
        for family in text_string_to_metric_families(texts[replica].decode()):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            merged.samples.extend(s._replace(labels={**s.labels, "replica": replica}) for s in family.samples)

    class Collected:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collected())
    return generate_latest(registry)


class ReplicaMetrics:
    """A replica's side of the board: posts in the background, merges at scrape time."""

    def __init__(self, board_name: str, replica: str):
        self.board = _named(MetricsBoard, board_name)
        self.replica = replica
        self.registry: CollectorRegistry | None = None
        self._stop = threading.Event()

    def start(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        threading.Thread(target=self._post_forever, name="verispec-metrics-post", daemon=True).start()

    def _post_forever(self) -> None:
        while not self._stop.wait(POST_EVERY_S):
            try:
                self.board.post.remote(self.replica, generate_latest(self.registry))
            except Exception as exc:  # the board restarts (max_restarts): try again next time
                log.debug("metrics post failed: %r", exc)

    def __call__(self, own: bytes) -> bytes:
        """This replica's exposition, fresh, and every other live replica's, as one."""
        ray.get(self.board.post.remote(self.replica, own))
        return merge_expositions(ray.get(self.board.collect.remote(FORGET_AFTER_S)))


class CanaryJudge:
    """The deployment's one canary: every replica's figures in, one verdict out."""

    def __init__(self, fraction: float, min_requests: int, alpha: float, margin: float):
        self.canary = Canary(fraction, min_requests, alpha, margin)
        self.decided_by: str | None = None
        self.decision: Decision | None = None

    def record(self, replica: str, arm: str, proposed: int, accepted: int, tokens: int, busy_s: float, failures: int) -> None:
        decision = self.canary.record(arm, proposed, accepted, tokens, busy_s, failures)
        if decision is not None:
            self.decision, self.decided_by = decision, replica

    def status(self) -> tuple[Decision | None, str | None, dict[str, Arm]]:
        return self.decision, self.decided_by, self.canary.arms


class SharedCanary(Canary):
    """A replica's view of the deployment's canary. Routing stays local (the same fraction of
    each replica's requests goes to the candidate); the figures go to the judge, and its verdict
    comes back within a second. The replica whose request decided it reports the decision (so a
    deployment counts it once); the others adopt it."""

    POLL_S = 1.0

    def __init__(self, judge_name: str, replica: str, fraction: float, min_requests: int = 30, alpha: float = 0.05,
                 margin: float = 0.05, on_decision=None, on_adopted=None):  # fmt: skip
        super().__init__(fraction, min_requests, alpha, margin, on_decision)
        self.judge = _named(CanaryJudge, judge_name, fraction, min_requests, alpha, margin)
        self.replica = replica
        self.on_adopted = on_adopted or (lambda d: None)
        self._unapplied: Decision | None = None
        threading.Thread(target=self._poll, name="verispec-canary-poll", daemon=True).start()

    def record(self, arm: str, proposed: int, accepted: int, tokens: int, busy_s: float, failures: int = 0) -> None:
        if self.state == self.RUNNING and not ((proposed == 0 and failures == 0) or busy_s <= 0):
            self.judge.record.remote(self.replica, arm, proposed, accepted, tokens, busy_s, failures)
        return None  # the verdict arrives through `adopted`

    def adopted(self) -> Decision | None:
        decision, self._unapplied = self._unapplied, None
        return decision

    def _poll(self) -> None:
        while self.state == self.RUNNING:
            time.sleep(self.POLL_S)
            try:
                decision, decided_by, arms = ray.get(self.judge.status.remote(), timeout=10)
            except Exception as exc:
                log.warning("canary judge unreachable: %r", exc)
                continue
            self.arms = arms
            if decision is None:
                continue
            self.state = self.PROMOTED if decision.verdict == "promote" else self.ROLLED_BACK
            self._unapplied = decision
            if decided_by == self.replica:
                log.warning("canary %s: %s", decision.verdict, decision.why)
                self.on_decision(decision)
            else:
                self.on_adopted(decision)
