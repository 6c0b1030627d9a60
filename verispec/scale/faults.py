"""The Ray Serve HTTP proxy's middleware: a replica that dies never reaches a client as a hang or
a bare 500.

Ray's proxy answers a request whose replica died with an empty 500, cuts a stream that was under
way, and refuses with a plain-text 503 when every replica's queue is full. This middleware runs
in the proxy (Ray loads it from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, which `verispec
serve --replicas` sets and `deploy/` sets for clusters) and, for the API's paths:

- retries a request whose replica failed before the response began on another replica (the
  body is kept for that, up to `MAX_REPLAY_BYTES`): nothing reached the client, so nothing is
  lost or doubled, and the dead replica acknowledged nothing;
- answers an OpenAI-shaped 503 with Retry-After once the retries are spent, and in OpenAI's
  shape too when Ray refuses for back-pressure or times a request out;
- ends a stream cut mid-way with an in-band error event (status 503, as the server does for
  errors after the first token), never with `[DONE]`: the client knows it was not acknowledged;
- puts a verify round's session id in Ray's session header, for the deployment's router to send
  the round to the replica that holds the session (`sessions.py`).

A response the replica made itself (JSON errors included) passes through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from starlette.middleware import Middleware

from verispec.scale.sessions import VERIFY_PATH, with_session_header
from verispec.server.errors import APIError, retry_later

log = logging.getLogger("verispec.scale")

RETRIES = 2  # further replicas a request may go to after its replica failed
MAX_REPLAY_BYTES = 8 * 1024 * 1024  # larger bodies are passed through once, not kept for a retry
RETRY_AFTER_S = 5
BODY_TIMEOUT_S = float(os.environ.get("VERISPEC_BODY_TIMEOUT_S", "30"))


def proxy_middlewares() -> list[Middleware]:
    """What Ray's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=verispec.scale.faults:proxy_middlewares)."""
    return [Middleware(ReplicaFaults)]


def _replica_failed() -> APIError:
    return retry_later(503, "the replica serving this request failed; retry shortly", RETRY_AFTER_S, code="replica_unavailable")


def _from_proxy(status: int, headers: dict[bytes, bytes], text: str) -> APIError:
    """Ray's own refusals (plain text) in OpenAI's shape, their Retry-After kept."""
    if status == 503:
        retry = headers.get(b"retry-after", str(RETRY_AFTER_S).encode()).decode()
        seconds = float(retry) if retry.replace(".", "", 1).isdigit() else RETRY_AFTER_S
        return retry_later(503, f"every replica is busy; retry shortly ({text.strip() or 'back-pressure'})", seconds, code="overloaded")
    if status == 408:
        return APIError(408, f"the request took longer than the deployment's request timeout ({text.strip()})", code="timeout")
    return _replica_failed()


class _Attempt:
    """One pass of the request through Ray's proxy, watching what it sends."""

    def __init__(self, send):
        self.send = send
        self.started = self.finished = False
        self.refusal: tuple[int, dict[bytes, bytes]] | None = None  # a response from Ray itself, held back
        self.refusal_text = b""
        self.event_stream = False

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            headers = {k.lower(): v for k, v in message.get("headers", [])}
            if message["status"] >= 400 and not headers.get(b"content-type", b"").startswith(b"application/json"):
                self.refusal = (message["status"], headers)  # not the replica's API: Ray's or a crash's
                return
            self.event_stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            self.started = True
        elif message["type"] == "http.response.body":
            if self.refusal is not None:
                self.refusal_text += message.get("body", b"")
                return
            self.finished = not message.get("more_body", False)
        await self.send(message)


def _replaying(kept: list[dict], receive):
    """`receive` for one attempt: the kept request messages first, then the client's (disconnects)."""
    replay = iter(kept)

    async def receive_again():
        message = next(replay, None)
        return message if message is not None else await receive()

    return receive_again


class ReplicaFaults:
    """Pure ASGI middleware for Ray's HTTP proxy."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        kept, whole = await self._read_body(receive)
        if whole and scope["path"] == VERIFY_PATH:  # a round goes to the replica that holds its session
            scope = with_session_header(scope, kept)
        for attempt_no in range(RETRIES + 1):
            attempt = _Attempt(send)
            try:
                await self.app(scope, _replaying(kept, receive), attempt)
            except Exception as exc:  # the proxy's own failure: as a dead replica's
                log.warning("request failed in the proxy: %r", exc)
            if attempt.finished:
                return
            if attempt.started:  # cut mid-way: the stream ends with an error, not with [DONE]
                await self._end_cut(attempt)
                return
            if attempt.refusal is not None and attempt.refusal[0] != 500:
                error = _from_proxy(*attempt.refusal, attempt.refusal_text.decode("utf-8", "replace"))
                await error.response()(scope, receive, send)
                return
            if not whole or attempt_no == RETRIES:
                break
            log.warning("replica failed before responding to %s; retrying on another replica", scope["path"])
            await asyncio.sleep(0.2 * (attempt_no + 1))  # let Ray mark the replica dead
        await _replica_failed().response()(scope, receive, send)

    async def _read_body(self, receive) -> tuple[list[dict], bool]:
        """The request's messages, kept for a retry; `whole` is False past MAX_REPLAY_BYTES or on a
        disconnect (then the rest is read by the replica as usual, with no retry). A body that has
        not arrived within --body-timeout-s (VERISPEC_BODY_TIMEOUT_S in the proxy's environment,
        default 30) is answered 408 by the replica's own limit, which sees the same trickle."""
        kept, size = [], 0
        deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                return kept, False
            kept.append(message)
            if message["type"] != "http.request":
                return kept, False
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return kept, True
            if size > MAX_REPLAY_BYTES:
                return kept, False

    async def _end_cut(self, attempt: _Attempt) -> None:
        if attempt.event_stream:
            error = _replica_failed().body()
            error["error"]["status"] = 503
            event = f"data: {json.dumps(error, separators=(',', ':'))}\n\n".encode()
            await attempt.send({"type": "http.response.body", "body": event, "more_body": True})
        await attempt.send({"type": "http.response.body", "body": b"", "more_body": False})
