"""Table tests of the acceptance rule."""

import pytest
import torch

from verispec.core.acceptance import accept_greedy, accept_stochastic

V = 5


def one_hot_logits(tokens: list[int]) -> torch.Tensor:
    """(1, len, V) logits whose argmax is each of `tokens`."""
    logits = torch.zeros(1, len(tokens), V)
    for i, t in enumerate(tokens):
        logits[0, i, t] = 10.0
    return logits


@pytest.mark.parametrize(
    "drafts, target_argmax, accepted, next_token",
    [
        ([1, 2, 3], [1, 2, 3, 4], 3, 4),  # all accepted: bonus token
        ([1, 2, 3], [1, 2, 0, 4], 2, 0),  # third rejected: recovered token
        ([1, 2, 3], [0, 2, 3, 4], 0, 0),  # first rejected; later agreement does not count
        ([1, 2, 3], [1, 0, 3, 4], 1, 0),
        ([], [2], 0, 2),  # no proposal: plain verifier step
    ],
)
def test_greedy_accepts_longest_agreeing_prefix(drafts, target_argmax, accepted, next_token):
    verdict = accept_greedy(torch.tensor([drafts], dtype=torch.long).reshape(1, -1), one_hot_logits(target_argmax))
    assert verdict.accepted.tolist() == [accepted]
    assert verdict.next_token.tolist() == [next_token]


def test_greedy_is_batched():
    drafts = torch.tensor([[1, 2], [1, 2], [3, 3]])
    logits = torch.cat([one_hot_logits([1, 2, 4]), one_hot_logits([1, 0, 4]), one_hot_logits([0, 3, 4])])
    verdict = accept_greedy(drafts, logits)
    assert verdict.accepted.tolist() == [2, 1, 0]
    assert verdict.next_token.tolist() == [4, 0, 0]


def dist(*values: float) -> torch.Tensor:
    t = torch.tensor(values)
    return t / t.sum()


@pytest.mark.parametrize("seed", range(20))
def test_stochastic_always_accepts_when_target_likes_the_draft_more(seed):
    # p_target(x) >= p_draft(x) at every draft: min(1, ratio) = 1.
    target = torch.stack([dist(0, 4, 1, 0, 0), dist(0, 0, 4, 1, 0), dist(1, 1, 1, 1, 1)])[None]
    draft = torch.stack([dist(0, 2, 2, 1, 0), dist(1, 1, 2, 1, 0)])[None]
    verdict = accept_stochastic(torch.tensor([[1, 2]]), draft, target, torch.Generator().manual_seed(seed))
    assert verdict.accepted.tolist() == [2]


@pytest.mark.parametrize("seed", range(20))
def test_stochastic_never_accepts_what_the_target_rules_out(seed):
    target = torch.stack([dist(0, 0, 1, 1, 0), dist(1, 1, 1, 1, 1)])[None]
    draft = dist(1, 1, 1, 1, 1)[None, None]
    verdict = accept_stochastic(torch.tensor([[1]]), draft, target, torch.Generator().manual_seed(seed))
    assert verdict.accepted.tolist() == [0]
    # Recovered from the residual max(0, p_target - p_draft), which is zero outside tokens 2 and 3.
    assert verdict.next_token.item() in (2, 3)


def test_point_mass_proposal_is_rejected_exactly_when_target_gives_it_zero():
    target = torch.stack([dist(0, 0, 1, 0, 0), dist(1, 1, 1, 1, 1)])[None]
    for seed in range(10):
        verdict = accept_stochastic(torch.tensor([[1]]), None, target, torch.Generator().manual_seed(seed))
        assert verdict.accepted.tolist() == [0] and verdict.next_token.tolist() == [2]
    target = torch.stack([dist(0, 1, 0, 0, 0), dist(0, 0, 0, 1, 0)])[None]
    verdict = accept_stochastic(torch.tensor([[1]]), None, target, torch.Generator().manual_seed(0))
    assert verdict.accepted.tolist() == [1] and verdict.next_token.tolist() == [3]  # bonus from position k
