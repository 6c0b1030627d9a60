"""Structured logs: one JSON object per line, with the request ID of the request being served.

The ID comes from a context variable the request middleware sets (asyncio copies it into the
request's tasks); log calls on the engine thread pass it explicitly with `extra`. Prompts and
outputs are never logged unless the operator turns `--log-content` on, and then redacted.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():  # fields passed with `extra=`
            if key not in _STANDARD and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str, level: str) -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    if log_format == "json":
        for handler in root.handlers or [logging.StreamHandler()]:
            handler.setFormatter(JsonFormatter())
            if handler not in root.handlers:
                root.addHandler(handler)
