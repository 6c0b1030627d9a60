"""Proposers: the protocol, a draft model, a draft head, n-gram prompt lookup and a suffix cache of earlier requests.

Each proposer is a row of one table, `names.py`: its name, what it proposes with, and its
builder as a "module:function" string. Settings read the names there without importing any
proposer. `build_proposer` resolves the name once, when the engine is built, never in the
speculative step, and imports only that proposer's builder. The classes below load on first use
(module `__getattr__`), so that importing this package costs nothing either. A plug-in adds a
proposer with `register(name, description, "package.module:build")` before `verispec.config` is
imported; see `names.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from verispec.lazy import lazy_names
from verispec.proposers import names
from verispec.proposers.names import register

if TYPE_CHECKING:
    from verispec.config import SpeculationSettings
    from verispec.models.backend import CausalLM
    from verispec.models.head import DraftHead
    from verispec.proposers.base import DraftPolicy, Proposal, Proposer, ProposerSession
    from verispec.proposers.draft import DraftModelProposer
    from verispec.proposers.head import HeadProposer
    from verispec.proposers.ngram import NgramProposer
    from verispec.proposers.suffix import SuffixProposer


@dataclass(frozen=True)
class ProposerInputs:
    """What a proposer builder may use."""

    target: CausalLM
    draft: CausalLM | None
    speculation: SpeculationSettings
    head: DraftHead | None = None  # a draft head (`--draft` naming a head's folder)


ProposerBuilder = Callable[[ProposerInputs], "Proposer"]


def builder(name: str) -> ProposerBuilder:
    """The builder of proposer `name`, imported from where its row in `names.PROPOSERS` says."""
    module, _, function = names.PROPOSERS[name].builder.partition(":")
    return getattr(importlib.import_module(module), function)


def build_proposer(name: str, inputs: ProposerInputs) -> Proposer | None:
    """The named proposer, or None for 'none' (verifier only)."""
    return None if name == names.VERIFIER_ONLY else builder(name)(inputs)


_HOMES = {
    "DraftModelProposer": "verispec.proposers.draft",
    "DraftPolicy": "verispec.proposers.base",
    "HeadProposer": "verispec.proposers.head",
    "NgramProposer": "verispec.proposers.ngram",
    "Proposal": "verispec.proposers.base",
    "Proposer": "verispec.proposers.base",
    "ProposerSession": "verispec.proposers.base",
    "SuffixProposer": "verispec.proposers.suffix",
}


__getattr__, __dir__ = lazy_names(__name__, _HOMES)


__all__ = [
    "DraftModelProposer",
    "DraftPolicy",
    "HeadProposer",
    "NgramProposer",
    "Proposal",
    "Proposer",
    "ProposerInputs",
    "ProposerSession",
    "SuffixProposer",
    "build_proposer",
    "builder",
    "register",
]
