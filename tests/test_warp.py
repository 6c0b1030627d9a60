"""`warp` against transformers' own logits processors: temperature, then top-k, then top-p, the
order `generate()` applies them in, give the same distribution (ties aside, which random logits
do not have)."""

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from verispec.config import SamplingParams
from verispec.core.sampling import warp


def reference(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.9), (0.8, 20, 0.5), (0.5, 3, 0.95), (2.0, 0, 0.3)],
)
def test_warp_matches_transformers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(round(temperature * 100) + top_k + round(top_p * 10))
    logits = torch.randn(8, 200, generator=g) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    ours, theirs = warp(logits, params), reference(logits, params)
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens kept
    assert torch.allclose(ours, theirs, atol=1e-6)
