"""The adaptive depth policy: grows on full acceptance, shrinks on early rejection, priced by cost."""

import pytest

from verispec.core.depth import AdaptiveDepth, FixedDepth, StepCosts, expected_tokens

FLAT = StepCosts(verify_s=(0.012,) * 9, draft_s=0.002)


def run(policy: AdaptiveDepth, rounds: int, accept_all: bool) -> int:
    for _ in range(rounds):
        k = policy.depth()
        policy.update(k, k if accept_all else 0)
    return policy.depth()


def test_grows_while_everything_is_accepted_and_shrinks_on_early_rejection():
    policy = AdaptiveDepth(FLAT, max_depth=8)
    start = policy.depth()
    assert run(policy, 30, accept_all=True) == 8 > start
    assert run(policy, 30, accept_all=False) <= 1


def test_turns_off_when_nothing_is_accepted_but_keeps_probing():
    policy = AdaptiveDepth(FLAT, max_depth=8, probe_every=4)
    depths = []
    for _ in range(40):
        k = policy.depth()
        depths.append(k)
        policy.update(k, 0)
    assert depths[-8:].count(0) >= 6 and 1 in depths[-8:]


def test_an_expensive_draft_or_wide_pass_speculates_less():
    cheap = AdaptiveDepth(FLAT, max_depth=8)
    dear_draft = AdaptiveDepth(StepCosts(verify_s=(0.012,) * 9, draft_s=0.008), max_depth=8)
    dear_width = AdaptiveDepth(StepCosts(verify_s=tuple(0.012 * (1 + t) for t in range(9)), draft_s=0.002), max_depth=8)
    assert dear_draft.depth() < cheap.depth()
    assert dear_width.depth() < cheap.depth()


@pytest.mark.parametrize("alpha, k, expected", [(0.0, 4, 1.0), (0.5, 1, 1.5), (0.5, 2, 1.75), (1.0, 3, 4.0)])
def test_expected_tokens(alpha, k, expected):
    assert expected_tokens(alpha, k) == pytest.approx(expected)


def test_fixed_depth_is_fixed():
    policy = FixedDepth(4)
    policy.update(4, 0)
    assert policy.depth() == 4
