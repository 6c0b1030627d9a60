"""`create_app(settings)`: the FastAPI app, as a short list of routes over the app's services
(`State`: intake, safety, records, serving).

The app starts listening at once and loads its `Service` in a background thread: `/healthz`
answers from the first moment, `/readyz` and the API answer 503 (with Retry-After) until the
models are loaded, the step costs measured and one warm-up request run. The routes live with
their jobs: generation in `completions.py`, the verify API in `verify.py`, the web page in
`playground.py`; the request ID, access log and refusal records in `context.py`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from verispec.assemble import build_engine
from verispec.config import Settings
from verispec.server import errors
from verispec.server.auth import bearer_auth
from verispec.server.completions import completion_routes
from verispec.server.context import RequestContext
from verispec.server.errors import APIError
from verispec.server.limits import BoundedBody
from verispec.server.openapi import MODELS_RESPONSES, READY_RESPONSES
from verispec.server.playground import playground_enabled, playground_routes
from verispec.server.service import Cluster, EngineFactory
from verispec.server.state import State
from verispec.server.verify import verify_routes

log = logging.getLogger("verispec.server")

__all__ = ["Cluster", "EngineFactory", "State", "create_app"]


def create_app(settings: Settings, engine_factory: EngineFactory = build_engine, cluster: Cluster | None = None) -> FastAPI:
    state = State(settings, engine_factory, cluster)
    serving, records = state.serving, state.records
    authorize = bearer_auth(state.intake.keys)
    verifying = verify_routes(
        serving=serving, intake=state.intake, safety=state.safety, records=records, metrics=state.metrics, authorize=authorize,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        records.start()
        if cluster is None:  # listen at once; /readyz says when the models are in
            threading.Thread(target=serving.load, name="verispec-load", daemon=True).start()
        else:  # a replica: Ray routes to it once this returns, so it returns warm
            await asyncio.to_thread(serving.load)
            if serving.load_error:
                raise RuntimeError(serving.load_error)
        sweeper = asyncio.ensure_future(_sweep_sessions(verifying, state.server.verify_idle_s))
        yield
        serving.stop_admitting()
        sweeper.cancel()
        await verifying.close_all()
        if serving.service is not None:
            # uvicorn has already given open requests the grace period; cancel what is left.
            await asyncio.to_thread(serving.service.scheduler.drain, 0.0)
        await state.close()

    app = FastAPI(title="verispec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.verispec = state
    errors.install(app)
    app.add_middleware(BoundedBody, max_bytes=state.server.max_body_bytes, timeout_s=state.server.body_timeout_s)
    app.add_middleware(RequestContext, records=records, metrics=state.metrics)  # outermost: its request ID and audit cover the limits' refusals

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses=READY_RESPONSES)
    async def readyz() -> JSONResponse:
        try:
            service = serving.ready()
        except APIError as exc:
            return JSONResponse({"status": exc.code, "message": exc.message}, status_code=503, headers=exc.headers)
        body = {"status": "ready", "model": state.model_name, "breaker": serving.breaker.state.name.lower(), "kernel": service.paths}
        if cluster is not None:
            body["replica"] = cluster.replica
        return JSONResponse(body)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        if serving.service is not None:
            state.metrics.breaker_state.set(int(serving.breaker.state))  # the cool-down ends on a clock, not an event
        records.observe()  # read at scrape time: a stuck writer cannot report itself
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

    app.include_router(completion_routes(
        serving=serving, intake=state.intake, safety=state.safety, records=records, worker=state.worker, metrics=state.metrics,
        authorize=authorize,
    ))
    app.include_router(verifying)
    if playground_enabled(state.server.playground, state.intake.keys):
        app.include_router(playground_routes(serving=serving, model_name=state.model_name, authorize=authorize))
    return app


async def _sweep_sessions(verifying, idle_s: float) -> None:
    """Expire idle verify sessions, checking a few times per idle period."""
    while True:
        await asyncio.sleep(min(1.0, idle_s / 4))
        try:
            await verifying.sweep()
        except Exception:  # never let the sweeper die: sessions would then hold their slots forever
            log.exception("expiring idle verify sessions failed")
