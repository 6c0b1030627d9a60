"""A proposer that fails, hangs or lies never costs a request its exact output."""

import time

import pytest

from tests.conftest import engine_for, make_engine, random_prompts
from verispec.config import SamplingParams, SpeculationSettings
from verispec.proposers.base import Proposal

VOCAB = 64


class Flaky:
    """Wraps a real proposer; misbehaves on every `every`-th call, in the given way."""

    name = "flaky"

    def __init__(self, inner, every: int, how: str):
        self.inner, self.every, self.how = inner, every, how
        self.calls = 0

    def session(self):
        return FlakySession(self, self.inner.session())


SLOW_S = 2.0  # a "slow" proposal


class FlakySession:
    def __init__(self, owner, inner):
        self.owner, self.inner = owner, inner

    def propose(self, context, depth, policy):
        self.owner.calls += 1
        if self.owner.calls % self.owner.every == 0:
            if self.owner.how == "raise":
                self.inner.propose(context, depth, policy)  # leave its cache mid-update
                raise RuntimeError("proposer crashed")
            if self.owner.how == "slow":
                time.sleep(SLOW_S)
            if self.owner.how == "garbage":
                return Proposal([VOCAB + 5] * depth)
        return self.inner.propose(context, depth, policy)

    def reset(self):
        self.inner.reset()


@pytest.mark.parametrize("how", ["raise", "slow", "garbage"])
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=30, temperature=0.9, seed=5)])
def test_misbehaving_proposer_keeps_output_exact(tiny_models, how, params):
    base = make_engine(tiny_models["llama"], tiny_models["llama"])
    flaky = Flaky(base.proposer, every=3, how=how)
    # The budget sits far from both a normal proposal (a few ms) and a slow one, so that a busy
    # machine cannot turn a normal proposal into a timeout.
    settings = SpeculationSettings(depth=3, proposer_timeout_s=SLOW_S / 4, max_proposer_failures=100)
    engine = engine_for(base.target, base.tokenizer, flaky, settings)
    for prompt in random_prompts(4, VOCAB, seed=20):
        reference = base.generate(prompt, SamplingParams(max_new_tokens=30), depth=0)
        out = engine.generate(prompt, params)
        if params.greedy:
            assert out.token_ids == reference.token_ids
        stats = out.stats
        assert stats.fallback_rounds > 0
        assert stats.fallback_rounds == stats.proposer_failures + stats.proposer_timeouts
        assert (stats.proposer_timeouts > 0) == (how == "slow")
        assert stats.verifier_only >= stats.fallback_rounds
        assert stats.accepted > 0  # speculation resumed after each failure


def test_a_proposer_that_keeps_failing_is_given_up_for_the_request(tiny_models):
    base = make_engine(tiny_models["llama"], tiny_models["llama"])
    engine = engine_for(
        base.target, base.tokenizer, Flaky(base.proposer, every=1, how="raise"),
        SpeculationSettings(depth=3, max_proposer_failures=2),
    )
    prompt = random_prompts(1, VOCAB, seed=21)[0]
    out = engine.generate(prompt, SamplingParams(max_new_tokens=20))
    assert out.token_ids == base.generate(prompt, SamplingParams(max_new_tokens=20), depth=0).token_ids
    assert out.stats.proposer_failures == 2
    assert out.stats.rounds == 20
