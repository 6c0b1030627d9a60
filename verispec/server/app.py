"""`create_app(settings)`: the FastAPI app. Routes translate between the OpenAI schema and the
engine; admission, scheduling and speculation policy live in `scheduler.py` and `breaker.py`.

The app starts listening at once and loads the models in a background thread: `/healthz`
answers from the first moment, `/readyz` and the API answer 503 (with Retry-After) until the
models are loaded, the step costs measured and one warm-up request run.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import MutableHeaders
from transformers import PreTrainedTokenizerBase

from verispec.assemble import build_batch_core, build_engine, proposer_engines, resolve_models
from verispec.audit.records import Auditor, Finished, Identity, utc_now
from verispec.audit.redact import Redactor
from verispec.audit.store import AuditStore
from verispec.audit.writer import AuditWriter
from verispec.config import (
    AuditSettings,
    BatchSettings,
    ModelSettings,
    RoutingSettings,
    SamplingParams,
    ServerSettings,
    Settings,
    TelemetrySettings,
)
from verispec.core.batch import BatchEngine
from verispec.core.engine import Delta, SpeculativeEngine
from verispec.errors import UserError
from verispec.models.loading import model_name, weights_digest
from verispec.policy import PolicySet, load_policy
from verispec.server import errors
from verispec.server.auth import KeyRing
from verispec.server.breaker import CircuitBreaker
from verispec.server.errors import APIError, bad_request, retry_later
from verispec.server.limits import BoundedBody
from verispec.server.logs import request_id_var
from verispec.server.metrics import ServerMetrics
from verispec.server.openapi import CHAT_RESPONSES, COMPLETION_RESPONSES, MODELS_RESPONSES, READY_RESPONSES
from verispec.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Shape,
    token_budget,
)
from verispec.server.reply import ClientGone, Provisional, Reply
from verispec.server.routing import Canary, Decision, ProposerBandit, Router
from verispec.server.scheduler import CostModel, Job, Overloaded, Scheduler
from verispec.server.shared_limits import limiter_from_settings
from verispec.server.startup import process_started
from verispec.server.telemetry import Telemetry
from verispec.server.underway import Underway, conclude
from verispec.server.verify import Sessions, verify_routes
from verispec.stats import speculation_stats
from verispec.text import chat_text

log = logging.getLogger("verispec.server")

EngineFactory = Callable[[Settings], SpeculativeEngine]


@dataclass(frozen=True)
class Cluster:
    """What a replica of a Ray Serve deployment shares with the others (`verispec/scale/`); a
    single-process server has none. The app loads its models before it starts (the replica is
    routed to only once it is warm), its /metrics carries every replica's series with a `replica`
    label, and its canary's verdict is the deployment's."""

    replica: str
    metrics: Callable[[bytes], bytes]  # this replica's exposition -> every replica's, labelled
    canary: Callable[..., Canary]  # builds the deployment-wide canary (Canary's arguments)
API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/verify")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class Service:
    """What the API needs once the models are loaded."""

    engine: SpeculativeEngine
    scheduler: Scheduler

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer


def _path(lm) -> dict | None:
    """The model's kernel-step report, where its backend has one (the lean backend)."""
    report = getattr(lm, "path_report", None)
    return report() if report is not None else None


class State:
    """The app's state, one per app (no module globals)."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory, cluster: Cluster | None = None):
        self.settings = settings
        self.cluster = cluster
        self.server = settings.part(ServerSettings)
        self.engine_factory = engine_factory
        models = resolve_models(settings.part(ModelSettings))
        self.model_name = self.server.served_model_name or model_name(models.target)
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
        self.sessions = Sessions(self.server.verify_idle_s)
        self.started = process_started()
        self.metrics.process_start.set(self.started)
        self._background: set[asyncio.Task] = set()
        # Tokenising a long prompt takes a while: never on the event loop, which must keep streaming.
        self._cpu = ThreadPoolExecutor(1, thread_name_prefix="verispec-tokenize")
        self.metrics.precreate(tuple(path for path in API_PATHS if path != "/v1/models"))
        self.metrics.cost_rate("verifier").set(self.telemetry_settings.cost_verifier_per_hour)
        self.metrics.cost_rate("proposer").set(self.telemetry_settings.cost_proposer_per_hour)
        self.router: Router | None = None
        self.identities: dict[str, Identity] = {}
        self.service: Service | None = None
        self.paths: dict[str, dict | None] = {}  # per model role: its kernel-step report (LeanModel.path_report)
        self.load_error: str | None = None
        self.draining = False
        self._served_one = False
        self.on_fatal: Callable[[], None] = lambda: None  # set by `serve` to stop the server

    def load(self) -> None:
        """Load, calibrate and warm up; runs in a background thread."""
        try:
            started = time.perf_counter()
            engine = self.engine_factory(self.settings)
            # Step costs, measured now rather than during the first request: depth auto needs them,
            # and the cost model prices the verifier-only counterfactual with the one-token step.
            token_s = engine.costs().verify_s[0] if engine.proposer is not None else None
            warm_prompt = engine.tokenizer("def main():").input_ids or [0]
            engine.generate(warm_prompt, SamplingParams(max_new_tokens=4), depth=0)  # the verifier's kernels; no proposer call
            models = resolve_models(self.settings.part(ModelSettings))
            model_version = weights_digest(models.target)
            identity = self._identity(engine, model_version)
            self.auditor = Auditor(self.audit, self.redactor, self.writer, identity, engine.tokenizer)
            self.router = self._router(engine, models.proposer)
            self.identities = {name: self._identity(e, model_version) for name, e in self.router.engines.items()}
            self.identities["edge"] = Identity(self.model_name, model_version, "edge", "client")  # verify-API sessions
            cost = CostModel(self.telemetry_settings.cost_verifier_per_hour, self.telemetry_settings.cost_proposer_per_hour, token_s)
            scheduler = Scheduler(engine, self.server, self.breaker, self.metrics, cost, self._batch_engine(engine))
            scheduler.on_finished = self._routed
            scheduler.start()
            self.paths = {"target": _path(engine.target)}
            if getattr(engine.proposer, "lm", None) is not None:
                self.paths["draft"] = _path(engine.proposer.lm)
            for role, path in self.paths.items():
                if path is not None:
                    self.metrics.observe_path(role, path)
            self.service = Service(engine, scheduler)
            self.metrics.ready.set(1)
            self.metrics.startup_ready.set(time.time() - self.started)
            log.info(
                "ready: %s loaded and warmed in %.1fs", self.model_name, time.perf_counter() - started,
                extra={"model_version": identity.model_version, "proposer": identity.proposer, "proposer_version": identity.proposer_version},
            )
        except Exception as exc:
            self.load_error = str(exc) if isinstance(exc, UserError) else f"loading the models failed: {exc!r}"
            log.error("%s", self.load_error)
            self.on_fatal()

    def _batch_engine(self, engine: SpeculativeEngine) -> BatchEngine | None:
        proposers = [e.proposer for e in self.router.engines.values() if e.proposer is not None]
        return build_batch_core(engine, self.settings.part(BatchSettings), self.server.max_running, proposers)

    def _router(self, engine: SpeculativeEngine, configured: str) -> Router:
        routing = self.settings.part(RoutingSettings)
        engines = {configured: engine, **proposer_engines(engine, self.settings)}
        for name, e in engines.items():
            if e is not engine and e.proposer is not None and e.speculation.depth == "auto":
                e.costs()
            self.metrics.proposer_requests(name)
        bandit = ProposerBandit(list(routing.proposers)) if len(routing.proposers) > 1 else None
        canary = None
        if routing.canary_draft:
            figures = (routing.canary_fraction, routing.canary_min_requests, routing.canary_alpha, routing.canary_margin)
            if self.cluster is None:
                canary = Canary(*figures, on_decision=self._canary_decided)
            else:  # judged once for the deployment; a verdict reached on another replica is adopted, not counted
                canary = self.cluster.canary(*figures, on_decision=self._canary_decided, on_adopted=self._canary_state)
            self.metrics.canary_state.set(1)
            for verdict in ("promote", "rollback"):
                self.metrics.canary_decisions(verdict)
        default = configured if bandit is None else routing.proposers[0]
        return Router(engines, default, bandit, canary, "canary" if canary else None)

    def _identity(self, engine: SpeculativeEngine, model_version: str) -> Identity:
        """Names and versions of the models behind an engine: weights hashes, or the n-gram settings."""
        proposer = engine.proposer.name if engine.proposer is not None else "none"
        if proposer.startswith("draft:"):
            version = weights_digest(proposer.removeprefix("draft:"))
        elif proposer.startswith("ngram"):
            version = f"ngram:{self.settings.ngram_min}-{self.settings.ngram_max}"
        else:
            version = proposer
        return Identity(self.model_name, model_version, proposer, version)

    def _routed(self, job: Job) -> None:
        """Feedback from a finished request to the per-request choice and the canary (engine thread)."""
        if job.pinned:
            return
        stats = job.stats
        busy = job.engine_s  # the whole cost of its rounds, other requests' rounds not counted
        failures = stats.proposer_failures + stats.proposer_timeouts
        self.router.finished(job.proposer, job.route_key, stats.proposed, stats.accepted, stats.generated_tokens, busy, failures)
        if self.router.bandit is not None:
            for name, mean in self.router.bandit.means().items():
                self.metrics.proposer_throughput(name).set(mean)
        canary = self.router.canary
        if canary is not None:
            for arm, figures in canary.arms.items():
                if figures.acceptance:
                    self.metrics.canary_acceptance(arm).set(sum(figures.acceptance) / len(figures.acceptance))

    async def conclude(self, underway: Underway, outcome: str, status: int, delta: Delta | None = None, text: str = "",
                       error: str | None = None, wait: bool = False) -> bool:
        """A request's span, log line and audit record (`underway.conclude`); the first request
        served sets the cold-start figure."""
        if status == 200 and not self._served_one:
            self._served_one = True
            self.metrics.startup_first_request.set(time.time() - self.started)
        return await conclude(self, underway, outcome, status, delta, text, error, wait)

    def _canary_decided(self, decision: Decision) -> None:
        self.metrics.canary_decisions(decision.verdict).inc()
        self._canary_state(decision)

    def _canary_state(self, decision: Decision) -> None:
        self.metrics.canary_state.set(2 if decision.verdict == "promote" else 3)

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
        limits = await self.limiter.acheck(key_id, len(prompt_ids) + max_new) if self.limiter.enabled else None
        if limits is not None:
            request.state.extra_headers = limits.headers
            if not limits.allowed:
                raise retry_later(429, limits.reason, limits.retry_after_s, code="rate_limit_exceeded", headers=limits.headers)
        return params

    def allow_provisional(self, body, service: Service) -> None:
        """Provisional text is unverified drafts, sent as they are made: only when streaming, only
        from the batched engine (whose step hands drafts out before it scores them), and never
        under a policy that holds text back (drafts would pass its gate unseen)."""
        if not body.stream:
            raise bad_request("provisional text is streamed: set stream to true", param="provisional")
        if service.scheduler.batch is None:
            raise bad_request(
                "provisional text needs the batched engine; this server runs --scheduler interleaved", param="provisional"
            )
        if self.policy is not None and self.policy.needs_hold_back:
            raise bad_request(
                "provisional text is refused under this server's policy: it holds verified text back until its rules "
                "have passed it, and drafts would reach you unchecked; stream without provisional",
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


def create_app(settings: Settings, engine_factory: EngineFactory = build_engine, cluster: Cluster | None = None) -> FastAPI:
    state = State(settings, engine_factory, cluster)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.writer is not None:
            state.writer.start()
        if cluster is None:  # listen at once; /readyz says when the models are in
            threading.Thread(target=state.load, name="verispec-load", daemon=True).start()
        else:  # a replica: Ray routes to it once this returns, so it returns warm
            await asyncio.to_thread(state.load)
            if state.load_error:
                raise RuntimeError(state.load_error)
        sweeper = asyncio.ensure_future(_sweep_sessions(verifying, state.server.verify_idle_s))
        yield
        state.draining = True
        state.metrics.ready.set(0)
        sweeper.cancel()
        await verifying.close_all()
        if state.service is not None:
            # uvicorn has already given open requests the grace period; cancel what is left.
            await asyncio.to_thread(state.service.scheduler.drain, 0.0)
        if state._background:
            await asyncio.wait(state._background, timeout=5.0)
        if state.writer is not None:
            await asyncio.to_thread(state.writer.close)
        state._cpu.shutdown(wait=False, cancel_futures=True)
        state.telemetry.shutdown()

    app = FastAPI(title="verispec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.verispec = state
    errors.install(app)
    app.add_middleware(BoundedBody, max_bytes=state.server.max_body_bytes, timeout_s=state.server.body_timeout_s)
    app.add_middleware(RequestContext, state=state)  # outermost: its request ID and audit cover the limits' refusals

    async def authorize(request: Request) -> str:
        """The caller's API key ID ('anonymous' when the server has no keys)."""
        if not state.keys.enabled:
            request.state.key_id = "anonymous"
            return "anonymous"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        key_id = state.keys.identify(token.strip())
        if key_id is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        request.state.key_id = key_id
        return key_id

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses=READY_RESPONSES)
    async def readyz() -> JSONResponse:
        try:
            state.ready()
        except APIError as exc:
            return JSONResponse({"status": exc.code, "message": exc.message}, status_code=503, headers=exc.headers)
        paths = {role: path for role, path in state.paths.items() if path is not None}
        body = {"status": "ready", "model": state.model_name, "breaker": state.breaker.state.name.lower(), "kernel": paths}
        if cluster is not None:
            body["replica"] = cluster.replica
        return JSONResponse(body)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        if state.service is not None:
            state.metrics.breaker_state.set(int(state.breaker.state))  # the cool-down ends on a clock, not an event
        if state.writer is not None:  # read at scrape time: a stuck writer cannot report itself
            state.metrics.audit_healthy.set(0 if state.audit_problem() else 1)
            state.metrics.audit_queue.set(state.writer.queued)
        text = generate_latest(state.metrics.registry)
        if cluster is not None:
            text = await asyncio.to_thread(cluster.metrics, text)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=MODELS_RESPONSES, response_model=None)
    async def models(key_id: str = Depends(authorize)) -> dict:
        return {
            "object": "list",
            "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "verispec"}],
        }

    @app.post("/v1/completions", responses=COMPLETION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request, key_id: str = Depends(authorize)) -> Response:
        service = state.ready()
        state.check_model(body)
        body.refuse_unsupported()
        prompt_ids, text = await state.prompt(service, body.single_prompt())
        return await _generate(request, service, body, prompt_ids, text, body.max_tokens, key_id, chat=False)

    @app.post("/v1/chat/completions", responses=CHAT_RESPONSES)
    async def chat(body: ChatCompletionRequest, request: Request, key_id: str = Depends(authorize)) -> Response:
        service = state.ready()
        state.check_model(body)
        body.refuse_unsupported()
        tokenizer = service.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise bad_request(
                f"model '{state.model_name}' has no chat template, so it cannot take messages; use /v1/completions with a prompt",
                param="messages", code="no_chat_template",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = await state.off_loop(chat_text, tokenizer, messages)
        except Exception as exc:  # templates raise on conversations they do not support
            raise bad_request(f"the model's chat template refused these messages: {exc}", param="messages") from None
        prompt_ids = await state.tokenize(tokenizer, text, add_special_tokens=False)
        return await _generate(request, service, body, prompt_ids, text, body.token_limit, key_id, chat=True)

    async def _generate(
        request: Request, service: Service, body, prompt_ids: list[int], prompt_text: str, max_tokens: int | None,
        key_id: str, chat: bool,
    ) -> Response:
        if not prompt_ids:
            raise bad_request("the prompt is empty", param="prompt")
        params = await state.admit(request, service, body, prompt_ids, max_tokens, key_id)
        if body.provisional:
            state.allow_provisional(body, service)
        request_id = request.state.request_id
        deadline = time.monotonic() + state.server.deadline_s if state.server.deadline_s else None
        job = Job(request_id, prompt_ids, params, body.depth, deadline, asyncio.get_running_loop())
        routing_key = {"user": body.user, "task": body.task}.get(state.settings.route_key)
        if body.proposer is not None:
            if body.proposer not in state.router.engines:
                names = ", ".join(sorted(state.router.engines))
                raise bad_request(f"unknown proposer '{body.proposer}'; this server has: {names}", param="proposer")
            job.proposer, job.pinned = body.proposer, True
        else:
            job.proposer = state.router.choose(routing_key)
        job.engine, job.route_key = state.router.engines[job.proposer], routing_key
        job.guarded = not state.router.on_trial(job.proposer)
        job.provisional = bool(body.provisional)
        state.metrics.proposer_requests(job.proposer).inc()
        job.inspect = random.random() < state.audit.mismatch_sample_rate
        job.keep_rounds = state.telemetry.enabled
        operation = "chat" if chat else "text_completion"
        span = state.telemetry.start_request(operation, request.headers, {
            "gen_ai.request.max_tokens": params.max_new_tokens, "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p, "gen_ai.request.top_k": params.top_k or None,
            "gen_ai.request.seed": params.seed, "gen_ai.request.stop_sequences": list(params.stop) or None,
            "gen_ai.response.id": request_id, "verispec.request_id": request_id, "verispec.api_key_id": key_id,
            "verispec.inspected": job.inspect, "verispec.provisional": job.provisional or None,
        })
        request.state.audited = True  # the record is this handler's from here on
        underway = Underway(request_id, key_id, request.url.path, operation, job, prompt_ids, prompt_text, params, span, utc_now())
        finish = functools.partial(state.conclude, underway)
        try:
            service.scheduler.submit(job)
        except Overloaded as exc:
            state.metrics.outcome("rejected").inc()
            await finish("rejected", 503, error=str(exc))
            raise retry_later(503, str(exc), exc.retry_after_s, code="overloaded") from None
        request.state.job = job
        reply = Reply(underway, request, state.policy.gate() if state.policy is not None else None, state.metrics)
        shape = Shape(chat, ("chatcmpl-" if chat else "cmpl-") + request_id, state.model_name)
        with_stats = body.speculation_stats if body.speculation_stats is not None else state.server.speculation_stats
        headers = getattr(request.state, "extra_headers", {})
        try:
            first = await reply.next()  # errors before the first token keep their status
        except ClientGone:
            await finish("cancelled", 499, error="client disconnected")
            return Response(status_code=499)  # nobody reads it; the log and metrics record the departure
        except APIError as exc:
            job.cancel()
            await finish(_outcome_of(exc), exc.status, error=exc.message)
            raise
        except BaseException:
            job.cancel()
            raise
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _sse(reply, shape, first, with_stats, include_usage, finish, state)
            return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        delta = first
        try:
            while delta.finish_reason is None:
                delta = await reply.next_verified()
        except ClientGone:
            await finish("cancelled", 499, text=reply.released, error="client disconnected")
            return Response(status_code=499)
        except APIError as exc:
            await finish(_outcome_of(exc), exc.status, text=reply.released, error=exc.message)
            raise
        finally:
            job.cancel()  # a no-op once finished; frees the slot if the client left
        if not await finish(_outcome_of_finish(delta), 200, delta, reply.released, wait=True):  # acknowledged only once recorded
            raise state.unacknowledged()
        return JSONResponse(shape.full(reply.released, delta.finish_reason, delta.stats, with_stats, job.proposer), headers=headers)

    verifying = verify_routes(state, authorize)
    app.include_router(verifying)
    return app


async def _sweep_sessions(verifying, idle_s: float) -> None:
    """Expire idle verify sessions, checking a few times per idle period."""
    while True:
        await asyncio.sleep(min(1.0, idle_s / 4))
        try:
            await verifying.sweep()
        except Exception:  # never let the sweeper die: sessions would then hold their slots forever
            log.exception("expiring idle verify sessions failed")


async def _sse(
    reply: Reply, shape: Shape, first: Delta | Provisional, with_stats: bool, include_usage: bool, finish, state: State,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: verified tokens only, then `data: [DONE]`. A
    client that asked for provisional text also gets named events (which OpenAI's clients never
    see, as they never ask): `event: provisional` with a round's drafts as soon as they are made,
    and `event: verdict` with the verifier's answer, just before the round's verified chunk."""

    def event(body: dict, name: str | None = None) -> str:
        head = f"event: {name}\n" if name else ""
        return f"{head}data: {json.dumps(body, separators=(',', ':'))}\n\n"

    job = reply.job
    concluded = False
    tokens: list[int] = list(job.prompt_ids[-_DRAFT_CONTEXT:])  # verified context for decoding drafts
    rounds = 0
    try:
        item = first
        if shape.chat:
            yield event(shape.chunk(None, role=True))
        while True:
            if isinstance(item, Provisional):
                text = await state.off_loop(_draft_text, state.service.tokenizer, tokens, item.token_ids)
                yield event({"id": shape.id, "round": rounds, "token_ids": item.token_ids, "text": text}, "provisional")
            else:
                delta = item
                if job.provisional and delta.round is not None:
                    verdict = {"id": shape.id, "round": rounds, "proposed": delta.round.proposed, "accepted": delta.round.accepted}
                    yield event(verdict, "verdict")
                    rounds += 1
                if job.provisional:  # the context the next round's drafts are decoded after
                    tokens = (tokens + delta.token_ids)[-_DRAFT_CONTEXT:]
                if delta.text:
                    yield event(shape.chunk(delta.text))
                if delta.finish_reason is not None:
                    break
            try:
                item = await reply.next()
            except APIError as exc:  # the stream has begun: the error goes in-band
                concluded = True
                await finish(_outcome_of(exc), exc.status, text=reply.released, error=exc.message)
                yield event(exc.body())
                yield "data: [DONE]\n\n"
                return
            except ClientGone:
                return
        final = shape.chunk(None, delta.finish_reason)
        if with_stats:
            final["speculation_stats"] = speculation_stats(delta.stats, job.proposer)
        yield event(final)
        if include_usage:
            yield event(shape.usage_chunk(delta.stats))
        concluded = True
        if await finish(_outcome_of_finish(delta), 200, delta, reply.released, wait=True):  # [DONE] acknowledges: recorded first
            yield "data: [DONE]\n\n"
        else:  # not recorded: an error instead of [DONE], so the client knows it was not acknowledged
            yield event(state.unacknowledged().body())
    finally:
        job.cancel()  # client gone or done: the engine thread drops the job at its next round
        if not concluded:  # the client left mid-stream
            await asyncio.shield(finish("cancelled", 499, text=reply.released, error="client disconnected"))


_DRAFT_CONTEXT = 8  # verified tokens decoded before a round's drafts, so their text joins up right


def _draft_text(tokenizer: PreTrainedTokenizerBase, context: list[int], drafts: list[int]) -> str:
    """The text drafts add after the verified context (for display: the verified text is final)."""
    before = tokenizer.decode(context)
    after = tokenizer.decode(context + drafts)
    return after[len(before):] if after.startswith(before) else tokenizer.decode(drafts)


def _outcome_of_finish(delta: Delta) -> str:
    return "content_filter" if delta.finish_reason == "content_filter" else "ok"


def audit_unavailable(problem: str) -> APIError:
    return retry_later(
        503, f"the audit trail is unavailable, so this server does not answer: {problem}; retry shortly", 5,
        code="audit_unavailable",
    )


def _outcome_of(exc: APIError) -> str:
    return {504: "deadline", 503: "cancelled"}.get(exc.status, "error")


class RequestContext:
    """Pure ASGI middleware: a request ID on every response, one log line and one count per API call,
    and a 500 in OpenAI's format (never a bare traceback) should a handler fail."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        if request_id == given and self.state.redactor.findings(given):
            # It looks like a secret or personal data: adopting it would put it in logs and records.
            request_id = uuid.uuid4().hex
            log.warning("x-request-id not adopted: the redactor finds personal data or a secret in it; using %s", request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        status: int | None = None
        started = time.perf_counter()

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", request_id)
            if status is None:
                await errors.internal_error().response()(scope, receive, send_with_id)
        finally:
            path = scope["path"]
            if path in API_PATHS:
                elapsed = time.perf_counter() - started
                self.state.metrics.requests(path, status or 499).inc()
                log.info("%s %s %d", scope["method"], path, status or 499, extra={"status": status or 499, "duration_s": round(elapsed, 4)})
                request_state = scope["state"]
                if path != "/v1/models" and not request_state.get("audited"):
                    # Refused before generation (bad input, key, rate limit, not ready): metadata only.
                    done = Finished(
                        request_id=request_id, arrived=utc_now(), key_id=request_state.get("key_id"), endpoint=path,
                        outcome="rejected", status=status or 499, latency_s=elapsed, error=request_state.get("error"),
                    )
                    self.state.spawn(self.state.audit_record(done, wait=False))
            request_id_var.reset(token)
