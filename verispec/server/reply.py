"""What a request's client may see, in order: verified text the policy gate has released, and,
for a client that asked for it, provisional drafts before their verdict.

`Reply.next()` is the handler's one read of a job's events. The policy gate sees verified text
only, never drafts; text reaches the client only once the gate has passed it, so a blocked match
is never sent, logged or audited (the handlers keep and conclude with released text only). On a
blocking finding the reply ends with `finish_reason: "content_filter"` and the job is stopped;
its statistics then count only the tokens whose text was sent (`sent_tokens`), in the usage the
client reads and in the record alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from verispec.core.rounds import Delta, TokenLogprob
from verispec.errors import UserError
from verispec.policy import PolicyGate
from verispec.server import errors
from verispec.server.errors import APIError, bad_request, retry_later
from verispec.server.job import Cancelled, DeadlineExceeded, Job, Provisional
from verispec.server.metrics import ServerMetrics
from verispec.server.underway import Underway, stats_so_far


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


class Reply:
    def __init__(self, underway: Underway, request: Request | None, gate: PolicyGate | None, metrics: ServerMetrics,
                 tokenizer: PreTrainedTokenizerBase):
        self.underway, self.job, self.request = underway, underway.job, request
        self.gate, self.metrics, self.tokenizer = gate, metrics, tokenizer
        self.text: list[str] = []  # released text: all the client has been sent, and all that is recorded
        self.token_ids: list[int] = []  # every verified token the job emitted, released or not
        self.emitted = 0  # characters of verified text the job emitted, before the gate
        self.logprobs: list[TokenLogprob] = []  # of every token emitted, where the request asked for them
        self.logprobs_sent = 0  # how many of them the client was sent
        self.prompt_logprobs: list[TokenLogprob] | None = None  # positions 1.. of the prompt, where asked for (echo)
        underway.sent_tokens = self.sent_tokens

    @property
    def released(self) -> str:
        return "".join(self.text)

    async def next(self) -> Delta | Provisional:
        """The next thing for the client; errors become API errors. Checks for a departed client
        each second."""
        item = await _next_event(self.job, self.request)
        if isinstance(item, Delta):
            if item.prompt_logprobs is not None:
                self.prompt_logprobs = item.prompt_logprobs
            self.token_ids += item.token_ids
            self.emitted += len(item.text)
            item = self._gated(item)
            self.text.append(item.text)
            if item.finish_reason == "content_filter":
                item = replace(item, stats=replace(item.stats, generated_tokens=self.sent_tokens()))
            if item.logprobs is not None:
                item = replace(item, logprobs=self._released_logprobs(item.logprobs))
        return item

    def _released_logprobs(self, new: list[TokenLogprob]) -> list[TokenLogprob]:
        """The logprobs of the tokens whose text the client now holds: a token the gate keeps back
        keeps its log-probability back too (it can tell what the text was)."""
        self.logprobs += new
        sent = self.logprobs_sent
        self.logprobs_sent = max(sent, self.sent_tokens())
        return self.logprobs[sent : self.logprobs_sent]

    @property
    def released_logprobs(self) -> list[TokenLogprob]:
        return self.logprobs[: self.logprobs_sent]

    def sent_tokens(self) -> int:
        """Tokens the client was sent: every one emitted, unless the gate kept text back or stopped
        the reply, then the most whose text lies whole within the released text."""
        released = len(self.released)
        if released >= self.emitted:
            return len(self.token_ids)
        decode = self.tokenizer.decode
        low, high = 0, len(self.token_ids)
        while low < high:  # the text of a prefix of the tokens only grows with it
            mid = (low + high + 1) // 2
            if len(decode(self.token_ids[:mid], skip_special_tokens=True)) <= released:
                low = mid
            else:
                high = mid - 1
        return low

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
        return replace(delta, text=released, finish_reason="content_filter", stats=delta.stats or stats_so_far(self.underway))


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
