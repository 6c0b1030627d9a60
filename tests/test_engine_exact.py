"""Greedy speculative decoding is token-identical to verifier-only decoding."""

import pytest
import torch

from tests.conftest import EOS, make_engine, random_prompts
from verispec.config import SamplingParams
from verispec.core.goodput import PassCosts

VOCAB = 64
DEPTHS = [1, 2, 3, 5, 8, "auto"]


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module")
def llama_engines(tiny_models):
    return {
        "draft": make_engine(tiny_models["llama"], tiny_models["llama-draft"]),
        "self-draft": make_engine(tiny_models["llama"], tiny_models["llama"]),  # accepts (almost) everything
        "ngram": make_engine(tiny_models["llama"], proposer="ngram"),
    }


def test_verifier_only_is_the_models_own_greedy_decoding(tiny_models):
    """Depth 0 (the reference every check compares against) equals transformers' generate()."""
    engine = make_engine(tiny_models["llama"], proposer="none", backend="transformers")
    for prompt in random_prompts(6, VOCAB, seed=10):
        ours = engine.generate(prompt, greedy(20), depth=0).token_ids
        theirs = engine.target.model.generate(
            torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=EOS
        )[0, len(prompt):].tolist()
        stop = theirs.index(EOS) + 1 if EOS in theirs else len(theirs)
        assert ours == theirs[:stop]


@pytest.mark.parametrize("proposer", ["draft", "self-draft", "ngram"])
def test_llama_speculative_equals_verifier_only(llama_engines, proposer):
    engine = llama_engines[proposer]
    accepted = 0
    for prompt in random_prompts(12, VOCAB, seed=11):
        reference = engine.generate(prompt, greedy(40), depth=0)
        for depth in DEPTHS:
            out = engine.generate(prompt, greedy(40), depth=depth)
            assert out.token_ids == reference.token_ids, (prompt, depth)
            assert out.finish_reason == reference.finish_reason
            accepted += out.stats.accepted
    assert accepted > 0  # the accept path was exercised, not only recoveries


def test_gpt2_target_with_llama_draft(tiny_models):
    """Two architectures in one pair: all that matters is the shared tokenizer."""
    engine = make_engine(tiny_models["gpt2"], tiny_models["llama-draft"])
    self_engine = make_engine(tiny_models["gpt2"], tiny_models["gpt2"])
    for prompt in random_prompts(10, VOCAB, seed=12):
        reference = engine.generate(prompt, greedy(30), depth=0).token_ids
        for depth in DEPTHS:
            assert engine.generate(prompt, greedy(30), depth=depth).token_ids == reference
            assert self_engine.generate(prompt, greedy(30), depth=depth).token_ids == reference


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3])
def test_depth_beyond_the_remaining_budget(llama_engines, max_new_tokens):
    engine = llama_engines["self-draft"]
    for prompt in random_prompts(5, VOCAB, seed=13):
        reference = engine.generate(prompt, greedy(max_new_tokens), depth=0)
        out = engine.generate(prompt, greedy(max_new_tokens), depth=8)
        assert out.token_ids == reference.token_ids
        assert len(out.token_ids) <= max_new_tokens
        assert max(out.stats.depths) <= max_new_tokens - 1


def test_prompts_hitting_eos(tiny_models):
    """Make a token the model emits often the EOS: outputs must end exactly where verifier-only ends."""
    engine = make_engine(tiny_models["llama"], tiny_models["llama"])
    prompts = random_prompts(20, VOCAB, seed=14)
    counts = torch.bincount(
        torch.tensor([t for p in prompts for t in engine.generate(p, greedy(20), depth=0).token_ids]), minlength=VOCAB
    )
    engine.eos_ids = frozenset({int(counts.argmax())})
    stopped_early = 0
    for prompt in prompts:
        reference = engine.generate(prompt, greedy(20), depth=0)
        stopped_early += reference.finish_reason == "stop"
        for depth in DEPTHS:
            out = engine.generate(prompt, greedy(20), depth=depth)
            assert out.token_ids == reference.token_ids
            assert out.finish_reason == reference.finish_reason
    assert stopped_early >= 5


def test_stats_add_up(llama_engines, monkeypatch):
    """The request's statistics agree with what the engine was seen doing: verifier passes counted
    at the runner, drafts and verdicts from each round, tokens from each delta."""
    engine = llama_engines["draft"]
    passes = []
    forward = engine.runner.forward

    def counted(segments):
        passes.append(sum(len(s.tokens) for s in segments))
        return forward(segments)

    monkeypatch.setattr(engine.runner, "forward", counted)
    prompt = random_prompts(1, VOCAB, seed=15, min_len=8)[0]
    deltas = list(engine.stream(prompt, greedy(60), depth=4))
    s = deltas[-1].stats
    rounds = [d.round for d in deltas]
    assert s.generated_tokens == sum(len(d.token_ids) for d in deltas) == 60
    assert s.rounds == len(rounds) == len(passes) - 1  # one pass per round, after the prompt's
    assert [1 + r.proposed for r in rounds] == passes[1:]  # each pass scores the last token and the drafts
    assert s.depths == [r.depth for r in rounds]
    assert s.proposed == sum(r.proposed for r in rounds) and s.accepted == sum(r.accepted for r in rounds)
    assert s.recovered == sum(0 < r.proposed and r.accepted < r.proposed for r in rounds)
    assert s.bonus == sum(0 < r.proposed == r.accepted for r in rounds)
    assert s.verifier_only == sum(r.proposed == 0 for r in rounds)
    for delta in deltas[:-1]:  # every round emits its accepted drafts and one verifier token
        assert len(delta.token_ids) == delta.round.accepted + 1
    assert len(deltas[-1].token_ids) <= deltas[-1].round.accepted + 1  # the last may be cut short
    for i in range(len(s.proposed_by_position)):
        assert s.proposed_by_position[i] == sum(r.proposed > i for r in rounds)
        assert s.accepted_by_position[i] == sum(r.accepted > i for r in rounds)
    assert s.mismatch_s == pytest.approx(sum(r.mismatch_s for r in rounds))
    assert s.total_s > 0 and s.verify_s > 0 and s.propose_s > 0


def test_cancelling_a_stream_stops_generation(llama_engines):
    stream = llama_engines["draft"].stream([1, 2, 3], greedy(100), depth=3)
    first = next(stream)
    assert first.token_ids and first.finish_reason is None
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)


def test_draft_confidence_cuts_proposals_but_not_exactness(tiny_models):
    engine = make_engine(tiny_models["llama"], tiny_models["llama-draft"], draft_confidence=0.5)
    engine.pin_costs(PassCosts(tuple(range(1, 10)), (1.0,) * 9, draft_s=0.01))  # drafting priced as cheap: depth grows
    cut = 0
    for prompt in random_prompts(6, VOCAB, seed=16):
        reference = engine.generate(prompt, greedy(40), depth=0)
        out = engine.generate(prompt, greedy(40), depth="auto")
        assert out.token_ids == reference.token_ids
        cut += sum(out.stats.depths) - out.stats.proposed
    assert cut > 0  # the unsure draft gave fewer drafts than the rounds asked for


@pytest.mark.parametrize("backend", ["transformers", "lean"])
def test_sequences_in_turn_on_their_own_sessions_are_each_alone(tiny_models, backend):
    """A backend that cannot batch runs in the same engine, each running request's round on its
    own KV session in turn (`core/session_runner.py`): several requests stepped together, one of
    them preempted and recomputed midway, give each the tokens it has alone."""
    from verispec.core.engine import Engine
    from verispec.core.session_runner import SessionRunner

    base = make_engine(tiny_models["llama"], tiny_models["llama-draft"], backend=backend, depth=3)
    engine = Engine(SessionRunner(base.target), base.tokenizer, base.eos_ids, max_running=3, proposer=base.proposer, speculation=base.speculation)
    prompts = random_prompts(4, VOCAB, seed=44, min_len=4)
    alone = [engine.generate(p, greedy(24)).token_ids for p in prompts]
    requests = {engine.add(f"r{i}", p, greedy(24), engine.speculation, engine.proposer): i for i, p in enumerate(prompts)}
    out = {i: [] for i in requests.values()}
    steps = 0
    while engine.busy:
        for request, delta in engine.step():
            out[requests[request]] += delta.token_ids
        steps += 1
        if steps == 4:  # the newest running request gives its session up and is recomputed later
            engine.preempt(max(engine.running, key=lambda r: r.order))
    assert [out[i] for i in range(len(prompts))] == alone
    assert sum(r.preemptions for r in requests) == 1
