"""Speculative sampling reproduces the verifier's distribution: statistical tests.

A chi-square goodness-of-fit test against the exact target distribution; each test also shows
that the same test rejects a plausibly wrong rule, so it can fail.
"""


import pytest
import torch
from scipy.stats import chisquare

from tests.conftest import llama, make_engine, save
from verispec.config import SamplingParams
from verispec.core.acceptance import accept_stochastic
from verispec.core.goodput import PassCosts
from verispec.core.sampling import sample, warp

ALPHA = 1e-4  # false-alarm rate per test


def goodness_of_fit(samples: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """p-value of `samples` (ids) under `expected_probs`, pooling cells expected below 5.
    An impossible token (probability 0) that was sampled fails outright (p = 0)."""
    n = samples.numel()
    observed = torch.bincount(samples.flatten(), minlength=expected_probs.numel()).double()
    expected = expected_probs.double() * n
    impossible = expected_probs == 0
    if observed[impossible].sum() > 0:
        return 0.0
    observed, expected = observed[~impossible], expected[~impossible]
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    return float(chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item()).pvalue)


P_TARGET = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15, 0.0])
P_DRAFT = torch.tensor([0.30, 0.10, 0.25, 0.05, 0.10, 0.20])
N = 200_000


def first_output_token(draft_probs, draft_tokens, generator, rule=accept_stochastic):
    target = torch.stack([P_TARGET, P_TARGET]).expand(N, 2, -1)  # (N, k+1, V), k = 1
    verdict = rule(draft_tokens[:, None], None if draft_probs is None else draft_probs.expand(N, 1, -1), target, generator)
    return torch.where(verdict.accepted == 1, draft_tokens, verdict.next_token)


def test_rule_reproduces_target_from_a_draft_model():
    g = torch.Generator().manual_seed(0)
    drafts = sample(P_DRAFT.expand(N, -1), g)
    assert goodness_of_fit(first_output_token(P_DRAFT[None, None], drafts, g), P_TARGET) > ALPHA


def test_rule_reproduces_target_from_a_point_mass_proposer():
    g = torch.Generator().manual_seed(1)
    drafts = torch.full((N,), 2)
    assert goodness_of_fit(first_output_token(None, drafts, g), P_TARGET) > ALPHA


def test_the_test_rejects_a_wrong_rule():
    """Drawing the recovered token from p_target instead of the residual is a classic bug."""

    def wrong_rule(draft_tokens, draft_probs, target_probs, generator):
        verdict = accept_stochastic(draft_tokens, draft_probs, target_probs, generator)
        return type(verdict)(verdict.accepted, sample(target_probs[:, 0], generator))

    g = torch.Generator().manual_seed(2)
    drafts = sample(P_DRAFT.expand(N, -1), g)
    assert goodness_of_fit(first_output_token(P_DRAFT[None, None], drafts, g, rule=wrong_rule), P_TARGET) < 1e-10


VOCAB = 8
PARAMS = SamplingParams(temperature=0.8, top_k=6, top_p=0.95, max_new_tokens=2)
PROMPT = [3, 1, 4, 1, 5, 1]  # ends in a repeated token, so the n-gram proposer always has a match


@pytest.fixture(scope="module")
def small_vocab_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-vocab")
    return (
        save(llama(VOCAB, layers=2, seed=30, hidden=16), root / "target", VOCAB),
        save(llama(VOCAB, layers=1, seed=31, hidden=16), root / "draft", VOCAB),
    )


def exact_two_token_distribution(engine) -> torch.Tensor:
    """P(x1, x2 | PROMPT) under the warped target, over all VOCAB**2 pairs, flattened x1 * VOCAB + x2."""
    def next_dist(context):
        return warp(engine.target.session().extend(context, last_only=True)[-1], PARAMS)

    first = next_dist(PROMPT)
    joint = torch.zeros(VOCAB, VOCAB)
    for x1 in range(VOCAB):
        if first[x1] > 0:
            joint[x1] = first[x1] * next_dist(PROMPT + [x1])
    return joint.flatten()


@pytest.mark.parametrize(
    "proposer, depth, repeat_match", [("draft", 2, 0), ("draft", "auto", 0), ("ngram", 2, 0), ("draft", 2, 1)]
)
def test_engine_samples_the_target_distribution(small_vocab_pair, proposer, depth, repeat_match):
    """With repeat_match 1 every first round drafts PROMPT's own repeat (`core/repeats.py`)."""
    target, draft = small_vocab_pair
    engine = make_engine(target, draft, proposer=proposer, ngram_min=1, repeat_match=repeat_match)
    # Price drafting as cheap so that depth auto speculates on these tiny models.
    engine.pin_costs(PassCosts(tuple(range(1, 10)), (1.0,) * 9, draft_s=0.01))
    engine.eos_ids = frozenset()  # token 0 is an ordinary token here: every sample has two tokens
    expected = exact_two_token_distribution(engine)
    n = 2500
    outputs = []
    proposed = repeats = 0
    for seed in range(n):
        out = engine.generate(PROMPT, PARAMS.model_copy(update={"seed": seed}), depth=depth)
        outputs.append(out.token_ids[0] * VOCAB + out.token_ids[1])
        proposed += out.stats.proposed
        repeats += out.stats.repeat_rounds
    assert proposed >= n  # every request speculated (depth is capped at max_new_tokens - 1 = 1)
    assert (repeats >= n) == bool(repeat_match)
    assert goodness_of_fit(torch.tensor(outputs), expected) > ALPHA
    # Power check: the same number of samples from the (warped) draft is rejected.
    if proposer == "draft":
        draft_engine = make_engine(draft, proposer="none")
        draft_engine.eos_ids = frozenset()
        draft_outputs = [
            sum(t * VOCAB ** (1 - i) for i, t in enumerate(
                draft_engine.generate(PROMPT, PARAMS.model_copy(update={"seed": s}), depth=0).token_ids))
            for s in range(n)
        ]
        assert goodness_of_fit(torch.tensor(draft_outputs), expected) < ALPHA


def test_a_seed_reproduces_the_output(small_vocab_pair):
    engine = make_engine(*small_vocab_pair)
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=1234)
    first = engine.generate(PROMPT, params, depth=3)
    assert first.stats.seed == 1234
    assert engine.generate(PROMPT, params, depth=3).token_ids == first.token_ids
    others = {tuple(engine.generate(PROMPT, params.model_copy(update={"seed": s}), depth=3).token_ids) for s in range(5)}
    assert len(others) > 1


def test_unseeded_requests_record_their_seed(small_vocab_pair):
    engine = make_engine(*small_vocab_pair)
    out = engine.generate(PROMPT, SamplingParams(temperature=1.0, max_new_tokens=10), depth=2)
    replay = engine.generate(PROMPT, SamplingParams(temperature=1.0, max_new_tokens=10, seed=out.stats.seed), depth=2)
    assert replay.token_ids == out.token_ids
