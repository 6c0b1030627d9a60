"""Logit warping shared by proposer and verifier, and a draft model's next-token draw.

Speculative sampling is exact only if the draft and the target distributions are warped the same
way (temperature, then top-k, then top-p, in the order Hugging Face applies them), so both sides
call `warp` and nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from verispec.config import SamplingParams

if TYPE_CHECKING:
    from verispec.proposers.base import DraftPolicy


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities under `params` (temperature > 0)."""
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p; the first always stays.
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        outside[..., 0] = False  # the most likely stays even when top_p underflows float32 to 0
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(..., V) probabilities -> (...) token ids drawn with `generator`."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def request_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """One generator per request: every random draw of the request (draft sampling, acceptance
    tests, recovered and bonus tokens) comes from it in a fixed order, so a seed reproduces the output."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def align_vocab(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Draft logits over the target's vocabulary width (embedding matrices are often padded)."""
    if logits.shape[-1] == width:
        return logits
    if logits.shape[-1] > width:
        return logits[..., :width]
    return torch.nn.functional.pad(logits, (0, width - logits.shape[-1]), value=float("-inf"))


def draw_draft(logits: torch.Tensor, policy: DraftPolicy, first: bool) -> tuple[int | None, torch.Tensor | None]:
    """The next draft token and, where the acceptance rule or an inspection needs it, its
    distribution; None once the draft's confidence falls below the policy's floor."""
    greedy = policy.sampling.greedy
    if greedy:
        token = int(logits.argmax())
        dist = torch.softmax(logits.float(), dim=-1) if policy.min_confidence > 0 or policy.want_probs else None
        confidence = float(dist[token]) if dist is not None else 1.0
    else:
        dist = warp(logits, policy.sampling)
        confidence = float(dist.max())
    if not first and confidence < policy.min_confidence:
        return None, None
    if not greedy:
        token = int(sample(dist, policy.generator))
    return token, dist if (not greedy or policy.want_probs) else None
