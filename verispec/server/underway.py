"""A request from admission to its end, and its conclusion: the span, the log line and the audit
record every request leaves behind, built in one place for the completions, the chat and the
verify API (a session is one request however many rounds it takes), and for the requests refused
before they were queued (`conclude_refused`)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from verispec.audit.outcomes import Outcome
from verispec.audit.records import Finished
from verispec.config import SamplingParams
from verispec.core.rounds import Delta
from verispec.server.job import Job
from verispec.stats import RequestStats

if TYPE_CHECKING:
    from verispec.policy import Violation
    from verispec.server.records import Records

log = logging.getLogger("verispec.server")


@dataclass
class Underway:
    request_id: str
    key_id: str
    endpoint: str
    operation: str  # chat, text_completion, verify
    job: Job
    prompt_ids: list[int]
    prompt_text: str
    params: SamplingParams
    span: Any
    arrived: datetime  # UTC, for the record
    edge: dict[str, Any] | None = None  # a verify session's round trips and bytes
    findings: list[Violation] = field(default_factory=list)  # the policy gate's, block and flag
    sent_tokens: Callable[[], int] | None = None  # tokens the client was sent so far (its Reply's count)


def stats_so_far(underway: Underway) -> RequestStats:
    """A request's statistics when it ends without a last delta (closed, expired, cancelled, stopped
    by the gate): the engine's live figures, or what the handler saw."""
    job = underway.job
    if job.stats is not None:
        return job.stats
    request = job.request
    if request is not None and getattr(request, "stats", None) is not None:
        return copy.deepcopy(request.stats)  # the engine thread may still be finishing its round
    return RequestStats(prompt_tokens=len(underway.prompt_ids), generated_tokens=job.generated)


async def conclude(
    records: Records, underway: Underway, outcome: Outcome, status: int, delta: Delta | None = None, text: str = "",
    error: str | None = None, wait: bool = False,
) -> bool:
    """Metrics aside (the scheduler counts), everything a finished request leaves behind: its span,
    its log line and its audit record. `text` is what the client received, never more. With
    `wait`: whether the record is committed, that is, whether the response may be acknowledged."""
    job = underway.job
    stats = (delta.stats if delta is not None else None) or stats_so_far(underway)
    if underway.sent_tokens is not None and stats.generated_tokens != (sent := underway.sent_tokens()):
        stats = replace(stats, generated_tokens=sent)  # the record counts what the client was sent
    if outcome == "ok" and stats.fallback_rounds:
        outcome = "fallback"
    finish_reason = delta.finish_reason if delta is not None else None
    blocked = next((f for f in underway.findings if f.action == "block"), None)
    if blocked is not None:
        finish_reason = "content_filter"
    latency = time.monotonic() - job.arrived
    ttft = None if job.first_token is None else job.first_token - job.arrived
    tpot = None
    if job.first_token is not None and job.last_token is not None and job.generated > 1:
        tpot = (job.last_token - job.first_token) / (job.generated - 1)
    identity = records.identity(job.proposer)
    attributes = {
        "gen_ai.response.model": records.model_name,
        "gen_ai.response.finish_reasons": [finish_reason] if finish_reason else None,
        "gen_ai.usage.input_tokens": len(underway.prompt_ids),
        "gen_ai.usage.output_tokens": stats.generated_tokens,
        "verispec.outcome": outcome,
        "verispec.proposer.name": identity.proposer if identity else None,
        "verispec.proposer.version": identity.proposer_version if identity else None,
        "verispec.model.version": identity.model_version if identity else None,
    }
    attributes.update({
        "verispec.proposed": stats.proposed, "verispec.accepted": stats.accepted, "verispec.rejected": stats.rejected,
        "verispec.recovered": stats.recovered, "verispec.bonus": stats.bonus, "verispec.verifier_calls": stats.verifier_calls,
        "verispec.acceptance_rate": stats.acceptance_rate, "verispec.mean_depth": (sum(stats.depths) / len(stats.depths)) if stats.depths else None,
        "verispec.fallback_rounds": stats.fallback_rounds, "verispec.mismatch_s": stats.mismatch_s,
    })
    if underway.edge:
        attributes.update({f"verispec.edge.{name}": value for name, value in underway.edge.items()})
    if underway.findings:
        attributes["verispec.policy.rules"] = [f.rule for f in underway.findings]
        attributes["verispec.policy.actions"] = [f.action for f in underway.findings]
    if records.telemetry_settings.log_content:  # redaction is CPU work: off the event loop
        redacted = await records.worker.run(lambda: (records.redactor.redact(underway.prompt_text), records.redactor.redact(text)))
        attributes["verispec.prompt"], attributes["verispec.output"] = redacted
    records.telemetry.end_request(
        underway.span, job.rounds, attributes, error, underway.operation, latency,
        ttft if outcome in ("ok", "fallback") else None, tpot,
    )
    fields = {"key_id": underway.key_id, "outcome": outcome, "status": status, "prompt_tokens": len(underway.prompt_ids),
              "completion_tokens": stats.generated_tokens, "latency_s": round(latency, 4),
              "ttft_s": None if ttft is None else round(ttft, 4),
              "acceptance_rate": stats.acceptance_rate}
    if blocked is not None:
        fields.update(policy_rule=blocked.rule, policy_position=blocked.position)
    if records.telemetry_settings.log_content:
        fields.update(prompt=redacted[0], output=redacted[1])
    log.info("%s %s", underway.operation, outcome, extra=fields)
    # A blocked response's drift samples are dropped: their token ids could spell what the gate held back.
    mismatches = () if blocked is not None else tuple(job.mismatches)
    done = Finished(
        request_id=underway.request_id, arrived=underway.arrived, key_id=underway.key_id, endpoint=underway.endpoint,
        outcome=outcome, status=status, params=underway.params, prompt=underway.prompt_text, output=text, stats=stats,
        finish_reason=finish_reason, latency_s=latency, ttft_s=ttft, error=error, mismatches=mismatches,
        identity=identity, edge=underway.edge, policy=[_finding(f) for f in underway.findings] or None,
    )
    return await _record(records, done, wait)


def conclude_refused(
    records: Records, request_id: str, arrived: datetime, endpoint: str, key_id: str | None, status: int, latency_s: float,
    error: str | None,
) -> None:
    """The record of a request refused before it was queued (bad input, key, rate limit, not ready):
    metadata only. Its log line and count are the access log's (`context.RequestContext`)."""
    done = Finished(
        request_id=request_id, arrived=arrived, key_id=key_id, endpoint=endpoint, outcome="rejected", status=status,
        latency_s=latency_s, error=error,
    )
    records.spawn(records.audit_record(done, wait=False))


async def _record(records: Records, done: Finished, wait: bool) -> bool:
    """Queue the record; with `wait`, whether it is committed (the acknowledgement waits for that)."""
    if wait:
        return await records.audit_record(done, wait=True)
    records.spawn(records.audit_record(done, wait=False))
    return True


def _finding(violation: Violation) -> dict[str, Any]:
    """A finding as the audit trail keeps it: the rule and where, never the matched text."""
    return {"rule": violation.rule, "action": violation.action, "position": violation.position, "length": violation.length}
