"""The proposer protocol.

A proposer drafts up to k tokens that continue a context. It may return the distribution each
draft token was drawn from (a draft model does); None means a point mass (an n-gram table does
not have one). A proposer owns whatever state it keeps (a draft model's KV cache) and never
touches the verifier's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from verispec.config import SamplingParams

if TYPE_CHECKING:
    from verispec.core.sampling import PositionNoise


def node_depths(parents: Sequence[int]) -> list[int]:
    """Per node of a tree in topological order (parents before children, -1 for the root), its depth."""
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return depths


@dataclass(frozen=True)
class Proposal:
    """Drafts: a chain of tokens, and, for a token tree, branches off it.

    The tree's nodes are numbered: 0 the last verified token (the root), 1..n the chain's tokens
    (node i's parent is i - 1), then the branches in order, each a (parent node, token) whose
    parent comes before it. A branch is a point mass (an alternative the proposer offers as it is,
    not a draw), so sampled acceptance tests it as one (`acceptance.accept_tree`)."""

    tokens: list[int]  # (n,) draft tokens, n <= depth
    probs: torch.Tensor | None = None  # (n, V) warped draft distributions, None = point mass
    branches: tuple[tuple[int, int], ...] = ()

    @classmethod
    def empty(cls) -> Proposal:
        return cls([])

    @property
    def nodes(self) -> list[int]:
        """Every draft token, chain first, then the branches' (node i + 1 is nodes[i])."""
        return self.tokens + [token for _, token in self.branches]

    def parents(self) -> list[int]:
        """Per node, root first, its parent node (-1 for the root)."""
        return [-1, *range(len(self.tokens)), *(parent for parent, _ in self.branches)]

    def depths(self) -> list[int]:
        """Per node, root first, its depth (the root's is 0)."""
        return node_depths(self.parents())

    @property
    def depth(self) -> int:
        """Drafts along its deepest path: the most a round can accept. The chain's length, unless
        a branch runs deeper than the chain (a chain cut short, by a stop token or the draft's
        confidence, under a branch that went on)."""
        return max(self.depths()) if self.branches else len(self.tokens)

    def cut(self, depth: int) -> Proposal:
        """At most `depth` drafts deep (a round may take fewer than were made)."""
        if len(self.tokens) <= depth and not self.branches:
            return self
        kept = Proposal(self.tokens[:depth], None if self.probs is None else self.probs[:depth])
        if not self.branches:
            return kept
        depths, renumber, branches = self.depths(), {i: i for i in range(len(kept.tokens) + 1)}, []
        for i, (parent, token) in enumerate(self.branches):
            node = len(self.tokens) + 1 + i
            if parent in renumber and depths[node] <= depth:
                renumber[node] = len(kept.tokens) + 1 + len(branches)
                branches.append((renumber[parent], token))
        return Proposal(kept.tokens, kept.probs, tuple(branches))

    def chain(self) -> Proposal:
        """The chain alone (where a round cannot take a tree)."""
        return Proposal(self.tokens, self.probs) if self.branches else self


@dataclass(frozen=True)
class DraftPolicy:
    """How one request wants its drafts made; fixed for the request's lifetime."""

    sampling: SamplingParams
    generator: torch.Generator | None = None  # the request's generator (rejection sampling's draft draws)
    noise: PositionNoise | None = None  # a coupled request's per-position noise (its draft draws use it)
    min_confidence: float = 0.0  # stop drafting once the draft's top probability falls below this
    time_budget_s: float = float("inf")  # stop drafting once a proposal has taken this long
    want_probs: bool = False  # return draft distributions even when greedy (inspected requests)
    width: int = 1  # candidates per draft position this round: above 1, a token tree (`Proposal.branches`)


class ProposerSession(Protocol):
    """Per-request proposer state. Contexts passed in one session only grow at the end,
    except for drafts the verifier rejected."""

    def propose(self, context: Sequence[int], depth: int, policy: DraftPolicy) -> Proposal: ...

    def reset(self) -> None:
        """Forget all state, e.g. after a failed proposal left it half-updated."""
        ...


class Proposer(Protocol):
    """A proposer: its name and a session per request. Two optional capabilities tell the batched
    engine how to run it; a plug-in without them is called off the engine thread, within its time
    budget, so that one that hangs holds no pass:

    - `inline` (default False): cheap enough (microseconds) to call on the engine thread;
    - `draft_model` (default None): a model the engine may run itself, for every request of a pass
      in one draft pass per position (`core/draft_batch.py`), instead of a session per request;
    - `head_model` (default None): a draft head, which the engine runs the same way
      (`core/head_batch.py`), feeding it the verifier's features (`HeadState.observe`); it has no
      session of its own.
    """

    name: str

    def session(self) -> ProposerSession: ...
