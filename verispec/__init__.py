"""verispec: exact speculative decoding.

A cheap proposer drafts tokens; the verifier scores them in one forward pass and keeps the
longest prefix it agrees with, so the output is the verifier's own.

The public names load on first use (module `__getattr__`): the engine imports torch and
transformers, several seconds, and every `verispec` command imports this package first, including
those that never load a model (`--help`, `audit`, `loadtest`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from verispec.lazy import lazy_names

if TYPE_CHECKING:
    from verispec.assemble import build_engine
    from verispec.config import SamplingParams, Settings, SpeculationSettings
    from verispec.core.engine import Engine
    from verispec.core.rounds import Completion, Delta
    from verispec.stats import RequestStats

_HOMES = {
    "Completion": "verispec.core.rounds",
    "Delta": "verispec.core.rounds",
    "Engine": "verispec.core.engine",
    "build_engine": "verispec.assemble",
    "RequestStats": "verispec.stats",
    "SamplingParams": "verispec.config",
    "Settings": "verispec.config",
    "SpeculationSettings": "verispec.config",
}

__all__ = [
    "Completion",
    "Delta",
    "Engine",
    "RequestStats",
    "SamplingParams",
    "Settings",
    "SpeculationSettings",
    "build_engine",
]
__version__ = "0.1.0"


__getattr__, __dir__ = lazy_names(__name__, _HOMES)
