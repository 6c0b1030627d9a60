"""Drift and mismatch figures: the pure computation, and the engine reporting them without
changing a single output token."""

import math

import pytest
import torch

from tests.conftest import make_engine, random_prompts
from verispec.config import SamplingParams
from verispec.core.drift import inspect_round


def test_point_mass_proposer():
    q = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    got = inspect_round([0, 1], None, q, accepted=1, next_token=2, first_position=7)
    assert got.total_variation == pytest.approx([0.5, 0.9])
    assert got.kl_divergence == pytest.approx([math.log(2), -math.log(0.1)])
    m = got.mismatch
    assert (m.position, m.draft_token, m.verifier_token) == (8, 1, 2)
    assert (m.draft_prob, m.verifier_prob, m.verifier_token_prob) == pytest.approx((1.0, 0.1, 0.8))


def test_identical_distributions_have_no_drift_and_unjudged_positions_are_skipped():
    p = torch.tensor([[0.2, 0.3, 0.5]] * 3)
    got = inspect_round([2, 2, 2], p, torch.cat([p, p[:1]]), accepted=0, next_token=1, first_position=0)
    assert got.total_variation == pytest.approx([0.0])  # only the first (rejected) draft was judged
    assert got.kl_divergence == pytest.approx([0.0])
    assert got.mismatch.verifier_token == 1


def test_all_accepted_has_no_mismatch():
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    got = inspect_round([0, 0], p, q, accepted=2, next_token=1, first_position=3)
    assert got.mismatch is None
    assert got.total_variation == pytest.approx([0.4, 0.1])


@pytest.mark.parametrize("proposer, temperature", [("draft", 0.0), ("draft", 0.9), ("ngram", 0.0)])
def test_inspection_changes_no_output_token(tiny_models, proposer, temperature):
    engine = make_engine(tiny_models["llama"], tiny_models["llama-draft"], proposer=proposer, depth=3)
    for prompt in random_prompts(6, vocab=64, seed=5, min_len=4):
        prompt = prompt * 2  # repeats give the n-gram proposer matches
        params = SamplingParams(max_new_tokens=24, temperature=temperature, seed=3)
        plain = [t for d in engine.stream(prompt, params) for t in d.token_ids]
        tokens, inspections = [], []
        for delta in engine.stream(prompt, params, inspect=True):
            if delta.round.proposed:
                assert delta.round.inspection is not None
                inspections.append((len(tokens), delta.round.inspection))
            tokens += delta.token_ids
        assert tokens == plain
        for start, inspection in inspections:
            assert all(0.0 <= tv <= 1.0 + 1e-9 for tv in inspection.total_variation)
            assert all(kl >= -1e-9 for kl in inspection.kl_divergence)
            m = inspection.mismatch
            if m is not None and m.position < len(tokens):
                assert m.position >= start and tokens[m.position] == m.verifier_token != m.draft_token
