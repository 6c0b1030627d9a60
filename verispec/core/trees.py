"""Token trees: how wide a round's tree is, and how a batched drafter grows one.

A tree is a chain of drafts with branches off it (`Proposal.branches`), grown by a draft model
or a draft head as EAGLE-2 does (`Growth`): where the verifier disagrees with the chain, its token
may still be on a branch, and the round goes on down that branch. The verifier scores every node
in one pass with tree attention (`csrc/layer_ops.c`: each node sees the context and its own path,
with the bits its path gets as a chain), and the accepted path's keys and values are moved into
place (`ModelRunner.keep_path`).

Width costs verifier rows: up to (width - 1) per draft position. They are cheap while the pass is
narrow, where a pass costs its weights' reading more than its rows, and dear once the batch
fills it, so widths shrink until the pass with them costs at most TREE_SLOWDOWN more than
without (by the measured pass costs).
"""

from __future__ import annotations

import torch

from verispec.core.goodput import PassCosts
from verispec.proposers.base import Proposal

TREE_SLOWDOWN = 0.2  # how much dearer the alternatives may make a pass


def choose_widths(wanted: dict, depths: dict, costs: PassCosts, base_rows: int) -> dict:
    """Each request's width this round: its wanted width, narrowed (the widest first) until the
    alternatives' rows cost at most TREE_SLOWDOWN of the pass without them."""
    widths = dict(wanted)
    limit = (1 + TREE_SLOWDOWN) * costs.verify(base_rows)

    def extra() -> int:
        return sum((w - 1) * depths[r] for r, w in widths.items())

    while widths and costs.verify(base_rows + extra()) > limit:
        widest = max(widths, key=lambda r: (widths[r] - 1) * depths[r])
        widths[widest] -= 1
        if widths[widest] == 1:
            del widths[widest]
    return widths


class Growth:
    """One request's dynamic token tree (EAGLE-2, Li et al. 2024), grown a level per draft pass.

    Nodes are numbered as `Proposal` numbers them in the end: 0 is the root (the last verified
    token), and every node has its cumulative log-probability under the draft. Each level expands
    the `width` likeliest nodes of the last level (its frontier) with their `width` likeliest
    tokens; the likeliest `width` of those form the next frontier. The drafter feeds the fed nodes
    (the root and every frontier so far) as one tree segment (`segment`): each node's draft row
    sees its own path only. In the end the `budget` likeliest nodes, which include their
    ancestors (a child is never likelier than its parent), are the proposal: the likeliest path
    as its chain, the rest as branches. Every node is a point mass (the draft's choice as it is),
    which sampled acceptance tests exactly (`acceptance.accept_tree_stochastic`)."""

    def __init__(self, root: int, width: int, depth: int):
        self.width, self.depth = width, depth
        self.tokens, self.parents, self.logp, self.levels = [root], [-1], [0.0], [0]
        self.fed = [0]  # nodes in the drafter's segment, root first, parents before children
        self.frontier = [0]
        self.hidden: dict[int, torch.Tensor] = {}  # per fed node, what a draft head predicted there

    @property
    def growing(self) -> bool:
        return bool(self.frontier) and self.levels[self.frontier[0]] < self.depth

    def segment(self) -> tuple[list[int], list[int], list[int]]:
        """The fed nodes as a tree segment: their tokens, each one's parent row, and the rows of
        the frontier (whose draft rows the next level reads)."""
        row = {node: i for i, node in enumerate(self.fed)}
        parents = [-1 if self.parents[v] < 0 else row[self.parents[v]] for v in self.fed]
        return [self.tokens[v] for v in self.fed], parents, [row[v] for v in self.frontier]

    def expand(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The next level from the frontier's draft rows, in frontier order: per node its
        `width` likeliest tokens and their log-probabilities, (width,) each."""
        candidates = []
        for node, (tokens, logps) in zip(self.frontier, rows, strict=True):
            for token, logp in zip(tokens.tolist(), logps.tolist(), strict=True):
                self.tokens.append(int(token))
                self.parents.append(node)
                self.logp.append(self.logp[node] + float(logp))
                self.levels.append(self.levels[node] + 1)
                candidates.append(len(self.tokens) - 1)
        candidates.sort(key=lambda v: -self.logp[v])
        self.frontier = candidates[: self.width]
        self.fed += self.frontier

    def proposal(self, budget: int) -> Proposal:
        """The `budget` likeliest nodes as a Proposal: the likeliest path for its chain."""
        chosen = sorted(range(1, len(self.tokens)), key=lambda v: (-self.logp[v], v))[:budget]
        kept = set(chosen)
        chain, node = [], 0
        while True:
            children = [v for v in chosen if self.parents[v] == node]
            if not children:
                break
            node = max(children, key=lambda v: (self.logp[v], -v))
            chain.append(node)
        number = {0: 0, **{v: i + 1 for i, v in enumerate(chain)}}
        branches = []
        for v in sorted(kept - set(chain), key=lambda v: (self.levels[v], v)):  # parents before children
            number[v] = len(chain) + 1 + len(branches)
            branches.append((number[self.parents[v]], self.tokens[v]))
        return Proposal([self.tokens[v] for v in chain], None, tuple(branches))


def top_tokens(logits: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A draft row's `width` likeliest tokens (ids of the row) and their log-probabilities."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logps, min(width, logps.shape[-1]))
    return top.indices, top.values


def chain_prefix(path: list[int]) -> int:
    """How many of an accepted path's nodes are the chain's (nodes 1, 2, ... in order)."""
    n = 0
    while n < len(path) and path[n] == n + 1:
        n += 1
    return n
