"""The engine side of the app: the `Service` once its models are loaded (in a background thread,
or before a replica is routed to), the circuit breaker its rounds speculate under, readiness and
draining, and the queue a request's job goes to."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from verispec.config import ServerSettings, Settings
from verispec.errors import UserError
from verispec.server.breaker import CircuitBreaker
from verispec.server.errors import retry_later
from verispec.server.job import Overloaded
from verispec.server.metrics import ServerMetrics
from verispec.server.records import Records, audit_unavailable
from verispec.server.service import Cluster, EngineFactory, Service
from verispec.server.startup import ColdStart
from verispec.server.underway import Underway

log = logging.getLogger("verispec.server")


class Serving:
    """The loaded service and its life: loading, readiness, submission, draining."""

    def __init__(
        self,
        settings: Settings,
        engine_factory: EngineFactory,
        cluster: Cluster | None,
        model_name: str,
        metrics: ServerMetrics,
        records: Records,
        cold_start: ColdStart,
    ):
        self.settings, self.server = settings, settings.part(ServerSettings)
        self.engine_factory, self.cluster, self.model_name = engine_factory, cluster, model_name
        self.metrics, self.records, self.cold_start = metrics, records, cold_start
        self.breaker = CircuitBreaker(
            self.server.breaker_min_acceptance,
            self.server.breaker_window,
            self.server.breaker_max_failures,
            self.server.breaker_cooldown_s,
            on_change=lambda state, why: metrics.observe_breaker(state),
        )
        self.service: Service | None = None
        self.load_error: str | None = None
        self.draining = False
        self.on_fatal: Callable[[], None] = lambda: None  # set by `serve` to stop the server

    def load(self) -> None:
        """Load the service (in a background thread, or before a replica is routed to)."""
        try:
            service = Service.load(
                self.settings, self.engine_factory, self.model_name, self.metrics, self.breaker, self.cluster
            )
        except Exception as exc:
            self.load_error = (
                str(exc) if isinstance(exc, UserError) else f"loading the models failed: {exc!r}"
            )
            log.error("%s", self.load_error)
            self.on_fatal()
            return
        self.records.loaded(service)
        self.service = service
        self.metrics.ready.set(1)
        self.cold_start.ready()

    def ready(self) -> Service:
        """The service, or the 503 that says why there is none to answer now."""
        if self.draining:
            raise retry_later(
                503, "the server is shutting down; retry on another replica", 5, code="shutting_down"
            )
        if self.service is None:
            raise retry_later(503, "the server is loading its models; retry shortly", 5, code="not_ready")
        if problem := self.records.audit_problem():
            raise audit_unavailable(problem)
        return self.service

    def deadline(self) -> float | None:
        """A new request's deadline (time.monotonic()), from --deadline-s; None without one."""
        return time.monotonic() + self.server.deadline_s if self.server.deadline_s else None

    async def submit(self, service: Service, underway: Underway) -> None:
        """Queue the request's job; a full queue refuses it (503 with Retry-After), concluded here."""
        try:
            service.scheduler.submit(underway.job)
        except Overloaded as exc:
            self.metrics.outcome("rejected").inc()  # the scheduler counts every other outcome
            await self.records.conclude(underway, "rejected", 503, error=str(exc))
            raise retry_later(503, str(exc), exc.retry_after_s, code="overloaded") from None

    def stop_admitting(self) -> None:
        """Shutdown begins: new requests get 503, and /readyz says so."""
        self.draining = True
        self.metrics.ready.set(0)
