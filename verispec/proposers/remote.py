"""A proposer that runs elsewhere: the drafts of an edge client, sent through the verify API.

The client drafts with its own model (or n-gram table) next to the user and sends up to k drafts
per round, with the distributions it drew them from when it samples. The server keeps the
request's KV between rounds and runs a round only once the client's drafts for it have arrived;
in between the request is parked: it takes no rows in a verifier pass and holds no running slot;
its cache blocks stay while memory allows and are the first to go when it runs short.
"""

from __future__ import annotations

from dataclasses import dataclass

from verispec.proposers.base import Proposal


@dataclass(eq=False)
class RemoteDrafts:
    """The client's drafts for the request's next round; None while the client is drafting (or
    its next call is on the wire). Set by the server's handler, taken by the engine thread."""

    pending: Proposal | None = None
    hint: int | None = None  # the depth the server's goodput model would give this session next

    @property
    def parked(self) -> bool:
        return self.pending is None

    def take(self, depth: int) -> Proposal:
        """The pending drafts, at most `depth` of them, for the round about to run."""
        proposal = self.pending or Proposal.empty()
        self.pending = None
        return proposal.cut(depth)
