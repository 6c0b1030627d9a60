"""Every error a client can cause, in OpenAI's error format, in one place.

Routes raise `APIError`; the handlers here turn it, FastAPI's validation errors, unknown routes
and anything unexpected into `{"error": {"message", "type", "param", "code"}}` with the right
status. A client can never get a 500 for what it sent: validation happens before the engine runs.
"""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "overloaded_error",
    504: "timeout_error",
}


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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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
        problems, param = [], None
        for error in exc.errors():
            loc = [str(p) for p in error["loc"] if p != "body"]
            where = ".".join(loc)
            if error["type"] == "json_invalid":
                problems.append("the body is not valid JSON")
                continue
            param = param or where or None
            if error["type"] == "missing":
                problems.append(f"'{where}' is required")
            else:
                problems.append(f"'{where}': {error['msg']}" if where else error["msg"])
        error = bad_request("; ".join(problems) or "invalid request", param=param)
        request.state.error = error.message
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))).response()


def internal_error() -> APIError:
    return APIError(500, "internal server error; the x-request-id of this response identifies it in the server's log")
