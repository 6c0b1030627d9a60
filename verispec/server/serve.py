"""`verispec serve`: settings in, a listening server out."""

from __future__ import annotations

import logging

import uvicorn

from verispec.assemble import build_engine
from verispec.config import (
    AuditSettings,
    ModelSettings,
    RoutingSettings,
    ScaleSettings,
    ServerSettings,
    Settings,
    SpeculationSettings,
    TelemetrySettings,
)
from verispec.errors import UserError
from verispec.server.app import EngineFactory, create_app
from verispec.server.limits import header_timeout_protocol

log = logging.getLogger("verispec.server")


def describe(settings: Settings) -> list[str]:
    """The settings the server uses, one per line, secrets masked (pydantic prints SecretStr as stars)."""
    used = {"max_new_tokens"}
    for part in (ModelSettings, SpeculationSettings, ServerSettings, RoutingSettings, AuditSettings, TelemetrySettings, ScaleSettings):
        used |= set(part.model_fields)
    return [f"  {name} = {value}" for name, value in settings.model_dump(include=used).items()]


def serve(settings: Settings, engine_factory: EngineFactory = build_engine) -> int:
    from verispec.server.logs import configure

    if settings.on_ray:
        from verispec.scale.launch import serve_on_ray

        configure(settings.log_format, settings.log_level)
        log.info("settings:\n%s", "\n".join(describe(settings)))
        return serve_on_ray(settings)

    configure(settings.log_format, settings.log_level)
    app = create_app(settings, engine_factory)
    state = app.state.verispec
    log.info("settings:\n%s", "\n".join(describe(settings)))
    if not state.intake.keys.enabled:
        log.warning("no API keys configured: anyone who can reach %s:%d may use this server", settings.host, settings.port)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep verispec's logging set-up
        log_level=settings.log_level,
        access_log=False,  # RequestContext logs each API call with its request ID
        timeout_graceful_shutdown=settings.grace_s,
        http=header_timeout_protocol(settings.header_timeout_s),  # slowloris: headers must arrive in time
    )
    server = uvicorn.Server(config)
    state.serving.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.serving.load_error:
        raise UserError(state.serving.load_error)
    return 0
