"""`create_app(settings)`: the FastAPI app. Routes translate between the OpenAI schema and the
engine; admission, scheduling and speculation policy live in `scheduler.py` and `breaker.py`.

The app starts listening at once and loads the models in a background thread: `/healthz`
answers from the first moment, `/readyz` and the API answer 503 (with Retry-After) until the
models are loaded, the step costs measured and one warm-up request run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import MutableHeaders
from transformers import PreTrainedTokenizerBase

from verispec.assemble import build_engine, resolve_models
from verispec.config import ModelSettings, SamplingParams, ServerSettings, Settings
from verispec.engine import Delta, SpeculativeEngine
from verispec.errors import UserError
from verispec.server import errors
from verispec.server.auth import KeyRing, RateLimiter
from verispec.server.breaker import CircuitBreaker
from verispec.server.errors import APIError, bad_request, retry_later
from verispec.server.metrics import ServerMetrics
from verispec.server.protocol import ChatCompletionRequest, CompletionRequest, Shape, speculation_stats
from verispec.server.scheduler import DeadlineExceeded, Finished, Job, Overloaded, Scheduler

log = logging.getLogger("verispec.server")

EngineFactory = Callable[[Settings], SpeculativeEngine]
API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class Service:
    """What the API needs once the models are loaded."""

    engine: SpeculativeEngine
    scheduler: Scheduler

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer


class State:
    """The app's state, one per app (no module globals)."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory):
        self.settings = settings
        self.server = settings.part(ServerSettings)
        self.engine_factory = engine_factory
        models = resolve_models(settings.part(ModelSettings))
        self.model_name = self.server.served_model_name or Path(models.target.rstrip("/")).name
        self.keys = KeyRing.from_settings(self.server)
        self.limiter = RateLimiter(self.server.rate_limit_rpm, self.server.rate_limit_tpm)
        max_depth = settings.max_depth if settings.depth == "auto" else max(1, int(settings.depth))
        self.metrics = ServerMetrics(self.model_name, self.server, max_depth)
        self.breaker = CircuitBreaker(
            self.server.breaker_min_acceptance,
            self.server.breaker_window,
            self.server.breaker_max_failures,
            self.server.breaker_cooldown_s,
            on_change=lambda state, why: self.metrics.observe_breaker(state),
        )
        self.service: Service | None = None
        self.load_error: str | None = None
        self.draining = False
        self.on_fatal: Callable[[], None] = lambda: None  # set by `serve` to stop the server

    def load(self) -> None:
        """Load, calibrate and warm up; runs in a background thread."""
        try:
            started = time.perf_counter()
            engine = self.engine_factory(self.settings)
            if engine.proposer is not None and engine.speculation.depth == "auto":
                engine.costs()  # measure step costs now, not during the first request
            warm_prompt = engine.tokenizer("def main():").input_ids or [0]
            engine.generate(warm_prompt, SamplingParams(max_new_tokens=4))
            scheduler = Scheduler(engine, self.server, self.breaker, self.metrics)
            scheduler.start()
            self.service = Service(engine, scheduler)
            self.metrics.ready.set(1)
            log.info("ready: %s loaded and warmed in %.1fs", self.model_name, time.perf_counter() - started)
        except Exception as exc:
            self.load_error = str(exc) if isinstance(exc, UserError) else f"loading the models failed: {exc!r}"
            log.error("%s", self.load_error)
            self.on_fatal()

    def ready(self) -> Service:
        if self.draining:
            raise retry_later(503, "the server is shutting down; retry on another replica", 5, code="shutting_down")
        if self.service is None:
            raise retry_later(503, "the server is loading its models; retry shortly", 5, code="not_ready")
        return self.service


def create_app(settings: Settings, engine_factory: EngineFactory = build_engine) -> FastAPI:
    state = State(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="verispec-load", daemon=True).start()
        yield
        state.draining = True
        state.metrics.ready.set(0)
        if state.service is not None:
            # uvicorn has already given open requests the grace period; cancel what is left.
            await asyncio.to_thread(state.service.scheduler.drain, 0.0)

    app = FastAPI(title="verispec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.verispec = state
    errors.install(app)
    app.add_middleware(RequestContext, state=state)

    async def authorize(request: Request) -> str:
        """The caller's API key ID ('anonymous' when the server has no keys)."""
        if not state.keys.enabled:
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

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            state.ready()
        except APIError as exc:
            return JSONResponse({"status": exc.code}, status_code=503, headers=exc.headers)
        return JSONResponse({"status": "ready", "model": state.model_name, "breaker": state.breaker.state.name.lower()})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.service is not None:
            state.metrics.breaker_state.set(int(state.breaker.state))  # the cool-down ends on a clock, not an event
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(key_id: str = Depends(authorize)) -> dict:
        return {
            "object": "list",
            "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "verispec"}],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key_id: str = Depends(authorize)) -> Response:
        service = state.ready()
        _check_common(body)
        body.refuse_unsupported()
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            prompt_ids = service.tokenizer(prompt).input_ids
        else:
            vocab = service.engine.target.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise bad_request(f"prompt token ids must lie in [0, {vocab})", param="prompt")
            prompt_ids = list(prompt)
        return await _generate(request, service, body, prompt_ids, body.max_tokens, key_id, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, key_id: str = Depends(authorize)) -> Response:
        service = state.ready()
        _check_common(body)
        body.refuse_unsupported()
        tokenizer = service.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise bad_request(
                f"model '{state.model_name}' has no chat template, so it cannot take messages; use /v1/completions with a prompt",
                param="messages", code="no_chat_template",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # templates raise on conversations they do not support
            raise bad_request(f"the model's chat template refused these messages: {exc}", param="messages") from None
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        return await _generate(request, service, body, prompt_ids, body.token_limit, key_id, chat=True)

    def _check_common(body: CompletionRequest | ChatCompletionRequest) -> None:
        if body.model != state.model_name:
            raise bad_request(f"unknown model '{body.model}'; this server serves '{state.model_name}'", param="model", code="model_not_found")

    async def _generate(request: Request, service: Service, body, prompt_ids: list[int], max_tokens: int | None, key_id: str, chat: bool) -> Response:
        if not prompt_ids:
            raise bad_request("the prompt is empty", param="prompt")
        max_new = _max_new_tokens(service.engine, len(prompt_ids), max_tokens, state.settings.max_new_tokens)
        try:
            params = body.sampling(max_new)
        except ValueError as exc:
            raise bad_request(f"invalid sampling settings: {exc}") from None
        limits = state.limiter.check(key_id, len(prompt_ids) + max_new) if state.limiter.enabled else None
        if limits is not None:
            request.state.extra_headers = limits.headers
            if not limits.allowed:
                raise retry_later(429, limits.reason, limits.retry_after_s, code="rate_limit_exceeded", headers=limits.headers)
        deadline = time.monotonic() + state.server.deadline_s if state.server.deadline_s else None
        job = Job(request.state.request_id, prompt_ids, params, body.depth, deadline, asyncio.get_running_loop())
        try:
            service.scheduler.submit(job)
        except Overloaded as exc:
            state.metrics.outcome("rejected").inc()
            raise retry_later(503, str(exc), exc.retry_after_s, code="overloaded") from None
        request.state.job = job
        shape = Shape(chat, "cmpl-" + request.state.request_id if not chat else "chatcmpl-" + request.state.request_id, state.model_name)
        with_stats = body.speculation_stats if body.speculation_stats is not None else state.server.speculation_stats
        headers = getattr(request.state, "extra_headers", {})
        try:
            first = await _next_event(job, request)  # errors before the first token keep their status
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the log and metrics record the departure
        except BaseException:
            job.cancel()
            raise
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _sse(job, request, shape, first, with_stats, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        try:
            text, delta = [first.text], first
            while delta.finish_reason is None:
                delta = await _next_event(job, request)
                text.append(delta.text)
        except ClientGone:
            return Response(status_code=499)
        finally:
            job.cancel()  # a no-op once finished; frees the slot if the client left
        return JSONResponse(shape.full("".join(text), delta.finish_reason, delta.stats, with_stats), headers=headers)

    return app


def _max_new_tokens(engine: SpeculativeEngine, prompt_len: int, requested: int | None, default: int) -> int:
    window = engine.target.max_positions
    room = None if window is None else window - prompt_len
    if room is not None and room < 1:
        raise bad_request(
            f"this model's maximum context length is {window} tokens, and the prompt has {prompt_len}; shorten the prompt",
            param="prompt", code="context_length_exceeded",
        )
    if requested is None:
        return default if room is None else min(default, room)
    if room is not None and requested > room:
        raise bad_request(
            f"this model's maximum context length is {window} tokens, but you asked for {prompt_len + requested} "
            f"({prompt_len} in the prompt, {requested} to generate); lower max_tokens or shorten the prompt",
            param="max_tokens", code="context_length_exceeded",
        )
    return requested


async def _next_event(job: Job, request: Request) -> Delta:
    """The job's next delta; errors become API errors. Checks for a departed client each second."""
    while True:
        try:
            item = await asyncio.wait_for(job.events.get(), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone() from None
            continue
        if isinstance(item, Delta):
            return item
        if isinstance(item, DeadlineExceeded):
            raise APIError(504, f"{item}; the server's deadline is set by --deadline-s", code="deadline_exceeded")
        if isinstance(item, Finished):
            raise retry_later(503, "the request was cancelled because the server is shutting down", 5, code="shutting_down")
        if isinstance(item, UserError):
            raise bad_request(str(item))
        raise errors.internal_error()


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


async def _sse(job: Job, request: Request, shape: Shape, first: Delta, with_stats: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; only verified tokens, then `data: [DONE]`."""

    def event(body: dict) -> str:
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    try:
        delta = first
        if shape.chat:
            yield event(shape.chunk(None, role=True))
        while True:
            if delta.text:
                yield event(shape.chunk(delta.text))
            if delta.finish_reason is not None:
                break
            try:
                delta = await _next_event(job, request)
            except APIError as exc:  # the stream has begun: the error goes in-band
                yield event(exc.body())
                yield "data: [DONE]\n\n"
                return
            except ClientGone:
                return
        final = shape.chunk(None, delta.finish_reason)
        if with_stats:
            final["speculation_stats"] = speculation_stats(delta.stats)
        yield event(final)
        if include_usage:
            yield event(shape.usage_chunk(delta.stats))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # client gone or done: the engine thread drops the job at its next round


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
        scope.setdefault("state", {})["request_id"] = request_id
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
                self.state.metrics.requests(path, status or 499).inc()
                log.info(
                    "%s %s %s %d %.3fs", request_id, scope["method"], path, status or 499, time.perf_counter() - started
                )
