"""Errors a user can cause, as opposed to bugs.

A `UserError` carries one line that says what is wrong and what to do; the CLI prints it and
exits 2, the server (later) maps it to a 400. Anything else that escapes is a bug.
"""


class UserError(Exception):
    """Bad input: a missing model, a bad flag value, an empty prompt, an incompatible pair."""


class ProposerError(Exception):
    """A proposer could not propose this round; the engine falls back to the verifier alone."""
