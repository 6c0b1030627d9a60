"""Table tests of the n-gram (prompt lookup) proposer."""

import numpy as np
import pytest

from verispec.proposers.ngram import NgramProposer, lookup


@pytest.mark.parametrize(
    "context, depth, max_n, min_n, expected",
    [
        ([1, 2, 3, 4, 1, 2], 2, 3, 1, [3, 4]),  # suffix [1, 2] seen before: propose what followed
        ([1, 2, 3, 4, 1, 2], 5, 3, 1, [3, 4, 1, 2, 3]),  # past the context's end, the period goes on
        ([5, 1, 2, 9, 7, 1, 2, 8, 3, 1, 2], 1, 2, 1, [8]),  # the latest match wins
        ([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 2, 3, 1, [9, 2]),  # the longest n wins over a later shorter match
        ([1, 2, 3], 3, 3, 1, []),  # no repetition: nothing to propose
        ([4, 4, 4, 4], 3, 3, 1, [4, 4, 4]),  # a run of one token goes on
        ([5, 1, 2, 1, 2], 5, 2, 1, [1, 2, 1, 2, 1]),  # so does a loop of two
        ([7], 3, 3, 1, []),
        ([1, 2, 1], 0, 3, 1, []),  # depth 0
        ([1, 5, 2, 1], 2, 3, 2, []),  # only single-token matches exist, min n is 2
    ],
)
def test_lookup(context, depth, max_n, min_n, expected):
    assert lookup(np.asarray(context), depth, max_n, min_n) == expected


def test_proposals_are_point_masses_bounded_by_depth():
    proposal = NgramProposer(max_ngram=2, min_ngram=1).session().propose([1, 2, 3, 1, 2, 3, 1, 2], depth=3)
    assert proposal.tokens == [3, 1, 2]
    assert proposal.probs is None


def test_rejects_bad_bounds():
    with pytest.raises(ValueError):
        NgramProposer(max_ngram=1, min_ngram=2)
