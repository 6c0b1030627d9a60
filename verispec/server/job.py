"""A request as the engine thread sees it (`Job`), and the events it sends back to the request's
handler: verified `Delta`s, `Provisional` drafts, an exception, or `Cancelled`.

A job crosses threads: the event loop builds and submits it, the engine thread runs it, and the
event loop reads it again once it has concluded. Each part has one writer:

- the ask (`Ask`, frozen; its fields read-only on the job): request_id, prompt_ids, params, depth,
  deadline, key_id, drafter, proposer, route_key, pinned, guarded, remote, provisional, inspect,
  keep_rounds. Set by the event loop when the handler builds the job, before submission; read by
  both. `remote` is fixed; the `RemoteDrafts` it points to is the verify session's own channel
  (`pending`: the engine thread, from the scheduler's offers; `hint`: the engine thread writes it,
  the handler reads it after the round's event).
- the channel: `loop`, `events`. The asyncio queue is the event loop's alone; the engine thread
  puts on it only through `send` (`loop.call_soon_threadsafe`).
- progress: request, speculate, admitted, first_token, last_token, generated, engine_s, rounds,
  mismatches, stats, outcome. Written by the engine thread only, from submission to the job's end
  (`outcome` once, last). The event loop reads them when it concludes the request: after the
  last event as a rule; a request concluded early (the client gone, a session closed or expired)
  reads them while the engine thread may still be finishing its round, so such a reading is a
  snapshot (single values; lists copied, `Request.stats` deep-copied: `underway.stats_so_far`).
- cancellation: `cancel()` from any thread (the handler on the event loop, the policy gate, the
  session sweeper, the scheduler's drain in a worker thread); `cancelled` and `cancel_outcome`
  are read by the engine thread each pass. Guarded by a lock: the first cancellation's outcome
  is the one counted.
- `arrived`: set at creation, never written again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True, eq=False)
class Ask:
    """What a request asks of the engine, fixed before it is submitted (event loop) and read by the
    engine thread. `prompt_ids` is never mutated."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    depth: Depth | None = None  # per-request override of the configured depth
    deadline: float | None = None  # time.monotonic() value; None = no deadline
    key_id: str | None = None  # the API key it came with: slots are shared fairly among keys
    drafter: Proposer | None = None  # the chosen proposer; None = verifier only
    proposer: str | None = None  # its name, for routing feedback
    route_key: str | None = None
    pinned: bool = False  # the client named the proposer; its figures teach the choice nothing
    guarded: bool = True  # the breaker governs this job; a canary candidate is judged by the canary instead
    remote: RemoteDrafts | None = None  # a verify-API session: its edge client proposes
    provisional: bool = False  # the client wants each round's drafts before their verdict
    inspect: bool = False  # sampled for drift and mismatch figures
    keep_rounds: bool = False  # for trace spans


def _asked(name: str) -> property:
    return property(lambda job: getattr(job.ask, name), doc=f"The ask's `{name}`: fixed before submission.")


class Job:
    """One request in the engine. `Job(request_id, prompt_ids, params, depth, deadline, loop,
    **ask)`: the rest of `Ask`'s fields by name; `events` is a new queue unless one is given."""

    request_id = _asked("request_id")
    prompt_ids = _asked("prompt_ids")
    params = _asked("params")
    depth = _asked("depth")
    deadline = _asked("deadline")
    key_id = _asked("key_id")
    drafter = _asked("drafter")
    proposer = _asked("proposer")
    route_key = _asked("route_key")
    pinned = _asked("pinned")
    guarded = _asked("guarded")
    remote = _asked("remote")
    provisional = _asked("provisional")
    inspect = _asked("inspect")
    keep_rounds = _asked("keep_rounds")

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        depth: Depth | None,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
        events: asyncio.Queue | None = None,
        **ask: Any,
    ):
        self.ask = Ask(request_id, prompt_ids, params, depth, deadline, **ask)
        self.arrived = time.monotonic()
        # The channel: the event loop's; the engine thread reaches it through `send` only.
        self.loop = loop
        # Delta | Provisional | Exception | Cancelled, for the handler
        self.events: asyncio.Queue = asyncio.Queue() if events is None else events
        # Progress: the engine thread's, from submission on.
        self.request: Any = None  # its Request in the engine, once admitted
        self.speculate = True  # decided when the engine takes it, by the circuit breaker
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.generated = 0
        self.engine_s = 0.0  # engine-thread time spent on this job's rounds (prefills included)
        self.rounds: list = []  # Round, when keep_rounds
        self.mismatches: list = []  # inspect.Mismatch, when inspect
        self.stats: Any = None  # RequestStats, once finished
        self.outcome: Outcome | None = None  # set once, by the scheduler, when the job ends
        # Cancellation: any thread, under the lock.
        self._cancel_lock = threading.Lock()
        self._cancel_outcome: Outcome | None = None

    def __repr__(self) -> str:
        return f"Job({self.request_id!r}, outcome={self.outcome!r}, cancelled={self.cancelled})"

    def cancel(self, outcome: Outcome = "cancelled") -> None:
        """Ask the engine thread to drop this job: the client went away (or, with another outcome,
        its session expired, or the policy gate stopped it). The first cancellation's outcome
        stands. Safe from any thread."""
        with self._cancel_lock:
            if self._cancel_outcome is None:
                self._cancel_outcome = outcome

    @property
    def cancelled(self) -> bool:
        with self._cancel_lock:
            return self._cancel_outcome is not None

    @property
    def cancel_outcome(self) -> Outcome:
        """What the cancellation is counted as ("cancelled" until there is one)."""
        with self._cancel_lock:
            return self._cancel_outcome or "cancelled"

    @property
    def holds_slot(self) -> bool:
        """Whether it takes one of the running slots: not while parked, nor once cancelled (the
        next pass ends it)."""
        return not self.parked and not self.cancelled

    @property
    def parked(self) -> bool:
        """A verify-API session between rounds: nothing for the engine to do until drafts come."""
        return self.request is not None and self.request.parked and not self.cancelled

    def send(self, item) -> None:
        """Put an event on the job's queue from the engine thread (through its event loop)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass
