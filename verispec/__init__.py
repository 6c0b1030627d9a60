"""verispec: exact speculative decoding.

A cheap proposer drafts tokens; the verifier scores them in one forward pass and keeps the
longest prefix it agrees with, so the output is the verifier's own.
"""

from verispec.config import SamplingParams, Settings, SpeculationSettings
from verispec.engine import Completion, Delta, SpeculativeEngine
from verispec.stats import RequestStats

__all__ = [
    "Completion",
    "Delta",
    "RequestStats",
    "SamplingParams",
    "Settings",
    "SpeculationSettings",
    "SpeculativeEngine",
]
__version__ = "0.1.0"
