"""The edge client: a local proposer drafting against a remote verifier (`verispec edge`, `EdgeClient`).

The client's names load on first use (module `__getattr__`): it imports torch, and the CLI's
parser is built from `command.py` in this package without loading a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from verispec.lazy import lazy_names

if TYPE_CHECKING:
    from verispec.edge.client import EdgeClient, EdgeError, EdgeStats

__all__ = ["EdgeClient", "EdgeError", "EdgeStats"]


__getattr__, __dir__ = lazy_names(__name__, dict.fromkeys(__all__, "verispec.edge.client"))
