"""The engine thread, and the bound on what waits for it.

Requests are refused at once past `max_running + max_waiting` requests holding or waiting for a
slot (the server answers 503), so overload never builds an unbounded backlog. Below that bound a
job goes to the engine (`core/engine.py`), which owns admission: up to `max_running` requests
run, a free slot going to the request whose API key holds the fewest (so one key's requests and
sessions never keep another key's request waiting past its fair share), and KV memory decides the
rest (prompts chunked, preemption when blocks run out). A verify-API session between rounds is
parked: it holds no slot (its KV stays while memory allows, and goes first when memory runs
short), and its next round waits for a slot like any request.

One thread owns the engine: jobs reach it through an inbox this thread empties before each step,
and every step advances every running request by one round. Verified tokens go back to the
request's asyncio queue as they are accepted. Every round asks the job's depth limit first: 0
when the circuit breaker is open or the job was admitted without speculation; where the runner
batches, the engine's goodput choice shrinks depths as the batch fills; where it runs sequences
one after another (`--scheduler interleaved`, the transformers backend) a load-aware cap does,
from the configured maximum to 0 as the server fills (`load_depth_from` .. `load_depth_off`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from verispec.config import ServerSettings
from verispec.core.engine import Engine
from verispec.core.request import Request
from verispec.core.rounds import Delta
from verispec.errors import UserError
from verispec.proposers.base import Proposal
from verispec.server.breaker import CircuitBreaker
from verispec.server.job import Cancelled, DeadlineExceeded, Job, Overloaded, Provisional
from verispec.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


def load_depth_cap(busy: int, server: ServerSettings, max_depth: int) -> int:
    """Speculation depth allowed with `busy` requests running or queued.

    The load is the share of the server's capacity taken by requests beyond the first, so a lone
    request always gets the full depth; from `load_depth_from` the cap falls linearly to 0 at
    `load_depth_off`.
    """
    capacity = server.max_running + server.max_waiting
    load = max(0, busy - 1) / max(1, capacity - 1)
    start, off = server.load_depth_from, server.load_depth_off
    if load <= start:
        return max_depth
    if load >= off:
        return 0
    return round(max_depth * (off - load) / (off - start))


@dataclass(frozen=True)
class CostModel:
    """Dollars per hour of busy hardware, and what a token costs verifier-only."""

    verifier_per_hour: float = 0.0
    proposer_per_hour: float = 0.0
    verifier_token_s: float | None = None  # measured one-token verifier step; None: no counterfactual to price

    def of(self, verify_s: float, propose_s: float) -> float:
        return (verify_s * self.verifier_per_hour + propose_s * self.proposer_per_hour) / 3600.0


class Scheduler:
    def __init__(
        self, engine: Engine, server: ServerSettings, breaker: CircuitBreaker, metrics: ServerMetrics, cost: CostModel | None = None
    ):
        self.engine = engine
        self.cost = cost or CostModel()
        self.on_finished = None  # called on the engine thread with each job that finished ok
        self._token_s: float | None = None  # moving average of a verifier-only round's time
        self.server = server
        self.breaker = breaker
        self.metrics = metrics
        speculation = engine.speculation
        self.max_depth = speculation.max_depth if speculation.depth == "auto" else int(speculation.depth)
        self._inbox: deque[Job] = deque()  # submitted, not yet handed to the engine
        self._offers: deque[tuple[Job, Proposal]] = deque()  # verify-API sessions' next drafts
        self._jobs: dict[Request, Job] = {}  # every job in the engine, by its request
        self._active_count = 0  # slots held as of the last step, published by the engine thread
        self._waiting_count = 0  # waiting in the engine or the inbox, and offers not yet taken
        self._cv = threading.Condition()
        self._draining = False
        self._stopped = False
        self._typical_s: float | None = None  # moving average of end-to-end latency, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="verispec-engine", daemon=True)
        engine.on_proposed = self._proposed

    # -- the asyncio side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job or refuse it at once."""
        with self._cv:
            if self._draining:
                raise Overloaded("the server is shutting down; retry on another replica", retry_after_s=5)
            # Bound the total, not each list: between a job's end and the next admission the running
            # list is briefly short, and the queue must not grow past its bound meanwhile.
            if self.busy >= self.server.max_running + self.server.max_waiting:
                raise Overloaded(
                    f"the server is at capacity ({self.server.max_running} running, {self.server.max_waiting} queued); retry shortly",
                    retry_after_s=self._retry_after(),
                )
            self._inbox.append(job)
            self._waiting_count += 1
            self._publish_load()
            self._cv.notify()

    def offer(self, job: Job, proposal: Proposal) -> None:
        """A verify-API session's drafts for its next round: the session waits for a slot again,
        behind the requests already waiting (a parked session holds none)."""
        with self._cv:
            self._offers.append((job, proposal))
            self._waiting_count += 1
            self._publish_load()
            self._cv.notify()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (it stops only on shutdown)."""
        return self._thread.is_alive() or self._stopped

    @property
    def busy(self) -> int:
        """Requests holding or waiting for a slot (parked sessions hold none)."""
        return self._active_count + self._waiting_count

    @property
    def active(self) -> int:
        """Running requests that hold a slot (`Job.holds_slot`)."""
        return self._active_count

    def drain(self, grace_s: float) -> None:
        """Stop admitting; let in-flight work finish for up to `grace_s`, then cancel the rest."""
        with self._cv:
            self._draining = True
            end = time.monotonic() + grace_s
            while self._jobs or self._inbox:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(timeout=min(left, 0.1))
            for job in [*self._jobs.values(), *self._inbox]:
                log.warning("request %s cancelled: the shutdown grace period (--grace-s %g) is over", job.request_id, self.server.grace_s)
                job.cancel()
            self._stopped = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    # -- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._inbox and not self._offers and not self._stopped:
                    self._cv.wait()
                if self._stopped and not self._jobs and not self._inbox:
                    return
                if not self._inbox and not self._offers and not self._engine_has_work():
                    # Only sessions waiting for their clients' drafts: sleep until `offer` (or, for a
                    # cancellation or a deadline, the next look).
                    self._cv.wait(timeout=0.25)
                inbox, self._inbox = list(self._inbox), deque()
                offers, self._offers = list(self._offers), deque()
            for job in inbox:
                self._add(job)
            for job, proposal in offers:
                if job.outcome is None and job.request is not None:
                    job.remote.pending = proposal
                    self.engine.resume(job.request)
            for job in list(self._jobs.values()):
                self._ended(job)
            self._step()
            if self._stopped:
                for job in [*self._jobs.values(), *self._inbox]:
                    self._finish(job, "cancelled", Cancelled())
                return

    def _engine_has_work(self) -> bool:
        engine = self.engine
        return any(not r.parked for r in engine.running) or any(not r.parked for r in engine.waiting)

    def _add(self, job: Job) -> None:
        """Hand a job to the engine, which admits it as slots and KV memory allow."""
        if job.cancelled or self._stopped:
            self._finish(job, job.cancel_outcome if job.cancelled else "cancelled", Cancelled())
            return
        job.speculate = self.breaker.speculating() or not job.guarded
        try:
            job.request = self.engine.add(
                job.request_id, job.prompt_ids, job.params, self.engine.speculation, job.drafter, depth=job.depth,
                depth_limit=lambda job=job: self._depth_limit(job), inspect=job.inspect, remote=job.remote,
                draft_ahead=job.provisional, share_key=job.key_id or "",
            )  # fmt: skip
        except UserError as exc:  # bad input the handler could not see before the engine ran
            self._finish(job, "error", exc)
            return
        self._jobs[job.request] = job
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))

    def _step(self) -> None:
        """One pass of the engine for all its requests."""
        try:
            results = self.engine.step()
        except Exception as exc:
            log.exception("an engine step failed; its requests are ended")
            for job in list(self._jobs.values()):
                if not job.parked:
                    self._finish(job, "error", exc)
            return
        finally:
            self._count()
        self.metrics.observe_cache(self.engine)
        now = time.monotonic()
        for job in self._jobs.values():
            if job.admitted is None and job.request.admitted is not None:
                job.admitted = job.request.admitted
                self.metrics.queue_time.observe(job.admitted - job.arrived)
        for request, delta in results:
            job = self._jobs.get(request)
            if job is None or job.outcome is not None:
                continue
            if isinstance(delta, UserError):  # this request alone could not go on (its format): a 400 for it
                self._finish(job, "error", delta)
                continue
            if delta.round is not None:
                job.engine_s += delta.round.verify_s + delta.round.propose_s
            try:
                self._deliver(job, delta, now)
            except Exception as exc:  # a fault in what watches a round ends its request, not this thread
                log.exception("delivering a round failed; its request is ended")
                self._finish(job, "error", exc)

    def _count(self) -> None:
        """Publish the engine's counts for `submit`'s bound and the load gauges."""
        engine = self.engine
        with self._cv:
            self._active_count = engine.active
            self._waiting_count = sum(not r.parked for r in engine.waiting) + len(self._inbox) + len(self._offers)
            self._publish_load()

    def _proposed(self, proposals: dict) -> None:
        """A pass's drafts, before they are scored: to the clients that asked for them."""
        for request, proposal in proposals.items():
            job = self._jobs.get(request)
            if job is not None and job.provisional and not job.cancelled:
                job.send(Provisional(list(proposal.tokens)))

    def _ended(self, job: Job) -> bool:
        """Finish a job that was cancelled or ran past its deadline; True if so."""
        if job.cancelled:
            self._finish(job, job.cancel_outcome, Cancelled())
        elif job.deadline is not None and time.monotonic() >= job.deadline:
            waited = job.request is None or job.request.admitted is None
            why = "the request's deadline passed while it waited in the queue" if waited else "the request ran past its deadline"
            self._finish(job, "deadline", DeadlineExceeded(why))
        else:
            return False
        return True
    def _deliver(self, job: Job, delta: Delta, now: float) -> None:
        """Send a round's tokens to the client and conclude the job on its last delta."""
        self._observe(job, delta, now)
        job.send(delta)
        if delta.finish_reason is not None:
            job.stats = delta.stats
            job.engine_s += delta.stats.prefill_s
            self.metrics.observe_finished(delta.stats, delta.finish_reason)
            self._account(delta.stats)
            self._finish(job, "ok", None)
            if self.on_finished is not None:
                self.on_finished(job)

    def _observe(self, job: Job, delta: Delta, now: float) -> None:
        round_ = delta.round
        if round_ is not None:
            self.metrics.observe_round(round_)
            self.metrics.verifier_busy.inc(round_.verify_s)
            self.metrics.proposer_busy.inc(round_.propose_s)
            self.metrics.cost.inc(self.cost.of(round_.verify_s, round_.propose_s))
            if job.speculate and job.guarded:
                self.breaker.record(round_)
            if job.keep_rounds:
                job.rounds.append(round_)
            if round_.inspection is not None:
                self.metrics.observe_drift(round_.inspection)
                if round_.inspection.mismatch is not None:
                    job.mismatches.append(round_.inspection.mismatch)
        if not delta.token_ids:
            return
        # Tokens count as they are emitted, as vLLM counts them, cancelled requests included, so
        # that cost per token divides like by like.
        self.metrics.generation_tokens.inc(len(delta.token_ids))
        if round_ is not None and round_.proposed == 0 and round_.verify_s > 0:
            # A round without drafts is a verifier-only step: price the counterfactual with live
            # figures, not only with the start-up calibration (which a busy machine inflates).
            self._token_s = round_.verify_s if self._token_s is None else 0.95 * self._token_s + 0.05 * round_.verify_s
        token_s = self._token_s if self._token_s is not None else self.cost.verifier_token_s
        if token_s is not None:
            self.metrics.cost_verifier_only.inc(self.cost.of(len(delta.token_ids) * token_s, 0.0))
        elif round_ is not None:
            self.metrics.cost_verifier_only.inc(self.cost.of(round_.verify_s, round_.propose_s))
        job.generated += len(delta.token_ids)
        if job.first_token is None:
            job.first_token = now
            self.metrics.ttft.observe(now - job.arrived)
        else:
            gap = (now - job.last_token) / len(delta.token_ids)  # tokens of one round arrive together
            for _ in delta.token_ids:
                self.metrics.itl.observe(gap)
        job.last_token = now

    def _account(self, stats) -> None:
        """A finished request's prefill, in the actual and in the verifier-only cost alike."""
        self.metrics.verifier_busy.inc(stats.prefill_s)
        self.metrics.cost.inc(self.cost.of(stats.prefill_s, 0.0))
        self.metrics.cost_verifier_only.inc(self.cost.of(stats.prefill_s, 0.0))

    def _finish(self, job: Job, outcome: str, event) -> None:
        if job.outcome is not None:
            return
        job.outcome = outcome
        if job.request is not None:
            self.engine.abort(job.request)  # its blocks are free at once
            self._jobs.pop(job.request, None)
        if event is not None:
            job.send(event)
        end = time.monotonic()
        self.metrics.outcome(outcome).inc()
        if outcome == "ok":
            latency = end - job.arrived
            self.metrics.e2e.observe(latency)
            self._typical_s = latency if self._typical_s is None else 0.8 * self._typical_s + 0.2 * latency
            if job.generated > 1:
                self.metrics.tpot.observe((job.last_token - job.first_token) / (job.generated - 1))
        with self._cv:
            if job in self._inbox:
                self._inbox.remove(job)
            self._cv.notify_all()

    # -- load ----------------------------------------------------------------------------------

    def depth_cap(self) -> int:
        if self.engine.runner.batches:
            return self.max_depth  # the goodput choice shrinks depths as the batch fills
        return load_depth_cap(self.busy, self.server, self.max_depth)

    def _depth_limit(self, job: Job) -> int:
        if not job.speculate or (job.guarded and not self.breaker.speculating()):
            return 0
        return self.depth_cap()

    def _publish_load(self) -> None:
        self.metrics.running.set(self._active_count)
        self.metrics.waiting.set(self._waiting_count)
        self.metrics.depth_cap.set(self.depth_cap())

    def _retry_after(self) -> float:
        """A rough time until a slot frees: the queue ahead times a typical request's latency."""
        typical = self._typical_s if self._typical_s is not None else 5.0
        return max(1.0, typical * (self._waiting_count + 1) / self.server.max_running)
