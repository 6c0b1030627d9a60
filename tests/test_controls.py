"""Sampling controls applied per verified position (penalties, bias, a token floor, stop ids,
ignore_eos, min_p), logprobs, and seeds that reproduce: exact under speculation and batching.

The reference for each control is an independent plain-Python reading of its definition over the
verifier's own logits (`reference_process`); the engine at depth 0 must match it, and every depth,
proposer and batch must match depth 0 to the token and logprobs to the bit."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import EOS, run_verispec
from tests.test_batching import engine, models, prompts  # noqa: F401  (models: the module's fixture)
from verispec.config import SamplingParams, SpeculationSettings
from verispec.core.goodput import PassCosts
from verispec.errors import UserError

CONTROLS = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.9),
    "repetition": dict(repetition_penalty=1.4),
    "bias": dict(logit_bias={5: 3.0, 7: -100.0, 11: 1.5}),
    "floor": dict(logit_bias={EOS: 6.0}, min_tokens=9),  # EOS pushed up, held back for 9 tokens
    "stop ids": dict(stop_token_ids=(5, 17)),
    "ignore eos": dict(logit_bias={EOS: 6.0}, ignore_eos=True),
    "all": dict(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.2, logit_bias={3: 2.0, EOS: -1.0}, min_tokens=4),
}


def reference_process(logits: list[float], prompt: list[int], output: list[int], params: SamplingParams, stop_ids: set[int]) -> list[float]:
    """The processed logits of the position after `output`, from the controls' definitions."""
    out = list(logits)
    if len(output) < params.min_tokens:
        for t in stop_ids:
            out[t] = -math.inf
    for t, b in params.logit_bias.items():
        out[t] += b
    for t in set(prompt) | set(output) if params.repetition_penalty != 1.0 else ():
        out[t] = out[t] / params.repetition_penalty if out[t] > 0 else out[t] * params.repetition_penalty
    for t in set(output):
        out[t] -= params.frequency_penalty * output.count(t) + params.presence_penalty
    return out


def reference_greedy(lm, prompt: list[int], params: SamplingParams) -> tuple[list[int], list[float]]:
    """Verifier-only greedy decoding with the controls, one position at a time, and each emitted
    token's log-probability under the processed logits."""
    stop_ids = ({EOS} if not params.ignore_eos else set()) | set(params.stop_token_ids)
    session = lm.session()
    logits = session.extend(prompt, last_only=True)[-1]
    output, logprobs = [], []
    while len(output) < params.max_new_tokens:
        processed = reference_process(logits.double().tolist(), prompt, output, params, stop_ids)
        token = max(range(len(processed)), key=processed.__getitem__)
        total = math.log(sum(math.exp(v) for v in processed if v > -math.inf))
        output.append(token)
        logprobs.append(processed[token] - total)
        if token in stop_ids:
            break
        logits = session.extend([token], last_only=True)[-1]
    return output, logprobs


def run_deltas(core, jobs):
    """Run jobs (name, prompt, params, proposer, depth) together; each one's tokens and logprobs."""
    out, requests = {}, {}
    for name, prompt, params, proposer, depth in jobs:
        speculation = SpeculationSettings(depth=depth, proposer_timeout_s=60.0, max_depth=6)
        requests[core.add(name, prompt, params, speculation, proposer)] = name
        out[name] = ([], [])
    steps = 0
    while core.busy:
        for request, delta in core.step():
            tokens, logprobs = out[requests[request]]
            tokens += delta.token_ids
            logprobs += delta.logprobs or []
        steps += 1
        assert steps < 5000, "the engine stopped making progress"
    return out


def greedy_params(control: str) -> SamplingParams:
    return SamplingParams(max_new_tokens=24, logprobs=3, **CONTROLS[control])


@pytest.mark.parametrize("control", list(CONTROLS))
def test_verifier_only_applies_each_control_as_defined(models, control):  # noqa: F811
    params = greedy_params(control)
    core = engine(models, max_running=1)
    for prompt in prompts(20, 3, 2, 12):
        tokens, logprobs = run_deltas(core, [("r", prompt, params, None, 0)])["r"]
        expected, expected_logprobs = reference_greedy(models["target"], prompt, params)
        assert tokens == expected
        assert [lp.logprob for lp in logprobs] == pytest.approx(expected_logprobs, abs=1e-4)
        for lp in logprobs:  # the top alternatives, most likely first, hold the chosen (greedy) token
            assert len(lp.top) == 3 and lp.top[0] == (lp.token, lp.logprob)
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        if control == "floor":
            assert len(tokens) >= 9 and EOS not in tokens[:9]
        if control == "stop ids" and len(tokens) < params.max_new_tokens:
            assert tokens[-1] in (5, 17) and not {5, 17} & set(tokens[:-1])
        if control == "ignore eos":
            assert len(tokens) == params.max_new_tokens


def test_each_control_takes_effect(models):  # noqa: F811
    """The controls change the output (the reference tests above would pass with controls ignored
    only if they never bit): at least one prompt differs from plain greedy for each."""
    core = engine(models, max_running=1)
    for control in CONTROLS:
        changed = 0
        for prompt in prompts(20, 3, 2, 12):
            plain = run_deltas(core, [("a", prompt, SamplingParams(max_new_tokens=24), None, 0)])["a"][0]
            changed += run_deltas(core, [("b", prompt, greedy_params(control), None, 0)])["b"][0] != plain
        assert changed, control


def test_controls_and_logprobs_are_exact_at_every_depth_proposer_and_batch(models):  # noqa: F811
    """Each control's tokens and logprobs alone at depth 0, then every control on the draft model and
    the n-gram proposer at depths 1, 3 and auto, all running together with greedy and sampled
    requests beside them: the same tokens, and the same logprobs to the bit."""
    texts = prompts(21, len(CONTROLS), 3, 30)
    alone = {}
    single = engine(models, max_running=1)
    for (control, _), prompt in zip(CONTROLS.items(), texts, strict=True):
        alone[control] = run_deltas(single, [(control, prompt, greedy_params(control), None, 0)])[control]
    for proposer in ("draft", "ngram"):
        for depth in (1, 3, "auto"):
            jobs = [(c, p, greedy_params(c), models[proposer], depth) for c, p in zip(CONTROLS, texts, strict=True)]
            jobs += [
                (f"other{i}", p, SamplingParams(max_new_tokens=15, temperature=i % 2, seed=i), models["draft"], "auto")
                for i, p in enumerate(prompts(22, 4, 1, 40))
            ]
            together = run_deltas(engine(models, max_running=12), jobs)
            for control in CONTROLS:
                tokens, logprobs = together[control]
                assert tokens == alone[control][0], (control, proposer, depth)
                assert logprobs == alone[control][1], (control, proposer, depth)


SAMPLED = SamplingParams(
    temperature=0.9, top_p=0.95, max_new_tokens=30, seed=0, presence_penalty=0.5, logit_bias={4: 1.0}, min_p=0.02
)


def test_a_seed_gives_the_same_text_at_any_depth_proposer_and_batch(models):  # noqa: F811
    """Coupled sampling: each seed's text at depth 0 alone is the text at depths 1, 3 and auto, on
    the draft model (which draws with the same noise) and the n-gram proposer, at concurrency 8
    among other requests."""
    texts = prompts(23, 6, 2, 20)
    params = [SAMPLED.model_copy(update={"seed": 1000 + i}) for i in range(len(texts))]
    single = engine(models, max_running=1)
    alone = {f"s{i}": run_deltas(single, [("x", p, q, None, 0)])["x"][0] for i, (p, q) in enumerate(zip(texts, params, strict=True))}
    assert len({tuple(t) for t in alone.values()}) == len(texts)
    for proposer in ("draft", "ngram"):
        for depth in (1, 3, "auto"):
            core = engine(models, max_running=8)
            jobs = [(f"s{i}", p, q, models[proposer], depth) for i, (p, q) in enumerate(zip(texts, params, strict=True))]
            jobs += [(f"o{i}", p, SamplingParams(max_new_tokens=9), models["draft"], 2) for i, p in enumerate(prompts(24, 4, 1, 30))]
            together = run_deltas(core, jobs)
            for name, tokens in alone.items():
                assert together[name][0] == tokens, (name, proposer, depth)
    stream = list(engine(models, max_running=1).stream(texts[0], params[0], depth=3, proposer=models["draft"]))
    assert stream[-1].stats.accepted > 0  # drafts were accepted, not only recovered
    assert [t for d in stream for t in d.token_ids] == alone["s0"]


def test_the_rejection_rule_stays_available_and_draws_by_round(models):  # noqa: F811
    """`sampled_acceptance: rejection` (today's rule) also reproduces a seed at a fixed depth in a
    process; its draws follow the rounds, so other depths give other text."""
    params = SAMPLED.model_copy(update={"sampled_acceptance": "rejection", "seed": 5})
    prompt = prompts(25, 1, 5, 5)[0]
    core = engine(models, max_running=1)
    by_depth = {d: run_deltas(core, [("x", prompt, params, models["draft"], d)])["x"][0] for d in (0, 1, 3)}
    assert run_deltas(core, [("x", prompt, params, models["draft"], 3)])["x"][0] == by_depth[3]
    assert len({tuple(t) for t in by_depth.values()}) > 1


def test_token_ids_outside_the_vocabulary_are_refused(models):  # noqa: F811
    core = engine(models)
    for params in (SamplingParams(logit_bias={96: 1.0}), SamplingParams(stop_token_ids=(-1,))):
        with pytest.raises(UserError, match="outside this model's vocabulary of 96 tokens"):
            core.add("r", [1, 2], params, SpeculationSettings(), None)


def test_a_seed_reproduces_across_processes_depths_and_proposers(tiny_models):  # noqa: F811
    """Separate `verispec generate` processes, each measuring its own pass costs for depth auto:
    the same seed, the same text."""
    target, draft = tiny_models["llama"], tiny_models["llama-draft"]
    common = ["--target", target, "--temperature", "1.0", "--seed", "77", "--max-new-tokens", "40", "--presence-penalty", "0.3"]
    runs = [
        ["--proposer", "none", "--depth", "0"],
        ["--draft", draft, "--depth", "auto"],
        ["--draft", draft, "--depth", "4"],
        ["--proposer", "ngram", "--depth", "auto"],
    ]
    texts = set()
    for extra in runs:
        done = run_verispec("generate", "t1 t2 t3 t4", *common, *extra)
        assert done.returncode == 0, done.stderr
        texts.add(done.stdout)
    assert len(texts) == 1, texts


def test_sampled_controls_keep_the_distribution(tmp_path_factory):
    """Sampling with penalties, bias and min_p through the engine, speculating on a draft model at
    depth 2, matches the exact two-token distribution of the processed, warped verifier (chi-square),
    by both acceptance rules."""
    from tests.conftest import llama, make_engine, save
    from tests.test_sampling_distribution import ALPHA, goodness_of_fit
    from verispec.core.sampling import warp

    vocab = 8
    root = tmp_path_factory.mktemp("controls-vocab")
    target = save(llama(vocab, layers=2, seed=40, hidden=16), root / "target", vocab)
    draft = save(llama(vocab, layers=1, seed=41, hidden=16), root / "draft", vocab)
    prompt = [3, 1, 4, 1, 5]
    base = SamplingParams(
        temperature=0.9, max_new_tokens=2, presence_penalty=1.2, frequency_penalty=0.3, repetition_penalty=1.3,
        logit_bias={2: 1.0, 6: -2.0}, min_p=0.03,
    )  # fmt: skip
    probe = make_engine(target, proposer="none")

    def dist(output):
        logits = probe.target.session().extend(prompt + output, last_only=True)[-1].double().tolist()
        processed = reference_process(logits, prompt, output, base, set())
        return warp(torch.tensor(processed, dtype=torch.float32), base)

    first = dist([])
    expected = torch.stack([first[x] * dist([x]) for x in range(vocab)]).flatten()
    for rule in ("coupled", "rejection"):
        engine_ = make_engine(target, draft)
        engine_.pin_costs(PassCosts(tuple(range(1, 10)), (1.0,) * 9, draft_s=0.01))
        engine_.eos_ids = frozenset()
        n = 2500
        outputs, proposed = [], 0
        for seed in range(n):
            out = engine_.generate(prompt, base.model_copy(update={"seed": seed, "sampled_acceptance": rule}), depth=2)
            outputs.append(out.token_ids[0] * vocab + out.token_ids[1])
            proposed += out.stats.proposed
        assert proposed >= n
        assert goodness_of_fit(torch.tensor(outputs), expected) > ALPHA, rule
    # Power: ignoring the controls is caught.
    probe.eos_ids = frozenset()
    plain = base.model_copy(update={"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": {}})
    ignored = [sum(t * vocab ** (1 - i) for i, t in enumerate(probe.generate(prompt, plain.model_copy(update={"seed": s}), depth=0).token_ids))
               for s in range(2500)]  # fmt: skip
    assert goodness_of_fit(torch.tensor(ignored), expected) < ALPHA
