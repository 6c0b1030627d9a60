"""What a request's client may see, in order: verified text the policy gate has released, and,
for a client that asked for it, provisional drafts before their verdict.

`Reply.next()` is the handler's one read of a job's events. The policy gate sees verified text
only, never drafts; text reaches the client only once the gate has passed it, so a blocked match
is never sent, logged or audited (the handlers keep and conclude with released text only). On a
blocking finding the reply ends with `finish_reason: "content_filter"` and the job is stopped.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from fastapi import Request

from verispec.core.engine import Delta
from verispec.errors import UserError
from verispec.policy import PolicyGate
from verispec.server import errors
from verispec.server.errors import APIError, bad_request, retry_later
from verispec.server.job import Cancelled, DeadlineExceeded, Job, Provisional
from verispec.server.metrics import ServerMetrics
from verispec.server.underway import Underway
from verispec.stats import RequestStats


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


class Reply:
    def __init__(self, underway: Underway, request: Request | None, gate: PolicyGate | None, metrics: ServerMetrics):
        self.underway, self.job, self.request = underway, underway.job, request
        self.gate, self.metrics = gate, metrics
        self.text: list[str] = []  # released text: all the client has been sent, and all that is recorded

    @property
    def released(self) -> str:
        return "".join(self.text)

    async def next(self) -> Delta | Provisional:
        """The next thing for the client; errors become API errors. Checks for a departed client
        each second."""
        item = await _next_event(self.job, self.request)
        if isinstance(item, Delta):
            item = self._gated(item)
            self.text.append(item.text)
        return item

    async def next_verified(self) -> Delta:
        while not isinstance(item := await self.next(), Delta):
            pass
        return item

    def _gated(self, delta: Delta) -> Delta:
        gate = self.gate
        if gate is None:
            return delta
        released = gate.feed(delta.text)
        if delta.finish_reason is not None and gate.violation is None:
            released += gate.finish()
        findings = self.underway.findings
        for flag in gate.flags[sum(f.action == "flag" for f in findings):]:
            findings.append(flag)
            self.metrics.policy_finding(flag.rule, flag.action).inc()
        violation = gate.violation
        if violation is None:
            return replace(delta, text=released)
        findings.append(violation)
        self.metrics.policy_finding(violation.rule, violation.action).inc()
        self.job.cancel("content_filter")  # the engine drops it at its next pass
        return replace(delta, text=released, finish_reason="content_filter", stats=delta.stats or _stats_so_far(self.underway))


def _stats_so_far(underway: Underway) -> RequestStats:
    """A stopped request's statistics: the batched core's live figures, or what the handler saw."""
    request = underway.job.request
    if request is not None and getattr(request, "stats", None) is not None:
        return request.stats
    return RequestStats(prompt_tokens=len(underway.prompt_ids), generated_tokens=underway.job.generated)


async def _next_event(job: Job, request: Request | None) -> Delta | Provisional:
    """The job's next event. With `request`, a client that has hung up cancels the job; a verify
    round (None) runs to its end regardless, so that a retry of it finds its answer."""
    while True:
        try:
            item = await asyncio.wait_for(job.events.get(), timeout=1.0)
        except TimeoutError:
            if request is not None and await request.is_disconnected():
                job.cancel()
                raise ClientGone() from None
            continue
        if isinstance(item, Delta | Provisional):
            return item
        if isinstance(item, DeadlineExceeded):
            raise APIError(504, f"{item}; the server's deadline is set by --deadline-s", code="deadline_exceeded")
        if isinstance(item, Cancelled):
            if job.cancel_outcome == "expired":
                raise APIError(410, "the session expired: it was idle longer than --verify-idle-s", code="session_expired")
            raise retry_later(503, "the request was cancelled because the server is shutting down", 5, code="shutting_down")
        if isinstance(item, UserError):
            raise bad_request(str(item))
        raise errors.internal_error()
