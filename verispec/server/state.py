"""The app's state, one per app (no module globals): the settings, the keys and limits, the
metrics, the audit trail's writer, the policy, the verify sessions, and, once the models are
loaded, the `Service`. Its methods are the checks every generation makes before it is queued
(`ready`, `check_model`, `prompt`, `admit`, `allow_provisional`) and the recording of its end
(`conclude`, `audit_record`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from verispec.assemble import resolve_models
from verispec.audit.outcomes import Outcome
from verispec.audit.records import Auditor, Finished, Identity
from verispec.audit.redact import Redactor
from verispec.audit.store import AuditStore
from verispec.audit.writer import AuditWriter
from verispec.config import (
    AuditSettings,
    ModelSettings,
    SamplingParams,
    ServerSettings,
    Settings,
    TelemetrySettings,
)
from verispec.core.rounds import Delta
from verispec.errors import UserError
from verispec.models.loading import model_name
from verispec.policy import PolicySet, load_policy
from verispec.server.auth import KeyRing
from verispec.server.breaker import CircuitBreaker
from verispec.server.errors import APIError, bad_request, retry_later
from verispec.server.job import Overloaded
from verispec.server.metrics import ServerMetrics
from verispec.server.protocol import token_budget
from verispec.server.service import Cluster, EngineFactory, Service
from verispec.server.sessions import Sessions
from verispec.server.shared_limits import limiter_from_settings
from verispec.server.startup import process_started
from verispec.server.telemetry import Telemetry
from verispec.server.underway import Underway, conclude

log = logging.getLogger("verispec.server")

API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/verify")


class State:
    """The app's state, one per app (no module globals)."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory, cluster: Cluster | None = None):
        self.settings = settings
        self.cluster = cluster
        self.server = settings.part(ServerSettings)
        self.engine_factory = engine_factory
        self.model_name = self.server.served_model_name or model_name(resolve_models(settings.part(ModelSettings)).target)
        self.keys = KeyRing.from_settings(self.server)
        self.limiter = limiter_from_settings(self.server, on_error=lambda: self.metrics.rate_limit_errors.inc())
        max_depth = settings.max_depth if settings.depth == "auto" else max(1, int(settings.depth))
        self.metrics = ServerMetrics(self.model_name, self.server, max_depth)
        self.breaker = CircuitBreaker(
            self.server.breaker_min_acceptance,
            self.server.breaker_window,
            self.server.breaker_max_failures,
            self.server.breaker_cooldown_s,
            on_change=lambda state, why: self.metrics.observe_breaker(state),
        )
        self.audit = settings.part(AuditSettings)
        self.telemetry_settings = settings.part(TelemetrySettings)
        hash_key = self.audit.audit_hash_key.get_secret_value().encode() if self.audit.audit_hash_key else None
        self.redactor = Redactor(mode=self.audit.audit_redaction, extra_patterns=self.audit.redact_patterns, hash_key=hash_key)
        self.writer: AuditWriter | None = None
        if self.audit.audit_url.lower() != "none":
            store = AuditStore(self.audit.audit_url)  # fails fast on a bad URL or an unreachable database
            self.writer = AuditWriter(
                store, self.audit.audit_queue, self.audit.audit_retention_days, on_error=self.metrics.audit_failures.inc,
                on_quarantine=self.metrics.audit_quarantined.inc, stall_s=self.audit.audit_ack_timeout_s,
            )
            log.info("audit trail: %s", store.url)
        # Until the models are loaded their versions are unknown; records of refused requests still go in.
        self.auditor = Auditor(self.audit, self.redactor, self.writer, Identity(self.model_name, "loading", "loading", "loading"))
        self.telemetry = Telemetry(self.telemetry_settings, self.model_name)
        self.policy: PolicySet | None = load_policy(self.server.policy) if self.server.policy else None
        if self.policy is not None:
            log.info("policy gate: %d rules from %s, holding back %d characters", len(self.policy.names), self.server.policy, self.policy.hold_back)
            for rule in self.policy.rules:  # every series from zero, so that the alert sees the first finding
                self.metrics.policy_finding(rule.name, rule.action)
        self.sessions = Sessions(self.server.verify_idle_s, self.server.verify_max_sessions)
        self.started = process_started()
        self.metrics.process_start.set(self.started)
        self._background: set[asyncio.Task] = set()
        # Tokenising a long prompt takes a while: never on the event loop, which must keep streaming.
        self._cpu = ThreadPoolExecutor(1, thread_name_prefix="verispec-tokenize")
        self.metrics.precreate(tuple(path for path in API_PATHS if path != "/v1/models"))
        self.metrics.cost_rate("verifier").set(self.telemetry_settings.cost_verifier_per_hour)
        self.metrics.cost_rate("proposer").set(self.telemetry_settings.cost_proposer_per_hour)
        self.service: Service | None = None
        self.load_error: str | None = None
        self.draining = False
        self._served_one = False
        self.on_fatal: Callable[[], None] = lambda: None  # set by `serve` to stop the server

    def load(self) -> None:
        """Load the service (in a background thread, or before a replica is routed to)."""
        try:
            service = Service.load(self.settings, self.engine_factory, self.model_name, self.metrics, self.breaker, self.cluster)
        except Exception as exc:
            self.load_error = str(exc) if isinstance(exc, UserError) else f"loading the models failed: {exc!r}"
            log.error("%s", self.load_error)
            self.on_fatal()
            return
        self.auditor = Auditor(self.audit, self.redactor, self.writer, service.identity, service.tokenizer)
        self.service = service
        self.metrics.ready.set(1)
        self.metrics.startup_ready.set(time.time() - self.started)

    async def close(self) -> None:
        """At shutdown, once the engine is drained: background records, the audit writer, the workers."""
        if self._background:
            await asyncio.wait(self._background, timeout=5.0)
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        self._cpu.shutdown(wait=False, cancel_futures=True)
        self.telemetry.shutdown()

    def identity(self, proposer: str | None) -> Identity | None:
        """The models behind a request routed to `proposer` (the server's default ones if unknown)."""
        known = self.service.identities.get(proposer) if self.service is not None else None
        return known or (self.auditor.identity if self.auditor else None)

    async def submit(self, service: Service, underway: Underway) -> None:
        """Queue the request's job; a full queue refuses it (503 with Retry-After), concluded here."""
        try:
            service.scheduler.submit(underway.job)
        except Overloaded as exc:
            self.metrics.outcome("rejected").inc()  # the scheduler counts every other outcome
            await self.conclude(underway, "rejected", 503, error=str(exc))
            raise retry_later(503, str(exc), exc.retry_after_s, code="overloaded") from None

    async def conclude(self, underway: Underway, outcome: Outcome, status: int, delta: Delta | None = None, text: str = "",
                       error: str | None = None, wait: bool = False) -> bool:
        """A request's span, log line and audit record (`underway.conclude`); the first request
        served sets the cold-start figure."""
        if status == 200 and not self._served_one:
            self._served_one = True
            self.metrics.startup_first_request.set(time.time() - self.started)
        return await conclude(self, underway, outcome, status, delta, text, error, wait)

    def spawn(self, coroutine) -> asyncio.Task:
        """A background task the event loop keeps a reference to until it is done."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def off_loop(self, fn: Callable, *args, **kwargs):
        """Run CPU work (tokenising) in the server's worker thread, not on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, functools.partial(fn, *args, **kwargs))

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
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout=max(0.0, give_up - time.monotonic()))
        except TimeoutError:
            log.error("audit record of %s not committed within %.0fs; not acknowledged", done.request_id, timeout)
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
        record, samples = await self.off_loop(lambda: (auditor.record(done), auditor.samples(done)))
        while (future := auditor.writer.submit(record, samples)) is None:  # queue full: back-pressure on the ack only
            if time.monotonic() > give_up:
                log.error("audit queue full for %.0fs; record of %s dropped", self.audit.audit_ack_timeout_s, done.request_id)
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

    def check_model(self, body) -> None:
        if body.model != self.model_name:
            raise bad_request(f"unknown model '{body.model}'; this server serves '{self.model_name}'", param="model", code="model_not_found")

    async def tokenize(self, tokenizer: PreTrainedTokenizerBase, text: str, **kwargs) -> list[int]:
        try:
            return (await self.off_loop(tokenizer, text, **kwargs)).input_ids
        except Exception as exc:  # whatever the text holds, the client gets a 400, never a 500
            log.warning("tokenizer refused a prompt: %r", exc)
            raise bad_request("the prompt could not be tokenized; send valid UTF-8 text", param="prompt") from None

    async def prompt(self, service: Service, prompt: str | list[int]) -> tuple[list[int], str]:
        """A prompt as text or token ids -> (token ids, text): tokenized, or checked and decoded."""
        if isinstance(prompt, str):
            return await self.tokenize(service.tokenizer, prompt), prompt
        vocab = service.engine.target.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise bad_request(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return list(prompt), await self.off_loop(service.tokenizer.decode, list(prompt))

    async def admit(self, request: Request, service: Service, body, prompt_ids: list[int], max_tokens: int | None, key_id: str) -> SamplingParams:
        """What every generation checks before it is queued: the token budget in the model's
        window, the sampling settings, and the key's rate limits (which it takes from)."""
        max_new = token_budget(service.engine.target.max_positions, len(prompt_ids), max_tokens, self.settings.max_new_tokens)
        try:
            params = body.sampling(max_new)
        except ValueError as exc:
            raise bad_request(f"invalid sampling settings: {exc}") from None
        await self.charge(request, key_id, len(prompt_ids) + max_new)
        return params

    async def charge(self, request: Request, key_id: str, tokens: int) -> None:
        """Take one request and `tokens` tokens from the key's rate limits, or answer 429."""
        if not self.limiter.enabled:
            return
        limits = await self.limiter.acheck(key_id, tokens)
        request.state.extra_headers = limits.headers
        if not limits.allowed:
            raise retry_later(429, limits.reason, limits.retry_after_s, code="rate_limit_exceeded", headers=limits.headers)

    def allow_provisional(self, body, service: Service) -> None:
        """Provisional text is unverified drafts, sent as they are made: only when streaming (the
        engine's step hands drafts out before it scores them), and never
        under a policy with a blocking rule (drafts would pass its gate unseen, and the verdict
        would confirm them, even where the rule holds nothing back)."""
        if not body.stream:
            raise bad_request("provisional text is streamed: set stream to true", param="provisional")
        if self.policy is not None and self.policy.blocks:
            raise bad_request(
                "provisional text is refused under this server's policy: it has blocking rules, and drafts would reach "
                "you before its gate has seen them; stream without provisional",
                param="provisional", code="policy_forbids_provisional",
            )

    def ready(self) -> Service:
        if self.draining:
            raise retry_later(503, "the server is shutting down; retry on another replica", 5, code="shutting_down")
        if self.service is None:
            raise retry_later(503, "the server is loading its models; retry shortly", 5, code="not_ready")
        if problem := self.audit_problem():
            raise audit_unavailable(problem)
        return self.service


def audit_unavailable(problem: str) -> APIError:
    return retry_later(
        503, f"the audit trail is unavailable, so this server does not answer: {problem}; retry shortly", 5,
        code="audit_unavailable",
    )
