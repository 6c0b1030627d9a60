"""Logit warping shared by proposer and verifier, and a draft model's next-token draw.

Speculative sampling is exact only if the draft and the target distributions are warped the same
way (temperature, then top-k, then min-p, then top-p), so both sides call `warp` and nothing else.

Coupled sampling (`PositionNoise`): every output position has its own Gumbel noise, drawn from the
request's seed and the position alone. The token at a position is argmax(log p + noise), a sample
of p (the Gumbel-max trick). The verifier's token at a position is then fixed by the seed, whatever
drafted before it, and a draft model given the same noise draws the same token whenever its
distribution is close: a draft is accepted exactly when it equals the verifier's own draw.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
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


class PositionNoise:
    """Gumbel noise for each output position of one request, from its seed and the position only
    (not from a stream consumed in rounds), so that the draws do not depend on the depth, the
    proposer, the batch or the process. The verifier and a draft model ask for the same positions
    within a round; the noise of recent positions is kept for that."""

    def __init__(self, seed: int, vocab_size: int, device: torch.device | str = "cpu"):
        self.seed, self.vocab_size, self.device = seed, vocab_size, device
        self._kept: dict[int, torch.Tensor] = {}

    def __call__(self, position: int) -> torch.Tensor:
        noise = self._kept.get(position)
        if noise is None:
            generator = torch.Generator().manual_seed(_mix(self.seed, position))
            uniform = torch.rand(self.vocab_size, generator=generator).clamp_min_(2.0**-25)  # rand's lattice holds 0
            noise = (-torch.log(-torch.log(uniform))).to(self.device)
            if len(self._kept) >= 64:  # positions behind the verified ones are never asked for again
                del self._kept[min(self._kept)]
            self._kept[position] = noise
        return noise

    def choose(self, probs: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """(n, V) warped probabilities of positions -> (n,) tokens: each position's Gumbel-max draw."""
        noise = torch.stack([self(p)[: probs.shape[-1]] for p in positions])
        return (torch.log(probs) + noise).argmax(dim=-1)


def _mix(seed: int, position: int) -> int:
    """A 64-bit generator seed from a request seed and a position (splitmix64 of both)."""

    def splitmix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return x ^ (x >> 31)

    return splitmix(seed ^ splitmix(position))


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


def draw_draft(logits: torch.Tensor, policy: DraftPolicy, first: bool, position: int) -> tuple[int | None, torch.Tensor | None]:
    """The next draft token, for output position `position`, and, where the acceptance rule or an
    inspection needs it, its distribution; None once the draft's confidence falls below the
    policy's floor. A coupled request's draft draws with the verifier's noise for the position."""
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
        noise = policy.noise
        token = int(sample(dist, policy.generator)) if noise is None else int(noise.choose(dist[None], [position])[0])
    return token, dist if (not greedy or policy.want_probs) else None
