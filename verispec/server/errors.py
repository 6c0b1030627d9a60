"""Every error a client can cause, in OpenAI's error format, in one place.

Routes raise `APIError`; the handlers here turn it, FastAPI's validation errors, unknown routes
and anything unexpected into `{"error": {"message", "type", "param", "code"}}` with the right
status. A client can never get a 500 for what it sent: validation happens before the engine runs,
and an error body renders whatever text it quotes back (see `ErrorResponse`).
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from verispec.validation import Problem, problems

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class ErrorResponse(JSONResponse):
    """A JSON body in ASCII, with `\\uXXXX` escapes: error messages quote what the client sent, and
    a lone surrogate in it would make the UTF-8 encoding of a plain JSONResponse fail, turning a
    400 into a 500. Escaped, any Python string renders, and clients decode the same text."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"), "param": self.param, "code": self.code}}

    def response(self) -> ErrorResponse:
        return ErrorResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def retry_later(status: int, message: str, retry_after_s: float, code: str, headers: dict[str, str] | None = None) -> APIError:
    return APIError(status, message, code=code, headers={**(headers or {}), "Retry-After": str(max(1, math.ceil(retry_after_s)))})


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        request.state.error = exc.message  # for the audit record of a refused request
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid_request(exc.errors())
        request.state.error = error.message
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        error = APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), headers=exc.headers)
        request.state.error = error.message
        return error.response()


def invalid_request(errors: list[dict]) -> APIError:
    """FastAPI's validation errors of a request as one 400: a sentence per bad field, named as the
    client's JSON names it (`messages[0].content`), the first such field as `param`."""
    if any(error["type"] == "json_invalid" for error in errors):
        return bad_request("the body is not valid JSON")
    found = problems([{**error, "loc": tuple(error["loc"])[1:] if error["loc"][:1] == ("body",) else error["loc"]} for error in errors])
    param = next((problem.path() for problem in found if problem.location), None)
    return bad_request("; ".join(_sentence(problem) for problem in found) or "invalid request", param=param)


def _sentence(problem: Problem) -> str:
    """'prompt' must be ...; 'stop': at most 4 stop sequences; the body must be an object."""
    if not problem.location:
        return f"the body {problem.message}" if _is_predicate(problem.message) else problem.message
    name = f"'{problem.path()}'"
    return f"{name} {problem.message}" if _is_predicate(problem.message) else f"{name}: {problem.message}"


def _is_predicate(message: str) -> bool:
    return message.startswith(("must ", "is ", "holds "))


def internal_error() -> APIError:
    return APIError(500, "internal server error; the x-request-id of this response identifies it in the server's log")
