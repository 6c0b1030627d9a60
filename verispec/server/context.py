"""The access layer every HTTP request passes: its request ID, its log line and count, the record
of a refusal, and a 500 in OpenAI's format should a handler fail."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders

from verispec.audit.records import utc_now
from verispec.server import errors
from verispec.server.logs import request_id_var
from verispec.server.metrics import ServerMetrics
from verispec.server.records import Records
from verispec.server.state import API_PATHS
from verispec.server.underway import conclude_refused

log = logging.getLogger("verispec.server")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContext:
    """Pure ASGI middleware: a request ID on every response, one log line and one count per API call,
    and a 500 in OpenAI's format (never a bare traceback) should a handler fail."""

    def __init__(self, app, records: Records, metrics: ServerMetrics):
        self.app, self.records, self.metrics = app, records, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        if request_id == given and self.records.redactor.identifier_findings(given):
            # It holds a secret or an e-mail address: adopting it would put that in logs and records.
            request_id = uuid.uuid4().hex
            log.warning("x-request-id not adopted: the redactor finds a secret or an e-mail address in it; using %s", request_id)
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
                self.metrics.requests(path, status or 499).inc()
                log.info("%s %s %d", scope["method"], path, status or 499, extra={"status": status or 499, "duration_s": round(elapsed, 4)})
                request_state = scope["state"]
                if path != "/v1/models" and not request_state.get("audited"):
                    conclude_refused(self.records, request_id, utc_now(), path, request_state.get("key_id"), status or 499,
                                     elapsed, request_state.get("error"))  # fmt: skip
            request_id_var.reset(token)
