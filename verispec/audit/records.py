"""Finished requests in, redacted audit records out: the one choke point before any sink.

Prompt and output text reach the database only when the operator opts in (`--audit-content`),
and then only through the Redactor (placeholders for PII and secrets, or a keyed hash). Other text
a client chose passes the Redactor too, content opt-in or not: stop sequences and error messages
(which may quote the request). The request ID is the client's `x-request-id` only when the
Redactor finds no secret or e-mail address in it (`Redactor.identifier_findings`; the server makes
its own otherwise, see `server/context.py`). The same Redactor serves logs and traces
(`--log-content`), so there is one definition of what is safe.

Each record gets its own key, `record_id`: request IDs are the client's choice and repeat.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from verispec.audit.outcomes import Outcome
from verispec.audit.redact import Redactor
from verispec.audit.writer import AuditWriter
from verispec.config import AuditSettings, SamplingParams
from verispec.core.drift import Mismatch
from verispec.stats import RequestStats, speculation_stats


@dataclass(frozen=True)
class Identity:
    """Which models produced a record: names and content hashes of their weights."""

    model: str
    model_version: str
    proposer: str
    proposer_version: str


@dataclass
class Finished:
    """What the server knows about a request when it ends."""

    request_id: str
    arrived: datetime  # UTC
    key_id: str | None
    endpoint: str
    outcome: Outcome
    status: int
    params: SamplingParams | None = None
    prompt: str | None = None
    output: str | None = None
    stats: RequestStats | None = None
    finish_reason: str | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    error: str | None = None
    mismatches: tuple[Mismatch, ...] = ()
    identity: Identity | None = None  # the models that served it, when not the server's default
    edge: dict[str, Any] | None = None  # a verify-API session: round trips, bytes
    policy: list[dict[str, Any]] | None = None  # the policy gate's findings: rule, action, position, length
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # the record's own key


class Auditor:
    def __init__(self, settings: AuditSettings, redactor: Redactor, writer: AuditWriter | None, identity: Identity, tokenizer=None):
        self.settings = settings
        self.redactor = redactor
        self.writer = writer
        self.identity = identity
        self.tokenizer = tokenizer

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def content(self, text: str | None) -> str | None:
        """Text as it may be stored: redacted (or hashed), or nothing without the opt-in."""
        return self.redactor.redact(text) if self.settings.audit_content else None

    def record(self, done: Finished) -> dict[str, Any]:
        stats = done.stats
        identity = done.identity or self.identity
        sampling = None
        if done.params is not None:
            sampling = done.params.model_dump(mode="json")
            sampling["seed"] = stats.seed if stats is not None and stats.seed is not None else done.params.seed
            sampling["stop"] = [self.redactor.redact(stop) for stop in done.params.stop]
        speculation = speculation_stats(stats, identity.proposer) if stats else None
        if speculation is not None and done.edge:
            speculation["edge"] = done.edge
        return {
            "record_id": done.record_id,
            "request_id": done.request_id,
            "created_at": done.arrived,
            "key_id": done.key_id,
            "endpoint": done.endpoint,
            "model": identity.model,
            "model_version": identity.model_version,
            "proposer": identity.proposer,
            "proposer_version": identity.proposer_version,
            "sampling": sampling,
            "prompt": self.content(done.prompt),
            "output": self.content(done.output),
            "prompt_tokens": stats.prompt_tokens if stats else None,
            "completion_tokens": stats.generated_tokens if stats else None,
            "speculation": speculation,
            "latency_s": done.latency_s,
            "ttft_s": done.ttft_s,
            "outcome": done.outcome,
            "finish_reason": done.finish_reason,
            "status": done.status,
            "error": self.redactor.redact(done.error) if done.error else None,
            "policy": done.policy,  # rule names and positions only: the matched text is never kept
        }

    def samples(self, done: Finished) -> list[dict[str, Any]]:
        rows = []
        for m in done.mismatches:
            rows.append({
                "request_id": done.request_id,
                "record_id": done.record_id,
                "created_at": done.arrived,
                "position": m.position,
                "draft_token": m.draft_token,
                "verifier_token": m.verifier_token,
                "draft_prob": m.draft_prob,
                "verifier_prob": m.verifier_prob,
                "verifier_token_prob": m.verifier_token_prob,
                "draft_text": self._token_text(m.draft_token),
                "verifier_text": self._token_text(m.verifier_token),
            })
        return rows

    def _token_text(self, token: int) -> str | None:
        if not self.settings.audit_content or self.tokenizer is None:
            return None
        return self.redactor.redact(self.tokenizer.decode([token]))


def utc_now() -> datetime:
    return datetime.now(UTC)
