"""The proposers' names, in a module that imports nothing: settings (`verispec.config`) check a
`--proposer` or `--proposers` value against them without loading a proposer, or torch.

A new proposer adds its name here and registers its builder under it (`verispec.proposers.register`
refuses a name missing here, and a test checks that every name here has a builder).
"""

from __future__ import annotations

# name -> what it proposes with, as help texts put it
PROPOSERS = {
    "draft": "a draft model",
    "ngram": "n-gram prompt lookup",
}
PROPOSER_NAMES = tuple(PROPOSERS)
VERIFIER_ONLY = "none"  # no proposer: every round is one verifier token


def described(names: tuple[str, ...] = PROPOSER_NAMES) -> str:
    """'draft (a draft model), ngram (n-gram prompt lookup), none (verifier only)': for help texts."""
    return ", ".join([*(f"{name} ({PROPOSERS[name]})" for name in names), f"{VERIFIER_ONLY} (verifier only)"])
