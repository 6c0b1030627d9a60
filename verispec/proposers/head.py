"""A draft head (`models/head.py`) as the proposer: drafts from the verifier's own features.

The engine hands each request's session the verifier's features as its passes compute them
(`observe`: a prompt chunk's rows, and a round's verified rows); a proposal first feeds the head
every verified position it has not read, then drafts one token per head pass, feeding its own
predicted feature back. Positions fed with drafts are rolled back at the next proposal, as a
draft model's cache is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from verispec.core.sampling import draw_draft
from verispec.errors import ProposerError, UserError
from verispec.models.head import DraftHead
from verispec.proposers.base import DraftPolicy, Proposal

if TYPE_CHECKING:
    from verispec.proposers import ProposerInputs


def build(inputs: ProposerInputs) -> HeadProposer:
    """The "head" proposer's builder (its row in `verispec/proposers/names.py` names it)."""
    if inputs.head is None:
        raise UserError(
            "--proposer head needs a draft head: pass --draft PATH, a folder made by verispec distill --head"
        )
    return HeadProposer(inputs.head)


class HeadProposer:
    inline = True  # our own kernels, a one-layer pass per draft: on the engine thread, like its passes
    reads_features = True  # the engine gives its sessions the verifier's features (`HeadSession.observe`)

    def __init__(self, head: DraftHead):
        self.head = head
        self.name = f"head:{head.name}"

    def session(self) -> HeadSession:
        return HeadSession(self.head)


class HeadSession:
    """One request's head cache and the verifier's features of its verified positions.

    Position t of the head's cache was fed [token t+1, feature t]. `fed` positions hold verified
    inputs only (the verifier's features and verified tokens); positions past them were fed drafts
    and are rolled back at the next proposal."""

    def __init__(self, head: DraftHead):
        self.head = head
        self.cache = head.session()
        self.features = torch.empty((0, head.embed.shape[1]), device=head.device)
        self.known = 0  # positions 0..known-1 have the verifier's features
        self.fed = 0

    def reset(self) -> None:
        self.cache = self.head.session()
        self.known = self.fed = 0

    def observe(self, start: int, rows: torch.Tensor) -> None:
        """The verifier's features of positions start.. (rows (n, D)). A start before what is known
        (a preempted request recomputed) replaces what follows."""
        if start > self.known:  # a gap: nothing past it can be fed until it is filled
            raise ProposerError(f"verifier features from position {start}, but only {self.known} are known")
        end = start + rows.shape[0]
        if end > self.features.shape[0]:
            grown = torch.empty(
                (max(end, 2 * self.features.shape[0], 256), self.features.shape[1]), device=self.head.device
            )
            grown[: self.known] = self.features[: self.known]
            self.features = grown
        self.features[start:end] = rows
        self.known = end
        self.fed = min(self.fed, start)

    def blank(self, positions: int) -> None:
        """Zero features for positions 0..positions-1: what a draft costs does not depend on their
        values (the engine's calibration prices a proposer before any request has run)."""
        self.observe(0, torch.zeros((positions, self.features.shape[1]), device=self.head.device))

    def propose(self, context: Sequence[int], depth: int, policy: DraftPolicy) -> Proposal:
        started = time.perf_counter()
        head, L = self.head, len(context)
        if L < 2 or depth < 1:
            return Proposal.empty()  # a one-token context has no verified feature to start from
        if self.known < L - 1:
            raise ProposerError(f"the verifier's features reach position {self.known}, the context {L - 1}")
        if L + depth > self.cache.capacity:
            raise ProposerError(
                f"context of {L} tokens is beyond the draft head's window of {self.cache.capacity}"
            )
        self.cache.rollback(self.fed)
        ids = torch.tensor(context[self.fed + 1 : L], dtype=torch.long, device=head.device)
        feature, logits = head.run(self.cache, ids, self.features[self.fed : L - 1])
        self.fed = L - 1
        # Greedy drafts need no distribution over the verifier's vocabulary: the draft vocabulary's
        # argmax, mapped back, is the same token (d2t is sorted, so ties break alike).
        greedy = policy.sampling.greedy and not policy.want_probs
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for i in range(depth):
            token, dist = draw_draft(
                logits if greedy else head.target_logits(logits), policy, first=i == 0, position=L + i
            )
            if token is None:
                break  # the head is unsure; further tokens would mostly be rejected
            if greedy:
                token = int(head.d2t[token])
            tokens.append(token)
            if dist is not None:
                probs.append(dist)
            if i == depth - 1 or time.perf_counter() - started > policy.time_budget_s:
                break
            feature, logits = head.run(self.cache, torch.tensor([token], device=head.device), feature[None])
        return Proposal(tokens, torch.stack(probs) if probs else None)
