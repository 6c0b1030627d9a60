"""What the OpenAPI schema says the API can answer besides success: OpenAI's error body, with
every status a client can meet. The schema at /openapi.json is what clients and the fuzz tests
(Schemathesis) check responses against, so it lists every status the routes can return."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


_STATUSES = {
    400: "invalid request: the message says what to change",
    401: "missing or invalid API key",
    408: "the request body did not arrive in time",
    413: "the request body is larger than the server accepts",
    429: "rate limit exceeded; retry after Retry-After seconds",
    500: "a server bug; the x-request-id identifies it in the server's log",
    503: "not ready, overloaded, shutting down, or the audit trail is unavailable; retry after Retry-After seconds",
    504: "the request passed the server's deadline",
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in _STATUSES.items()
}
