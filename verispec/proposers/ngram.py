"""Prompt lookup: a proposer without a model.

Find the most recent earlier occurrence of the context's last n tokens (longest n first) and
propose the tokens that followed it. Code and documents repeat themselves, so this is often right
and costs microseconds. It has no distribution: its proposals are point masses.

Where what followed runs into the suffix itself, the text repeats with a period shorter than the
draft (a loop, a run of one token), and the draft goes on repeating it (`follow`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from verispec.core.repeats import follow
from verispec.proposers.base import DraftPolicy, Proposal

if TYPE_CHECKING:
    from verispec.proposers import ProposerInputs


def build(inputs: ProposerInputs) -> NgramProposer:
    """The "ngram" proposer's builder (its row in `verispec/proposers/names.py` names it)."""
    return NgramProposer(inputs.speculation.ngram_max, inputs.speculation.ngram_min)


class NgramProposer:
    name = "ngram"
    inline = True  # microseconds of numpy: the batched engine calls it on its own thread
    draft_model = None

    def __init__(self, max_ngram: int, min_ngram: int):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {min_ngram} and {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def session(self) -> NgramProposer:
        return self  # stateless

    def reset(self) -> None:
        pass

    def propose(self, context: Sequence[int], depth: int, policy: DraftPolicy | None = None) -> Proposal:
        return Proposal(lookup(np.asarray(context, dtype=np.int64), depth, self.max_ngram, self.min_ngram))


def lookup(context: np.ndarray, depth: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to `depth` tokens that followed the latest earlier match of the context's suffix."""
    if depth <= 0:
        return []
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        suffix = context[-n:]
        # Windows over context[:-1] end before the suffix itself, so every match has a follower.
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)  # (L-n, n)
        matches = np.flatnonzero((windows == suffix).all(axis=1))
        if matches.size:
            return follow(context, int(matches[-1]) + n, depth)
    return []
