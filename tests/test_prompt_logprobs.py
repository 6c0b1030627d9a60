"""Prompt logprobs (`SamplingParams.prompt_logprobs`, OpenAI's `echo` with `logprobs`): each prompt
token's log-probability given the tokens before it, from position 1 on, on the request's first Delta.

The reference is the Hugging Face model's own forward over the whole prompt, log-softmaxed in
float64; the engine's figures are float32 logits of the lean kernel step (weights float16 holds
exactly, float32 arithmetic in another order), so they agree to rounding: a few ulps of logits of
magnitude ~10, far inside 1e-4. Between engine runs (depths, proposers, batches, chunk sizes, the
prefix cache) the kernel step gives the same bits, so those comparisons are exact.
"""

from __future__ import annotations

import re

import pytest
import torch
from pydantic import ValidationError

from tests.conftest import SHARED_MODELS, SHARED_PROMPTS, make_engine, run_verispec
from tests.test_batching import engine, exact_pair, kernel_models, prompts
from verispec.config import SamplingParams, SpeculationSettings
from verispec.core.rounds import TokenLogprob, token_logprobs
from verispec.models.kernels import kernel_library

kernel = pytest.mark.skipif(kernel_library() is None, reason="no C compiler or no AVX2/FMA/F16C here")
TOL = 1e-4  # float32 kernel step against float64 log-softmax of the HF forward (see the module docstring)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = exact_pair(tmp_path_factory.mktemp("prompt-logprob-models"), seed=31)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(paths["target"], dtype=torch.float32).eval()
    return {**kernel_models(paths), "hf": hf}


def reference(hf, prompt: list[int], top: int, bias: dict[int, float] | None = None) -> list[tuple[float, list[int]]]:
    """Per prompt position 1.., the token's float64 log-probability under the HF forward of the
    whole prompt (plus `bias`), and the `top` most likely tokens there."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].double()  # (n, V)
    for token, value in (bias or {}).items():
        logits[:, token] += value
    logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for i in range(1, len(prompt)):
        row = logprobs[i - 1]
        out.append((float(row[prompt[i]]), row.topk(top).indices.tolist() if top else []))
    return out


def run(core, jobs) -> dict[str, dict]:
    """Run jobs (name, prompt, params, proposer, depth) together: each one's tokens, its first
    delta's prompt logprobs, and how many of its deltas carried any."""
    out, names = {}, {}
    for name, prompt, params, proposer, depth in jobs:
        speculation = SpeculationSettings(depth=depth, proposer_timeout_s=60.0, max_depth=6)
        names[core.add(name, prompt, params, speculation, proposer)] = name
        out[name] = {"tokens": [], "prompt": None, "carried": 0, "request": None}
    for request, name in names.items():
        out[name]["request"] = request
    steps = 0
    while core.busy:
        for request, delta in core.step():
            got = out[names[request]]
            if not got["tokens"]:
                got["prompt"] = delta.prompt_logprobs
            got["carried"] += delta.prompt_logprobs is not None
            got["tokens"] += delta.token_ids
        steps += 1
        assert steps < 5000, "the engine stopped making progress"
    return out


def check_against_reference(scores: list[TokenLogprob], prompt: list[int], expected, top: int) -> None:
    assert len(scores) == len(prompt) - 1  # position 0 has no logprob
    for i, (entry, (logprob, best)) in enumerate(zip(scores, expected, strict=True), start=1):
        assert entry.token == prompt[i]
        assert entry.logprob == pytest.approx(logprob, abs=TOL), i
        assert len(entry.top) == top
        assert [t for t, _ in entry.top] == best, i
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)


def test_the_field_is_validated_like_logprobs():
    assert SamplingParams().prompt_logprobs is None
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    assert SamplingParams(prompt_logprobs=20).prompt_logprobs == 20
    for bad in (-1, 21):
        with pytest.raises(ValidationError):
            SamplingParams(prompt_logprobs=bad)


@kernel
def test_prompt_logprobs_are_the_verifiers_log_softmax(models):
    """Every position 1.. against the HF forward of the whole prompt; a one-token prompt has none.
    And to the bit what `token_logprobs` makes of the lean model's own single-sequence logits."""
    core = engine(models, max_running=1)
    texts = prompts(41, 5, 2, 60) + [[7]]
    for top in (0, 3):
        params = SamplingParams(max_new_tokens=4, prompt_logprobs=top)
        for prompt in texts:
            got = run(core, [("r", prompt, params, None, 0)])["r"]
            check_against_reference(got["prompt"], prompt, reference(models["hf"], prompt, top), top)
            assert got["carried"] == 1  # the first delta only
            if len(prompt) > 1:
                own = models["target"].session().extend(prompt[:-1])
                assert got["prompt"] == token_logprobs(own, prompt[1:], top)


@kernel
def test_logit_bias_applies_and_the_other_controls_do_not(models):
    """The prompt's logits take the request's bias; penalties, the token floor and temperature
    describe how output is drawn, and leave the prompt's figures alone."""
    core = engine(models, max_running=1)
    prompt = prompts(42, 1, 30, 30)[0]
    bias = {prompt[3]: 2.5, 5: -100.0, 9: 1.0}
    biased = SamplingParams(max_new_tokens=4, prompt_logprobs=2, logit_bias=bias)
    got = run(core, [("r", prompt, biased, None, 0)])["r"]["prompt"]
    check_against_reference(got, prompt, reference(models["hf"], prompt, 2, bias), 2)
    controls = biased.model_copy(
        update={"presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3, "min_tokens": 3, "temperature": 0.7, "seed": 1}
    )
    assert run(core, [("r", prompt, controls, None, 0)])["r"]["prompt"] == got


@kernel
def test_the_same_bits_at_any_depth_proposer_and_batch_and_the_same_output(models):
    """Each request alone at depth 0, then on the draft model and the n-gram proposer at depths 0,
    2 and auto, all together with requests that ask for none: the same prompt logprobs to the bit,
    and the tokens the same request generates without asking for them."""
    texts = prompts(43, 4, 2, 50)
    asked = [SamplingParams(max_new_tokens=12, prompt_logprobs=2)] * 2 + [
        SamplingParams(max_new_tokens=12, prompt_logprobs=0, temperature=0.8, seed=3),
        SamplingParams(max_new_tokens=12, prompt_logprobs=5, logit_bias={4: 3.0}),
    ]
    single = engine(models, max_running=1)
    alone, plain = {}, {}
    for i, (prompt, params) in enumerate(zip(texts, asked, strict=True)):
        alone[i] = run(single, [("r", prompt, params, None, 0)])["r"]
        plain[i] = run(single, [("r", prompt, params.model_copy(update={"prompt_logprobs": None}), None, 0)])["r"]
        assert alone[i]["tokens"] == plain[i]["tokens"] and plain[i]["prompt"] is None
    others = [(f"o{i}", p, SamplingParams(max_new_tokens=9), models["draft"], "auto") for i, p in enumerate(prompts(44, 3, 1, 40))]
    for proposer in ("draft", "ngram"):
        for depth in (0, 2, "auto"):
            jobs = [(str(i), p, q, models[proposer], depth) for i, (p, q) in enumerate(zip(texts, asked, strict=True))]
            together = run(engine(models, max_running=8), jobs + others)
            for i in alone:
                assert together[str(i)]["prompt"] == alone[i]["prompt"], (i, proposer, depth)
                assert together[str(i)]["tokens"] == alone[i]["tokens"], (i, proposer, depth)
                assert together[str(i)]["carried"] == 1


@kernel
def test_a_cached_prefix_is_scored_anyway(models):
    """A prompt whose blocks the prefix cache holds: a request asking for prompt logprobs reads
    every position itself (and generates what the cached run generated); one that does not still
    takes the cached blocks."""
    core = engine(models, max_running=2)
    prompt = prompts(45, 1, 70, 70)[0]
    params = SamplingParams(max_new_tokens=10)
    first = run(core, [("a", prompt, params, None, 0)])["a"]
    warm = run(core, [("b", prompt, params.model_copy(update={"prompt_logprobs": 1}), models["draft"], 2)])["b"]
    assert warm["request"].stats.cached_tokens == 0
    assert warm["tokens"] == first["tokens"]
    cold = run(engine(models, prefix_cache=False), [("c", prompt, params.model_copy(update={"prompt_logprobs": 1}), None, 0)])["c"]
    assert warm["prompt"] == cold["prompt"] and len(warm["prompt"]) == len(prompt) - 1
    again = run(core, [("d", prompt, params, None, 0)])["d"]
    assert again["request"].stats.cached_tokens == 64  # the cache still serves those that do not ask


@kernel
def test_a_chunked_prompt_gets_every_position(models):
    """A prompt past the pass's row budget prefills in chunks (alone, and in the small chunks left
    beside running rounds): every position, the same bits as one chunk."""
    prompt = prompts(46, 1, 150, 150)[0]
    params = SamplingParams(max_new_tokens=6, prompt_logprobs=3)
    whole = run(engine(models, max_pass_tokens=256), [("r", prompt, params, None, 0)])["r"]
    check_against_reference(whole["prompt"], prompt, reference(models["hf"], prompt, 3), 3)
    chunked_engine = engine(models, max_pass_tokens=16)
    beside = [(f"o{i}", p, SamplingParams(max_new_tokens=40), models["ngram"], 2) for i, p in enumerate(prompts(47, 3, 2, 5))]
    chunked = run(chunked_engine, [("r", prompt, params, models["draft"], "auto"), *beside])["r"]
    assert chunked["prompt"] == whole["prompt"] and chunked["tokens"] == whole["tokens"]
    assert chunked["request"].stats.prefill_s > 0


@kernel
def test_a_request_preempted_while_prefilling_scores_each_position_once(models):
    """Preempted halfway through its prompt, a request keeps the positions it scored, takes back
    from the prefix cache only blocks it scored itself, and scores the rest on its return."""
    prompt = prompts(48, 1, 120, 120)[0]
    params = SamplingParams(max_new_tokens=5, prompt_logprobs=2)
    expected = run(engine(models), [("r", prompt, params, None, 0)])["r"]
    core = engine(models, max_pass_tokens=40)
    request = core.add("r", prompt, params, SpeculationSettings(depth=2, proposer_timeout_s=60.0), models["draft"])
    assert core.step() == [] and core.step() == []  # two chunks of 40 rows
    assert len(request.prompt_logprobs) == 80
    core.preempt(request)
    deltas = []
    while core.busy:
        deltas += [d for r, d in core.step() if r is request]
    assert request.stats.cached_tokens == 0  # counted on its first admission only
    assert deltas[0].prompt_logprobs == expected["prompt"]
    assert [t for d in deltas for t in d.token_ids] == expected["tokens"]
    assert all(d.prompt_logprobs is None for d in deltas[1:])


@kernel
def test_generate_and_stream_carry_them(models):
    core = engine(models, max_running=1)
    prompt = prompts(49, 1, 20, 20)[0]
    params = SamplingParams(max_new_tokens=8, prompt_logprobs=1)
    deltas = list(core.stream(prompt, params, depth=2, proposer=models["draft"]))
    assert len(deltas[0].prompt_logprobs) == len(prompt) - 1
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    done = core.generate(prompt, params, depth=0)
    assert done.prompt_logprobs == deltas[0].prompt_logprobs
    assert done.token_ids == [t for d in deltas for t in d.token_ids]
    assert core.generate(prompt, SamplingParams(max_new_tokens=8)).prompt_logprobs is None


@pytest.mark.parametrize(("model", "backend"), [("gpt2", "transformers"), ("gpt2", "lean"), ("llama", "lean")])
def test_the_other_runners(tiny_models, model, backend):
    """GPT-2 runs one sequence per pass (`SessionRunner`, the prompt read whole); a Llama whose
    weights 16 bits cannot hold runs the batched runner on torch operators: the same figures, at
    depth 0 and speculating."""
    from transformers import AutoModelForCausalLM

    path = tiny_models[model]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    core = make_engine(path, proposer="ngram", backend=backend, ngram_min=1)
    assert core.runner.chunks_prompts == (model == "llama")
    prompt = [5, 9, 3, 5, 9, 3, 5, 9, 12, 40, 2, 7, 5, 9]
    params = SamplingParams(max_new_tokens=10, prompt_logprobs=4)
    at_zero = core.generate(prompt, params, depth=0)
    check_against_reference(at_zero.prompt_logprobs, prompt, reference(hf, prompt, 4), 4)
    speculating = core.generate(prompt, params, depth=3)
    assert speculating.token_ids == at_zero.token_ids
    assert speculating.prompt_logprobs == at_zero.prompt_logprobs  # the same one segment: the same bits


def test_generate_prints_them(tiny_models):
    """`verispec generate --prompt-logprobs N` prints the prompt's table, from position 1."""
    done = run_verispec(
        "generate", "t1 t2 t3 t4", "--target", tiny_models["llama"], "--proposer", "none", "--max-new-tokens", "3",
        "--prompt-logprobs", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = done.stderr.split("prompt logprobs")[1]
    rows = [re.findall(r"(\d+)\W+'(t\d+)'", line)[0] for line in table.splitlines() if re.search(r"\d+\W+'t\d+'", line)]
    assert rows == [("1", "t2"), ("2", "t3"), ("3", "t4")]


@pytest.mark.skipif(not (SHARED_MODELS / "ref-code-target").is_dir() or not SHARED_PROMPTS.is_file(), reason="reference pair absent")
def test_the_reference_pair():
    """A trained code model (float16 weights, the kernel step): the HF forward's figures, the same
    at depth 0 and speculating on its draft, and the same output."""
    from transformers import AutoModelForCausalLM

    from verispec.prompts import load_prompts

    target, draft = str(SHARED_MODELS / "ref-code-target"), str(SHARED_MODELS / "ref-code-draft")
    core = make_engine(target, draft)
    prompt = core.encode(load_prompts(SHARED_PROMPTS, limit=1)[0].text)
    params = SamplingParams(max_new_tokens=24, prompt_logprobs=3)
    at_zero = core.generate(prompt, params, depth=0)
    speculating = core.generate(prompt, params, depth="auto")
    assert speculating.prompt_logprobs == at_zero.prompt_logprobs
    assert speculating.token_ids == at_zero.token_ids == core.generate(prompt, SamplingParams(max_new_tokens=24), depth=0).token_ids
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    got = [entry.logprob for entry in at_zero.prompt_logprobs]
    expected = [logprob for logprob, _ in reference(hf, prompt, 3)]
    assert len(got) == len(prompt) - 1
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < TOL
