"""Drafts from the text's own repeats (`core/repeats.py`): what they draft, and that rounds
drafted from them keep the output exactly the verifier's."""

import pytest

from tests.conftest import exact_at_depths, make_engine, random_prompts, run_together
from verispec.config import SamplingParams
from verispec.core.goodput import PassCosts
from verispec.core.repeats import WINDOW, repeat_drafts


@pytest.mark.parametrize(
    "context, min_match, most, expected",
    [
        ([1, 2, 3, 4, 5, 9, 1, 2, 3], 3, 8, [4, 5, 9]),  # a 3-token match drafts 3
        ([1, 2, 3, 4, 5, 9, 1, 2, 3], 3, 2, [4, 5]),  # no more than asked
        ([7, 1, 2, 3, 4, 5, 9, 7, 1, 2, 3], 3, 8, [4, 5, 9, 7]),  # the match is 4 long: 4 drafts
        ([1, 2, 3, 4, 5, 9, 1, 2, 3], 4, 8, []),  # the last 4 tokens never occurred before
        ([5, 6, 5, 6, 5, 6], 2, 8, [5, 6, 5, 6]),  # a loop drafts its period again, as deep as it has run
        ([8, 1, 2, 9, 1, 2], 2, 8, [9, 1]),  # the latest occurrence: 2 long, 2 drafts
        ([1, 2], 2, 8, []),  # too short to repeat
        ([1, 2, 1, 2], 0, 8, []),  # off
    ],
)
def test_a_repeat_drafts_what_followed_as_deep_as_it_matched(context, min_match, most, expected):
    assert repeat_drafts(context, min_match, most) == expected


LOOP = [5, 9, 12, 33, 7, 21, 5, 9, 12, 33, 7, 21, 5, 9]  # a prompt that repeats itself


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_rounds_drafted_from_repeats_keep_the_verifiers_output(tiny_models, proposer):
    engine = make_engine(tiny_models["llama"], tiny_models["llama-draft"], proposer=proposer, repeat_match=3)
    engine.pin_costs(PassCosts(tuple(range(1, 18)), (1.0,) * 17, draft_s=0.01))  # depth auto speculates
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = [LOOP, *random_prompts(4, 64, seed=7, min_len=2, max_len=30)]
    reference = exact_at_depths(engine, prompts, params)
    out = engine.generate(LOOP, params, depth=2)
    assert out.stats.repeat_rounds > 0
    assert max(out.stats.depths) > 2  # a repeat is drafted as deep as it runs, past the round's depth
    out, requests = run_together(engine, [*prompts, LOOP], params, depth=3)
    assert out == [*reference, reference[0]]
    assert requests[-1].stats.repeat_rounds > 0


def test_off_the_proposer_drafts_every_round(tiny_models):
    engine = make_engine(tiny_models["llama"], tiny_models["llama-draft"], repeat_match=0)
    out = engine.generate(LOOP, SamplingParams(max_new_tokens=24, ignore_eos=True), depth=2)
    assert out.stats.repeat_rounds == 0 and max(out.stats.depths) == 2


def test_a_repeat_round_leaves_the_proposers_acceptance_estimate_alone(tiny_models):
    engine = make_engine(tiny_models["llama"], tiny_models["llama-draft"], proposer="none", repeat_match=3)
    out = engine.generate(LOOP, SamplingParams(max_new_tokens=8, ignore_eos=True), depth=0)
    assert out.stats.repeat_rounds == 0 and out.stats.proposed == 0  # verifier only asked: no repeats either
    engine = make_engine(tiny_models["llama"], tiny_models["llama-draft"], repeat_match=3)
    request = engine.add(
        "r",
        LOOP,
        SamplingParams(max_new_tokens=8, ignore_eos=True),
        engine.speculation,
        engine.proposer,
        depth=2,
    )
    before = request.acceptance.alpha
    engine.step()  # the prompt's pass
    while engine.busy and request.stats.rounds == 0:
        engine.step()
    assert request.stats.repeat_rounds == 1  # the first round: LOOP's own repeat
    assert request.acceptance.alpha == before


def test_only_the_last_window_of_tokens_is_searched():
    far = [1, 2, 3, 4, *range(10, 10 + WINDOW), 1, 2, 3]
    assert repeat_drafts(far, 3, 8) == []  # the earlier [1, 2, 3] lies beyond the window
    near = [*range(10, 10 + WINDOW), 1, 2, 3, 4, 1, 2, 3]
    assert repeat_drafts(near, 3, 8) == [4, 1, 2]
