"""Proposers: the protocol, a draft model, and n-gram prompt lookup.

Proposers register a builder under a name; the name is resolved once, when the engine is built,
never in the speculative step. The names live in `names.py`, which settings read; so that reading
them costs nothing, this package imports no proposer (nor torch) until one is used: the classes
below load on first use (module `__getattr__`), and each builder imports its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from verispec.lazy import lazy_names
from verispec.proposers.names import PROPOSER_NAMES, VERIFIER_ONLY

if TYPE_CHECKING:
    from verispec.config import SpeculationSettings
    from verispec.models.backend import CausalLM
    from verispec.proposers.base import DraftPolicy, Proposal, Proposer, ProposerSession
    from verispec.proposers.draft import DraftModelProposer
    from verispec.proposers.ngram import NgramProposer


@dataclass(frozen=True)
class ProposerInputs:
    """What a proposer builder may use."""

    target: CausalLM
    draft: CausalLM | None
    speculation: SpeculationSettings


ProposerBuilder = Callable[[ProposerInputs], "Proposer"]
REGISTRY: dict[str, ProposerBuilder] = {}


def register(name: str) -> Callable[[ProposerBuilder], ProposerBuilder]:
    if name not in PROPOSER_NAMES:  # settings would refuse the name before its builder is ever asked
        raise ValueError(f"proposer {name!r}: add it to verispec/proposers/names.py, which settings check names against")

    def add(builder: ProposerBuilder) -> ProposerBuilder:
        REGISTRY[name] = builder
        return builder

    return add


@register("draft")
def _draft(inputs: ProposerInputs) -> Proposer:
    from verispec.proposers.draft import DraftModelProposer

    assert inputs.draft is not None, "the draft proposer needs a draft model"
    return DraftModelProposer(inputs.draft, target_vocab_size=inputs.target.vocab_size)


@register("ngram")
def _ngram(inputs: ProposerInputs) -> Proposer:
    from verispec.proposers.ngram import NgramProposer

    return NgramProposer(inputs.speculation.ngram_max, inputs.speculation.ngram_min)


def build_proposer(name: str, inputs: ProposerInputs) -> Proposer | None:
    """The named proposer, or None for 'none' (verifier only)."""
    return None if name == VERIFIER_ONLY else REGISTRY[name](inputs)


_HOMES = {
    "DraftModelProposer": "verispec.proposers.draft",
    "DraftPolicy": "verispec.proposers.base",
    "NgramProposer": "verispec.proposers.ngram",
    "Proposal": "verispec.proposers.base",
    "Proposer": "verispec.proposers.base",
    "ProposerSession": "verispec.proposers.base",
}


__getattr__, __dir__ = lazy_names(__name__, _HOMES)


__all__ = [
    "REGISTRY",
    "DraftModelProposer",
    "DraftPolicy",
    "NgramProposer",
    "Proposal",
    "Proposer",
    "ProposerInputs",
    "ProposerSession",
    "build_proposer",
    "register",
]
