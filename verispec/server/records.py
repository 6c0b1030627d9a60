"""What every request leaves behind, and where it goes: the audit trail (its writer, the redactor
its records pass through, the identities of the models they name), the traces (`Telemetry`), and
the background tasks that queue records while the handler answers. A request's conclusion is
built in `underway.py`; this is what it is written with."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

from verispec.audit.outcomes import Outcome
from verispec.audit.records import Auditor, Finished, Identity
from verispec.audit.redact import Redactor
from verispec.audit.store import AuditStore
from verispec.audit.writer import AuditWriter
from verispec.config import AuditSettings, Settings, TelemetrySettings
from verispec.core.rounds import Delta
from verispec.server.errors import APIError, retry_later
from verispec.server.metrics import ServerMetrics
from verispec.server.startup import ColdStart
from verispec.server.telemetry import Telemetry
from verispec.server.underway import Underway, conclude
from verispec.server.worker import CpuWorker

if TYPE_CHECKING:
    from verispec.server.service import Service

log = logging.getLogger("verispec.server")


class Records:
    """The audit trail, the traces and the log lines of the app's requests (`conclude`)."""

    def __init__(
        self,
        settings: Settings,
        model_name: str,
        metrics: ServerMetrics,
        worker: CpuWorker,
        cold_start: ColdStart,
    ):
        self.model_name, self.metrics, self.worker, self.cold_start = model_name, metrics, worker, cold_start
        self.audit = settings.part(AuditSettings)
        self.telemetry_settings = settings.part(TelemetrySettings)
        hash_key = (
            self.audit.audit_hash_key.get_secret_value().encode() if self.audit.audit_hash_key else None
        )
        self.redactor = Redactor(
            mode=self.audit.audit_redaction, extra_patterns=self.audit.redact_patterns, hash_key=hash_key
        )
        self.writer: AuditWriter | None = None
        if self.audit.audit_url.lower() != "none":
            store = AuditStore(self.audit.audit_url)  # fails fast on a bad URL or an unreachable database
            self.writer = AuditWriter(
                store,
                self.audit.audit_queue,
                self.audit.audit_retention_days,
                on_error=metrics.audit_failures.inc,
                on_quarantine=metrics.audit_quarantined.inc,
                stall_s=self.audit.audit_ack_timeout_s,
            )
            log.info("audit trail: %s", store.url)
        # Until the models are loaded their versions are unknown; records of refused requests still go in.
        self.auditor = Auditor(
            self.audit, self.redactor, self.writer, Identity(model_name, "loading", "loading", "loading")
        )
        self.identities: dict[str, Identity] = {}  # per proposer name, once the models are loaded
        self.telemetry = Telemetry(self.telemetry_settings, model_name)
        self._background: set[asyncio.Task] = set()

    def start(self) -> None:
        """At start-up, on the event loop: the audit writer's thread."""
        if self.writer is not None:
            self.writer.start()

    def loaded(self, service: Service) -> None:
        """The models are loaded: records name them (their versions, the tokenizer for samples)."""
        self.auditor = Auditor(self.audit, self.redactor, self.writer, service.identity, service.tokenizer)
        self.identities = service.identities

    async def close(self) -> None:
        """At shutdown, once the engine is drained: background records, the audit writer, the traces."""
        if self._background:
            await asyncio.wait(self._background, timeout=5.0)
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        self.telemetry.shutdown()

    def identity(self, proposer: str | None) -> Identity | None:
        """The models behind a request routed to `proposer` (the server's default ones if unknown)."""
        known = self.identities.get(proposer)
        return known or (self.auditor.identity if self.auditor else None)

    async def conclude(
        self,
        underway: Underway,
        outcome: Outcome,
        status: int,
        delta: Delta | None = None,
        text: str = "",
        error: str | None = None,
        wait: bool = False,
    ) -> bool:
        """A request's span, log line and audit record (`underway.conclude`); the first request
        served sets the cold-start figure."""
        if status == 200:
            self.cold_start.served()
        return await conclude(self, underway, outcome, status, delta, text, error, wait)

    def spawn(self, coroutine) -> asyncio.Task:
        """A background task the event loop keeps a reference to until it is done."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def audit_record(self, done: Finished, wait: bool) -> bool:
        """Queue a request's record; with `wait`, return only once it is committed (the client's
        acknowledgement waits for it; its tokens never did). False when it was not committed within
        --audit-ack-timeout-s: the caller must not acknowledge. Never waits longer than that."""
        auditor = self.auditor
        if auditor is None or not auditor.enabled:
            return True
        timeout = self.audit.audit_ack_timeout_s
        give_up = time.monotonic() + timeout
        # Queueing runs as its own task: a client hanging up cancels this wait, never the record.
        future = await asyncio.shield(self.spawn(self._queue_record(auditor, done, give_up)))
        if future is None:
            return False
        if not wait:
            return True
        try:
            # shield: a client hanging up cancels this wait, never the writer's future.
            await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), timeout=max(0.0, give_up - time.monotonic())
            )
        except TimeoutError:
            log.error(
                "audit record of %s not committed within %.0fs; not acknowledged", done.request_id, timeout
            )
            self.metrics.audit_failures.inc()
            return False
        except Exception as exc:
            log.error("audit record of %s not committed: %s; not acknowledged", done.request_id, exc)
            self.metrics.audit_failures.inc()
            return False
        return True

    async def _queue_record(self, auditor: Auditor, done: Finished, give_up: float) -> Future | None:
        """Build the record (redaction is CPU work: off the event loop, once) and queue it; None when
        the queue stayed full until `give_up`."""
        record, samples = await self.worker.run(lambda: (auditor.record(done), auditor.samples(done)))
        while (
            future := auditor.writer.submit(record, samples)
        ) is None:  # queue full: back-pressure on the ack only
            if time.monotonic() > give_up:
                log.error(
                    "audit queue full for %.0fs; record of %s dropped",
                    self.audit.audit_ack_timeout_s,
                    done.request_id,
                )
                self.metrics.audit_failures.inc()
                return None
            await asyncio.sleep(0.01)
        self.metrics.audit_records.inc()
        return future

    def audit_problem(self) -> str | None:
        """Why audit records are not being committed now, or None."""
        return self.writer.health() if self.writer is not None else None

    def unacknowledged(self) -> APIError:
        """The answer in place of an acknowledgement whose record did not commit in time."""
        return audit_unavailable(self.audit_problem() or "the record was not committed in time")

    def observe(self) -> None:
        """The audit writer's gauges, read at scrape time: a stuck writer cannot report itself."""
        if self.writer is not None:
            self.metrics.audit_healthy.set(0 if self.audit_problem() else 1)
            self.metrics.audit_queue.set(self.writer.queued)


def audit_unavailable(problem: str) -> APIError:
    return retry_later(
        503,
        f"the audit trail is unavailable, so this server does not answer: {problem}; retry shortly",
        5,
        code="audit_unavailable",
    )
