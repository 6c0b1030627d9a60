"""The acceptance rule: which proposed tokens the verifier keeps, and the token it adds.

Vocabulary (used the same way in stats, metrics and tests):
- proposed: draft tokens the proposer offered this round (k of them);
- accepted: the longest prefix of them the verifier keeps;
- rejected: the proposed tokens not accepted (k - accepted);
- recovered: the verifier's own token at the first rejected position (the correction);
- bonus: the verifier's extra token after position k when all k were accepted.

Every round therefore emits `accepted + 1` tokens. Both rules take a batch dimension B so that
a batched engine can call them unchanged; all sequences in a batch share the depth k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verispec.core.sampling import sample


@dataclass(frozen=True)
class Verdict:
    accepted: torch.Tensor  # (B,) long: accepted draft tokens per sequence, 0..k
    next_token: torch.Tensor  # (B,) long: recovered token if accepted < k, else the bonus token


def accept_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Keep drafts while they equal the verifier's argmax; then add the verifier's argmax.

    draft_tokens (B, k), target_logits (B, k+1, V): row i scores the token after draft i-1.
    """
    return accept_chosen(draft_tokens, target_logits.argmax(dim=-1))


def accept_chosen(draft_tokens: torch.Tensor, target_tokens: torch.Tensor) -> Verdict:
    """Keep drafts while they equal the verifier's own choice at their position (its argmax, or its
    coupled draw: `sampling.PositionNoise`); then add the verifier's choice after them. A coupled
    draw is a sample of the verifier's distribution fixed by the seed and the position, so the
    output is exactly the verifier-only sample, whatever was drafted.

    draft_tokens (B, k), target_tokens (B, k+1).
    """
    agree = draft_tokens == target_tokens[:, :-1]  # (B, k)
    accepted = agree.long().cumprod(dim=-1).sum(dim=-1)  # (B,) length of the agreeing prefix
    next_token = target_tokens.gather(1, accepted[:, None]).squeeze(1)
    return Verdict(accepted, next_token)


def accept_stochastic(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Accept draft x with probability min(1, p_target(x) / p_draft(x)); at the first rejection draw
    the recovered token from the residual norm(max(0, p_target - p_draft)); if all are accepted,
    draw the bonus token from p_target at position k. The output is distributed exactly as
    sampling from p_target alone. `draft_probs` None means a point-mass proposer (p_draft(x) = 1).

    draft_tokens (B, k), draft_probs (B, k, V) or None, target_probs (B, k+1, V), warped alike.
    """
    batch, k = draft_tokens.shape
    if draft_probs is None:
        draft_probs = torch.zeros_like(target_probs[:, :k]).scatter_(-1, draft_tokens[..., None], 1.0)
    p_target = target_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # (B, k)
    p_draft = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)  # (B, k)
    u = torch.rand((batch, k), generator=generator, device=target_probs.device)
    keep = u * p_draft < p_target  # u < p_target / p_draft, without dividing by zero
    accepted = keep.long().cumprod(dim=-1).sum(dim=-1)  # (B,)

    # Distribution of the token after the accepted prefix: residual where a draft was rejected,
    # the plain target distribution at position k (bonus).
    residual = (target_probs[:, :k] - draft_probs).clamp_min(0.0)  # (B, k, V)
    residual = torch.cat([residual, target_probs[:, k:]], dim=1)  # (B, k+1, V)
    rows = torch.arange(batch, device=target_probs.device)
    next_dist = residual[rows, accepted]  # (B, V)
    mass = next_dist.sum(dim=-1, keepdim=True)
    # A rejection where p_target <= p_draft everywhere happens only through rounding; the target
    # distribution itself is then the right fallback.
    next_dist = torch.where(mass > 0, next_dist / mass.clamp_min(1e-30), target_probs[rows, accepted])
    return Verdict(accepted, sample(next_dist, generator))
