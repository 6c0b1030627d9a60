"""Bounds on what a client may send and how slowly: no connection or body can hold the server.

- `BoundedBody` (ASGI middleware): a body larger than `--max-body-bytes` gets 413, at once when its
  Content-Length says so, else as soon as the bytes read pass the limit; a body that has not fully
  arrived `--body-timeout-s` after its first read (trickled, or shorter than its Content-Length)
  gets 408. Nothing past the limit is buffered.
- `header_timeout_protocol`: uvicorn's h11 protocol with one more timer, armed while a connection
  waits for a request's headers (a fresh connection, or a kept-alive one after its response). A
  connection that has not sent complete headers within `--header-timeout-s` gets 408 and is
  closed, so slowloris connections cannot pile up.
"""

from __future__ import annotations

import asyncio

import h11
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from verispec.server.errors import APIError

_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def too_large(limit: int) -> str:
    return f"the request body is larger than this server accepts ({limit} bytes; --max-body-bytes); send a shorter prompt"


def too_slow(timeout_s: float) -> str:
    return f"the request body did not arrive within {timeout_s:g}s (--body-timeout-s); send it whole, at once"


class BoundedBody:
    """Pure ASGI middleware: 413 past `max_bytes`, 408 when the body takes longer than `timeout_s`."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            scope.setdefault("state", {})["error"] = too_large(self.max_bytes)
            await APIError(413, too_large(self.max_bytes), code="request_too_large").response()(scope, receive, send)
            return
        received = 0
        deadline: float | None = None
        body_done = False
        loop = asyncio.get_running_loop()

        async def bounded_receive():
            nonlocal received, deadline, body_done
            if body_done:  # after the body: disconnect checks may wait as long as they like
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(408, too_slow(self.timeout_s)) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, too_large(self.max_bytes))
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        await self.app(scope, bounded_receive, send)


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol that closes connections slow to send their request headers."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in: the body has its own timeout
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # waiting for the next request's headers on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(_TIMEOUT_RESPONSE)
            self.transport.close()

    return HeaderTimeoutProtocol
