"""The OpenAI Batch API's JSONL format, and resuming a job from its own output.

A request line: `{"custom_id": "...", "method": "POST", "url": "/v1/completions", "body": {...}}`.
A result line: `{"id": "batch_req_...", "custom_id": "...", "response": {"status_code": 200,
"request_id": "...", "body": {...}}, "error": null, "request_digest": "sha256:..."}`; a refused
request has its status (400) and an OpenAI error body in `response`, and `error` stays null, as
OpenAI writes requests that got an HTTP answer. A line that names no custom_id (not UTF-8, not
JSON, no non-empty string `custom_id`) is answered with `"custom_id": null` and its 1-based line
number in `"line"`: any string is a valid custom_id, so no name made up for it could be told apart
from a real one.

`request_digest` identifies the request a line answers: sha256 of its url and body as canonical
JSON (sorted keys, no spaces), so key order and spacing do not count and any other change does.

Resuming: a result line is written whole (one write, then flush) as soon as its request is done, so
a job killed at any moment leaves complete lines and at most one partial last line. On start the
partial line is cut off, and requests already answered are skipped if their digest is the input's
(`changed` lists the others: the command refuses them, or with --redo-changed `forget`s their
answers and answers them again). Ids are derived from the custom_id, so a request answered again
writes the same `id` and `request_id`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verispec.errors import UserError
from verispec.server.errors import APIError, bad_request

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
URLS = (COMPLETIONS, CHAT)

# What a result line is resumed by: its custom_id, or for a line naming none its line number (an
# int, so it never equals an id).
Key = str | int


@dataclass(frozen=True)
class InputLine:
    number: int  # 1-based line number in the input file
    raw: bytes  # the line as read, without its newline
    custom_id: str | None  # None when the line names none
    digest: str  # what identifies the request: see `request_digest`
    url: str | None = None
    body: Any = None
    problem: APIError | None = None  # why it cannot run at all (it gets this as its answer)

    @property
    def key(self) -> Key:
        return self.custom_id if self.custom_id is not None else self.number

    @property
    def name(self) -> str:
        """For messages and logs."""
        return repr(self.custom_id) if self.custom_id is not None else f"line {self.number} (no custom_id)"


def request_digest(item: Any) -> str:
    """sha256 of a request as canonical JSON: key order and spacing do not change it."""
    canonical = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def parse_line(number: int, raw: bytes) -> InputLine:
    """One request line; a line that is not a valid request carries the 400 it will be answered with."""

    def refused(message: str, custom_id: str | None = None, param: str | None = None) -> InputLine:
        # A refused line's answer depends on all of it: a line naming no id on its bytes, one
        # naming an id on what it holds besides the id (method included: it may be what is wrong).
        if custom_id is None:
            digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        else:
            digest = request_digest({k: v for k, v in item.items() if k != "custom_id"})
        return InputLine(number, raw, custom_id, digest, problem=bad_request(message, param=param))

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
    return InputLine(number, raw, custom_id, request_digest({"url": url, "body": body}), url, body)


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
        if line.custom_id is None:
            continue
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


def ids(line: InputLine) -> tuple[str, str]:
    """The result line's `id` and `request_id`: derived from the custom_id (or the number of a line
    naming none), so the same on a rerun."""
    if line.custom_id is not None:
        name = line.custom_id.encode("utf-8", "surrogatepass")
    else:  # 0xff starts no UTF-8 sequence: no custom_id hashes these bytes
        name = b"\xffline-%d" % line.number
    digest = hashlib.sha256(name).hexdigest()
    return "batch_req_" + digest[:24], digest[:32]


def result_line(line: InputLine, status: int, body: dict) -> str:
    """One output line, newline included."""
    line_id, request_id = ids(line)
    item: dict[str, Any] = {"id": line_id, "custom_id": line.custom_id}
    if line.custom_id is None:
        item["line"] = line.number
    item |= {
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
        "request_digest": line.digest,
    }
    try:
        return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8").decode() + "\n"
    except UnicodeEncodeError:  # a lone surrogate in a custom_id: escaped, the line stays valid JSON
        return json.dumps(item, separators=(",", ":")) + "\n"


def error_line(line: InputLine, error: APIError) -> str:
    return result_line(line, error.status, error.body())


def _record_key(raw: bytes) -> tuple[Key, str | None] | None:
    """A result line's key and request digest (None: written before digests were); None if it is
    not a result line."""
    try:
        item = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(item, dict):
        return None
    custom_id, number, digest = item.get("custom_id"), item.get("line"), item.get("request_digest")
    digest = digest if isinstance(digest, str) else None
    if isinstance(custom_id, str):
        return custom_id, digest
    if custom_id is None and type(number) is int:
        return number, digest
    return None


def resume(path: Path) -> dict[Key, str | None]:
    """What `path` already answers, each key with its request digest (None for a line written
    without one), after cutting off a partial last line (a write cut short by a kill). A missing
    file answers nothing."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise UserError(f"--output {path} is not a file")
    done: dict[Key, str | None] = {}
    complete = 0  # bytes of whole lines
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break
            complete += len(raw)
            if not raw.strip():
                continue
            record = _record_key(raw)
            if record is None:
                raise UserError(
                    f"{path} line {number} is not a batch result line, so it cannot be resumed; "
                    "move the file aside or choose another --output"
                )
            key, digest = record
            # Two answers of one key for different requests (a file appended to by hand): "" is no
            # request's digest, so the key counts as changed.
            done[key] = digest if done.get(key, digest) == digest else ""
    if complete < path.stat().st_size:
        os.truncate(path, complete)
    return done


def changed(lines: Iterable[InputLine], done: Mapping[Key, str | None]) -> list[InputLine]:
    """The lines `done` answers for another request than theirs, or without a digest to tell."""
    return [line for line in lines if line.key in done and done[line.key] != line.digest]


def describe_changed(lines: list[InputLine], done: Mapping[Key, str | None], output: Path) -> str:
    """Why the job refuses: which answers are not their requests', and what to do."""
    unknown = [line for line in lines if done[line.key] is None]
    other = [line for line in lines if done[line.key] is not None]

    def names(some: list[InputLine]) -> str:
        more = f" and {len(some) - 5} more" if len(some) > 5 else ""
        return ", ".join(line.name for line in some[:5]) + more

    parts = []
    if other:
        parts.append(
            f"{len(other)} request(s) changed since {output} answered them (same custom_id, another request): "
            + names(other)
        )
    if unknown:
        parts.append(
            f"{len(unknown)} answer(s) carry no request_digest (written by an older verispec), so whether their "
            f"requests changed cannot be told: {names(unknown)}"
        )
    return (
        "; ".join(parts) + "; rerun with --redo-changed to answer them again (their old answers are removed from "
        "the output), or choose another --output"
    )


def forget(path: Path, keys: set[Key]) -> None:
    """Remove the answers of `keys` from `path`, crash-safely: the rest is written to a temporary
    file beside it, which then replaces it, so a kill leaves either the old file or the new one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with path.open("rb") as old, os.fdopen(fd, "wb") as new:
            for raw in old:
                record = _record_key(raw) if raw.strip() else None
                if record is None or record[0] not in keys:
                    new.write(raw)
            new.flush()
            os.fsync(new.fileno())
        os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


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
