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


@dataclass(frozen=True)
class TreeVerdict:
    path: list[int]  # the accepted nodes, root excluded, in order (`Proposal` numbers them)
    next_token: int  # recovered after the path's last node, or the bonus below a leaf


def accept_tree_chosen(children: list[list[int]], nodes: list[int], target_tokens: list[int]) -> TreeVerdict:
    """Walk the tree from the root while a child holds the verifier's own choice after its node
    (its argmax, or its coupled draw): the longest path that matches, then that choice.
    children[v]: node v's children; nodes[v]: node v's token (the root's unused); target_tokens[v]:
    the verifier's choice after node v."""
    path, node = [], 0
    while True:
        chosen = target_tokens[node]
        child = next((c for c in children[node] if nodes[c] == chosen), None)
        if child is None:
            return TreeVerdict(path, chosen)
        path.append(child)
        node = child


def accept_tree_stochastic(
    children: list[list[int]],
    nodes: list[int],
    draft_probs: torch.Tensor | None,
    chain: int,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> TreeVerdict:
    """Multi-draft speculative sampling over a tree (SpecInfer, Miao et al. 2024; SpecTr, Sun et
    al. 2023): at each node its children are tried in order against what is left of the target
    distribution. The chain's child (a draw from draft_probs, nodes 1..chain) is accepted with
    probability min(1, p(x) / q(x)) and on rejection leaves the residual norm(max(0, p - q)); a
    branch is a point mass offered as it is, so it is accepted with probability r(y) under the
    current residual r and on rejection leaves r with y removed. Each try samples the residual
    exactly whatever the candidates (which depend only on the draft), so the token after the last
    accepted node, drawn from the final residual, is distributed exactly as the target's sample:
    the output is the verifier's distribution, as `accept_stochastic`'s is for a chain.

    draft_probs (chain, V) or None (point masses); target_probs (nodes, V), row v the target's
    distribution after node v (the root's first)."""
    path, node = [], 0
    while True:
        residual = target_probs[node]
        accepted = None
        for child in children[node]:
            x = nodes[child]
            u = float(torch.rand((), generator=generator, device=residual.device))
            q = draft_probs[child - 1] if draft_probs is not None and child <= chain else None
            if q is None:  # a point mass: accepted with probability r(x)
                if u < float(residual[x]):
                    accepted = child
                    break
                residual = residual.clone()
                residual[x] = 0.0
            else:
                if u * float(q[x]) < float(residual[x]):
                    accepted = child
                    break
                residual = (residual - q).clamp_min(0.0)
            mass = residual.sum()
            # No mass left happens only through rounding; the target distribution is then the fallback.
            residual = residual / mass if mass > 0 else target_probs[node]
        if accepted is None:
            return TreeVerdict(path, int(sample(residual[None], generator)[0]))
        path.append(accepted)
        node = accepted


def tree_children(parents: list[int]) -> list[list[int]]:
    """Per node its children, in node order (the chain's child first)."""
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents):
        if parent >= 0:
            children[parent].append(node)
    return children
