"""Example checkers for policy rules (`checker: verispec.policy.examples:shouting`).

An example of the interface, not a safety filter: a checker gets the whole verified text so far and
returns None (pass) or the offset where a violation starts. It runs after every chunk, so it
should be fast on long texts: a compiled regex, as here, or a model call that batches.
"""

from __future__ import annotations

import re

# 40 upper-case letters, each at most three spaces or punctuation marks from the next, so a shouted
# sentence counts and a lower-case letter ends the run. The two classes are disjoint: no backtracking blowup.
_SHOUTING = re.compile(r"[A-Z](?:[ \t,.;:!?'\"-]{0,3}[A-Z]){39}")


def shouting(text: str) -> int | None:
    """Where the first run of 40 or more upper-case (ASCII) letters starts, or None."""
    match = _SHOUTING.search(text)
    return match.start() if match else None
