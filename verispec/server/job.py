"""A request as the engine thread sees it (`Job`), and the events it sends back to the request's
handler: verified `Delta`s, `Provisional` drafts, an exception, or `Cancelled`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from verispec.audit.outcomes import Outcome
from verispec.config import Depth, SamplingParams
from verispec.proposers.base import Proposer
from verispec.proposers.remote import RemoteDrafts


class Overloaded(Exception):
    """The queue is full or the server is shutting down: come back later (503 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request ran past its deadline (504)."""


class Cancelled:
    """The last event of a job that was cancelled on its behalf (client gone, shutdown)."""


@dataclass(frozen=True)
class Provisional:
    """Draft tokens the proposer made for a job's round, before the verifier has seen them."""

    token_ids: list[int]


@dataclass(eq=False)
class Job:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    depth: Depth | None  # per-request override of the configured depth
    deadline: float | None  # time.monotonic() value; None = no deadline
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # Delta | Exception | Cancelled
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0
    engine_s: float = 0.0  # engine-thread time spent on this job's rounds (prefills included)
    speculate: bool = True  # decided at admission by the circuit breaker
    guarded: bool = True  # the breaker governs this job; a canary candidate is judged by the canary instead
    inspect: bool = False  # sampled for drift and mismatch figures
    keep_rounds: bool = False  # for trace spans
    rounds: list = field(default_factory=list)  # Round, when keep_rounds
    mismatches: list = field(default_factory=list)  # inspect.Mismatch, when inspect
    stats: object = None  # RequestStats, once finished
    drafter: Proposer | None = None  # the chosen proposer; None = verifier only
    proposer: str | None = None  # its name, for routing feedback
    route_key: str | None = None
    pinned: bool = False  # the client named the proposer; its figures teach the choice nothing
    request: object = None  # its Request in the engine, once admitted
    remote: RemoteDrafts | None = None  # a verify-API session: its edge client proposes
    provisional: bool = False  # the client wants each round's drafts before their verdict
    key_id: str | None = None  # the API key it came with: slots are shared fairly among keys
    cancelled: bool = False
    cancel_outcome: Outcome = "cancelled"  # what the cancellation is counted as
    outcome: Outcome | None = None  # set once, by the scheduler, when the job ends

    def cancel(self, outcome: Outcome = "cancelled") -> None:
        """Ask the engine thread to drop this job: the client went away (or, with another outcome,
        its session expired, or the policy gate stopped it)."""
        if not self.cancelled:
            self.cancel_outcome = outcome
        self.cancelled = True

    @property
    def holds_slot(self) -> bool:
        """Whether it takes one of the running slots: not while parked, nor once cancelled (the
        next pass ends it)."""
        return not self.parked and not self.cancelled

    @property
    def parked(self) -> bool:
        """A verify-API session between rounds: nothing for the engine to do until drafts come."""
        return self.request is not None and self.request.parked and not self.cancelled

    def _push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass
