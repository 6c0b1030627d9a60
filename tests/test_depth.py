"""The adaptive depth policy: grows on full acceptance, shrinks on early rejection, weighs cost."""

import pytest

from verispec.depth import AdaptiveDepth, FixedDepth, expected_tokens


def run(policy: AdaptiveDepth, rounds: int, accept_all: bool, draft_s: float = 0.002, verify_s: float = 0.012):
    for _ in range(rounds):
        k = policy.depth()
        policy.update(k, k if accept_all else 0, k * draft_s, verify_s)
    return policy.depth()


def test_grows_while_everything_is_accepted_and_shrinks_on_early_rejection():
    policy = AdaptiveDepth(max_depth=8, start=3)
    grown = run(policy, 30, accept_all=True)
    assert grown == 8
    assert run(policy, 30, accept_all=False) == 1  # never below 1


def test_an_expensive_draft_speculates_less():
    cheap = run(AdaptiveDepth(max_depth=8), 5, accept_all=True, draft_s=0.001)
    policy = AdaptiveDepth(max_depth=8)
    for _ in range(40):  # alpha about 0.6, as on the reference pair
        k = policy.depth()
        policy.update(k, 1 if k > 1 else 0, k * 0.006, 0.012)
        policy.update(k, min(k, 2), k * 0.006, 0.012)
    assert policy.depth() < cheap


@pytest.mark.parametrize("alpha, k, expected", [(0.0, 4, 1.0), (0.5, 1, 1.5), (0.5, 2, 1.75), (1.0, 3, 4.0)])
def test_expected_tokens(alpha, k, expected):
    assert expected_tokens(alpha, k) == pytest.approx(expected)


def test_fixed_depth_is_fixed():
    policy = FixedDepth(4)
    policy.update(4, 0, 1.0, 1.0)
    assert policy.depth() == 4
