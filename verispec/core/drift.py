"""Looking inside a round: where proposer and verifier disagree, and how far apart they are.

Only sampled requests are inspected (the server's `--mismatch-sample-rate`): it needs the full
verifier distribution at each verified draft position and, for a draft model, the draft's own,
which greedy drafting otherwise never computes.

A *verified* draft position is one the verifier judged: the accepted drafts and the first
rejected one; drafts after a rejection were never judged and say nothing.

Drift is measured at every verified position, so it shows before acceptance collapses (a draft
can keep winning the argmax while its distribution wanders):
- total variation  TV(p, q) = 1/2 sum |p - q|, in [0, 1];
- KL(p || q) = sum p log(p / q) in nats, p the proposer's, q the verifier's distribution.
A proposer without a distribution (n-gram) is a point mass on its token x: TV = 1 - q(x),
KL = -log q(x). Greedy requests compare the unwarped (temperature 1) distributions; sampled
requests the warped ones, which are what acceptance uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mismatch:
    """The first rejected draft of a round."""

    position: int  # index in the output, 0 = first generated token
    draft_token: int
    verifier_token: int  # the recovered token that replaced it
    draft_prob: float  # proposer's probability of its own token (1 for a point mass)
    verifier_prob: float  # verifier's probability of the draft token
    verifier_token_prob: float  # verifier's probability of its own token


@dataclass(frozen=True)
class Inspection:
    total_variation: list[float]  # per verified draft position
    kl_divergence: list[float]
    mismatch: Mismatch | None


def inspect_round(
    drafts: list[int],
    draft_probs: torch.Tensor | None,  # (k, V) or None for a point-mass proposer
    target_probs: torch.Tensor,  # (k+1, V) verifier distributions
    accepted: int,
    next_token: int,
    first_position: int,  # output index of the first draft
) -> Inspection:
    judged = min(accepted + 1, len(drafts))
    tv, kl = [], []
    for i in range(judged):
        q = target_probs[i].double()
        x = drafts[i]
        if draft_probs is None:
            q_x = float(q[x])
            tv.append(1.0 - q_x)
            kl.append(-float(torch.log(q[x].clamp_min(1e-300))))
        else:
            p = draft_probs[i].double()
            tv.append(0.5 * float((p - q).abs().sum()))
            support = p > 0
            kl.append(float((p[support] * (p[support].log() - q[support].clamp_min(1e-300).log())).sum()))
    mismatch = None
    if accepted < len(drafts):
        i, x = accepted, drafts[accepted]
        mismatch = Mismatch(
            position=first_position + i,
            draft_token=x,
            verifier_token=next_token,
            draft_prob=1.0 if draft_probs is None else float(draft_probs[i, x]),
            verifier_prob=float(target_probs[i, x]),
            verifier_token_prob=float(target_probs[i, next_token]),
        )
    return Inspection(tv, kl, mismatch)
