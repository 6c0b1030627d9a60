"""Verify sessions on a deployment: a session's KV and state live in the replica that opened it,
so its id names that replica, and every later round is routed there.

- `new_session_id(replica)` is the id the verify API answers: "vs-<replica>-<hex>" in a replica of
  a deployment, "vs-<hex>" in a single server; `owner(session_id)` reads the replica back;
- the proxy's middleware (`faults.py`) already holds each request's body: for a round of
  /v1/verify it puts the body's session_id in Ray Serve's session header (`with_session_header`),
  which Ray's proxy carries on the request's metadata;
- `router.SessionRouter`, the deployment's request router, sends a request whose session names a
  live replica to that replica, and everything else by Ray's power of two choices.

No Ray here: the verify API imports it in a single server too.
"""

from __future__ import annotations

import json
import os
import uuid

PREFIX = "vs-"
VERIFY_PATH = "/v1/verify"
# Ray Serve's proxy reads a request's session id from this header (RAY_SERVE_SESSION_ID_HEADER_KEY,
# as Ray itself reads it, so one setting names it for both).
SESSION_HEADER = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id")
MAX_PARSED_BYTES = 1024 * 1024  # a larger body is not read for its session id (the replica refuses it anyway)


def new_session_id(replica: str | None = None) -> str:
    """A new session's id, naming the replica that holds it when there is one."""
    return f"{PREFIX}{replica}-{uuid.uuid4().hex}" if replica else PREFIX + uuid.uuid4().hex


def owner(session_id: str | None) -> str | None:
    """The replica a session id names; None for a single server's id or anything else."""
    if not session_id or not session_id.startswith(PREFIX):
        return None
    replica, _, rest = session_id[len(PREFIX) :].rpartition("-")
    return replica if replica and rest else None


def _is_session_header(name: bytes) -> bool:
    # Ray matches the header's name case-blind, with "-" and "_" alike.
    return name.decode("latin-1").lower().replace("-", "_") == SESSION_HEADER.lower().replace("-", "_")


def with_session_header(scope: dict, messages: list[dict]) -> dict:
    """`scope` for a /v1/verify call whose body is `messages`: the session header set to the body's
    session_id when it names a replica, and never one the client sent (a round is routed by the
    session it continues, nothing else)."""
    headers = [(k, v) for k, v in scope.get("headers", []) if not _is_session_header(k)]
    session_id = _session_id(b"".join(m.get("body", b"") for m in messages))
    if session_id is not None:
        headers.append((SESSION_HEADER.lower().encode(), session_id.encode()))
    return {**scope, "headers": headers}


def _session_id(body: bytes) -> str | None:
    if len(body) > MAX_PARSED_BYTES:
        return None
    try:
        session_id = json.loads(body).get("session_id")
    except (ValueError, AttributeError):  # not JSON, or not an object: the replica answers 400
        return None
    if not isinstance(session_id, str) or not session_id.isascii() or not session_id.isprintable():
        return None
    return session_id if owner(session_id) is not None else None
