"""The proposer registry: one table that holds, for each proposer name, what it proposes with (for
help texts) and where its builder lives. The table is all strings, and this module imports no
proposer, no torch and no other verispec module. So settings (`verispec.config`) can check a
`--proposer` or `--proposers` value against the names without loading a proposer, and
`verispec.proposers.build_proposer` imports a builder only when that proposer is built.

A builder is a "module:function" string. The function takes a `verispec.proposers.ProposerInputs`
and returns a `Proposer` (see `verispec/proposers/base.py`).

A built-in proposer adds its row to `PROPOSERS` below. A plug-in calls
`register(name, description, "package.module:build")` (also exported as `verispec.proposers.register`),
which adds a row to the same table. Settings read the names once, when `verispec.config` is first
imported, so a plug-in must register before that. `register` refuses any later call, because
settings would reject the name anyway. The registering code must therefore not import
`verispec.proposers.base`, which imports `verispec.config`. The builder's module is imported only
at build time, so it may import anything. docs/how-it-works.md ("Adding a proposer") has an example.
"""

from __future__ import annotations

import sys
from typing import NamedTuple


class Registered(NamedTuple):
    description: str  # what it proposes with, as help texts put it
    builder: str  # "module:function": the function builds the proposer from a ProposerInputs


PROPOSERS: dict[str, Registered] = {
    "draft": Registered("a draft model", "verispec.proposers.draft:build"),
    "ngram": Registered("n-gram prompt lookup", "verispec.proposers.ngram:build"),
    "suffix": Registered("a suffix cache of earlier requests' text", "verispec.proposers.suffix:build"),
    "head": Registered("a draft head on the verifier's features", "verispec.proposers.head:build"),
}
PROPOSER_NAMES = tuple(PROPOSERS)
VERIFIER_ONLY = "none"  # no proposer: every round is one verifier token
AUTO = "auto"  # settings' default: the draft model if one is given, else ngram
SETTINGS_MODULE = "verispec.config"  # reads the names once, when it is imported


def register(name: str, description: str, builder: str) -> None:
    """Add proposer `name`, built by `builder` ("module:function", imported when the proposer is
    first built), to the table that settings check names against. Call this before `verispec.config`
    is imported."""
    global PROPOSER_NAMES
    if SETTINGS_MODULE in sys.modules:
        raise RuntimeError(
            f"proposer {name!r}: register it before verispec.config is imported (settings have already read the proposer names)"
        )
    if not name or any(c == "," or c.isspace() for c in name):
        raise ValueError(
            f"proposer {name!r}: a name is one word without commas (lists of names are comma-separated)"
        )
    if name in PROPOSERS or name in (VERIFIER_ONLY, AUTO):
        raise ValueError(f"proposer {name!r} is already taken")
    module, _, function = builder.partition(":")
    if not module or not function:
        raise ValueError(f"proposer {name!r}: the builder {builder!r} is not 'module:function'")
    PROPOSERS[name] = Registered(description, builder)
    PROPOSER_NAMES = tuple(PROPOSERS)


def described() -> str:
    """'draft (a draft model), ngram (n-gram prompt lookup), none (verifier only)': for help texts."""
    return ", ".join(
        [
            *(f"{name} ({entry.description})" for name, entry in PROPOSERS.items()),
            f"{VERIFIER_ONLY} (verifier only)",
        ]
    )
