"""How a request ended: the one list the server writes (audit records, logs, spans, the
`request_outcomes` metric) and `verispec audit --outcome` selects from."""

from __future__ import annotations

from typing import Literal, get_args

Outcome = Literal[
    "ok",
    "fallback",  # ok, some rounds verifier-only (the proposer failed or timed out); the metric says ok
    "error",
    "cancelled",  # the client went away, or the server shut down
    "deadline",  # past --deadline-s
    "rejected",  # refused before it was queued (bad input, key, rate limit, not ready)
    "expired",  # a verify-API session idle past --verify-idle-s
    "content_filter",  # stopped by the policy gate
]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
