"""Logit warping shared by proposer and verifier.

Speculative sampling is exact only if the draft and the target distributions are warped the same
way (temperature, then top-k, then top-p, in the order Hugging Face applies them), so both sides
call `warp` and nothing else.
"""

from __future__ import annotations

import torch

from verispec.config import SamplingParams


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
