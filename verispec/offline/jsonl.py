"""The OpenAI Batch API's JSONL format, and resuming a job from its own output.

A request line: `{"custom_id": "...", "method": "POST", "url": "/v1/completions", "body": {...}}`.
A result line: `{"id": "batch_req_...", "custom_id": "...", "response": {"status_code": 200,
"request_id": "...", "body": {...}}, "error": null}`; a refused request has its status (400) and an
OpenAI error body in `response`, and `error` stays null, as OpenAI writes requests that got an
HTTP answer. A line that cannot be read (not UTF-8, not JSON, no string `custom_id`) is answered
under the id `line-<N>`, its 1-based line number, since it names no id of its own.

Resuming: a result line is written whole (one write, then flush) as soon as its request is done, so
a job killed at any moment leaves complete lines and at most one partial last line. On start the
partial line is cut off and the ids already answered are skipped. Ids are derived from the
custom_id, so a request answered again writes the same `id` and `request_id`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verispec.errors import UserError
from verispec.server.errors import APIError, bad_request

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
URLS = (COMPLETIONS, CHAT)


@dataclass(frozen=True)
class InputLine:
    number: int  # 1-based line number in the input file
    raw: bytes  # the line as read, without its newline
    custom_id: str  # its own, or line-<number> when it names none
    url: str | None = None
    body: Any = None
    problem: APIError | None = None  # why it cannot run at all (it gets this as its answer)


def parse_line(number: int, raw: bytes) -> InputLine:
    """One request line; a line that is not a valid request carries the 400 it will be answered with."""

    def refused(message: str, custom_id: str | None = None, param: str | None = None) -> InputLine:
        return InputLine(number, raw, custom_id or f"line-{number}", problem=bad_request(message, param=param))

    try:
        item = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return refused(f"line {number} is not valid UTF-8")
    except json.JSONDecodeError as exc:
        return refused(f"line {number} is not valid JSON: {exc}")
    if not isinstance(item, dict):
        return refused(f"line {number} must be a JSON object with custom_id, method, url and body")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return refused(f"line {number}: 'custom_id' must be a non-empty string", param="custom_id")
    method, url, body = item.get("method", "POST"), item.get("url"), item.get("body")
    if method != "POST":
        return refused(f"'method' must be POST, got {method!r}", custom_id, param="method")
    if url not in URLS:
        return refused(f"unknown url {url!r}; a batch job answers {' and '.join(URLS)}", custom_id, param="url")
    if not isinstance(body, dict):
        return refused("'body' must be a JSON object: the request as it would be sent to the url", custom_id, param="body")
    return InputLine(number, raw, custom_id, url, body)


def read_input(path: Path) -> list[InputLine]:
    """Every request line of the file (blank lines skipped). Duplicate custom_ids refuse the whole
    job up front, as OpenAI's batch endpoint validates a file: the output could not tell them apart."""
    if not path.is_file():
        raise UserError(f"input file {path} does not exist")
    with path.open("rb") as f:
        lines = [parse_line(n, raw.rstrip(b"\r\n")) for n, raw in enumerate(f, 1) if raw.strip()]
    seen: dict[str, int] = {}
    duplicates: dict[str, list[int]] = {}
    for line in lines:
        if line.custom_id in seen:
            duplicates.setdefault(line.custom_id, [seen[line.custom_id]]).append(line.number)
        seen.setdefault(line.custom_id, line.number)
    if duplicates:
        shown = "; ".join(f"{cid!r} on lines {', '.join(map(str, numbers))}" for cid, numbers in list(duplicates.items())[:5])
        more = f" (and {len(duplicates) - 5} more)" if len(duplicates) > 5 else ""
        raise UserError(
            f"{path}: {len(duplicates)} custom_id(s) appear more than once: {shown}{more}; each request needs its own custom_id"
        )
    return lines


def ids(custom_id: str) -> tuple[str, str]:
    """The result line's `id` and `request_id`: derived from the custom_id, so the same on a rerun."""
    digest = hashlib.sha256(custom_id.encode("utf-8", "surrogatepass")).hexdigest()
    return "batch_req_" + digest[:24], digest[:32]


def result_line(custom_id: str, status: int, body: dict) -> str:
    """One output line, newline included."""
    line_id, request_id = ids(custom_id)
    item = {
        "id": line_id,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }
    try:
        return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8").decode() + "\n"
    except UnicodeEncodeError:  # a lone surrogate in a custom_id: escaped, the line stays valid JSON
        return json.dumps(item, separators=(",", ":")) + "\n"


def error_line(custom_id: str, error: APIError) -> str:
    return result_line(custom_id, error.status, error.body())


def resume(path: Path) -> set[str]:
    """The custom_ids `path` already answers, after cutting off a partial last line (a write cut
    short by a kill). A missing file answers none."""
    if not path.exists():
        return set()
    if not path.is_file():
        raise UserError(f"--output {path} is not a file")
    done: set[str] = set()
    complete = 0  # bytes of whole lines
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break
            complete += len(raw)
            if not raw.strip():
                continue
            try:
                custom_id = json.loads(raw)["custom_id"]
            except (ValueError, TypeError, KeyError):
                custom_id = None
            if not isinstance(custom_id, str):
                raise UserError(
                    f"{path} line {number} is not a batch result line, so it cannot be resumed; "
                    "move the file aside or choose another --output"
                )
            done.add(custom_id)
    if complete < path.stat().st_size:
        os.truncate(path, complete)
    return done


class OutputWriter:
    """Appends result lines: each one write and a flush, so a kill leaves whole lines only (and at
    most one partial last line, which `resume` cuts off); fsync once at the end."""

    def __init__(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write --output {path}: {exc.strerror}") from None

    def write(self, line: str) -> None:
        self.file.write(line)
        self.file.flush()

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
