"""Proposers: the protocol, a draft model, and n-gram prompt lookup.

Proposers register a builder under a name; the name is resolved once, when the engine is built,
never in the speculative step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


ProposerBuilder = Callable[[ProposerInputs], Proposer]
REGISTRY: dict[str, ProposerBuilder] = {}


def register(name: str) -> Callable[[ProposerBuilder], ProposerBuilder]:
    def add(builder: ProposerBuilder) -> ProposerBuilder:
        REGISTRY[name] = builder
        return builder

    return add


@register("draft")
def _draft(inputs: ProposerInputs) -> Proposer:
    assert inputs.draft is not None, "the draft proposer needs a draft model"
    return DraftModelProposer(inputs.draft, target_vocab_size=inputs.target.vocab_size)


@register("ngram")
def _ngram(inputs: ProposerInputs) -> Proposer:
    return NgramProposer(inputs.speculation.ngram_max, inputs.speculation.ngram_min)


def build_proposer(name: str, inputs: ProposerInputs) -> Proposer | None:
    """The named proposer, or None for 'none' (verifier only)."""
    return None if name == "none" else REGISTRY[name](inputs)


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
