"""`--activations bf16`: float weight matrices rounded to bfloat16 and multiplied by activations
rounded to bfloat16, the products summed in float32 (csrc/bf16_dot.c: on AMX tiles where the CPU
has them, else on the widened kernel). A model of its own, chosen and shown, and exact as any
other: a projection's output row is the same bits at any number of rows, on either path, and
speculative greedy output equals verifier-only output under that model, alone or batched."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import engine_for, random_prompts, run_together, with_rounded_inputs
from tests.test_gguf import CASES, CPU, write_gguf
from verispec.config import ModelSettings, SamplingParams, SpeculationSettings
from verispec.errors import UserError
from verispec.models import load_model, load_tokenizer
from verispec.models.kernels import Linear, kernel_library
from verispec.models.loading import numeric_model
from verispec.proposers import DraftModelProposer, NgramProposer

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no compiled kernel here")


@pytest.fixture(params=["best", "widened"])
def bf16_path(request):
    """Each path this machine can run: its best (AMX where it has it), and the widened one."""
    library = kernel_library()
    if request.param == "widened":
        library.bf16_dot_amx(-1)
    elif not library.bf16_dot_amx(0):
        pytest.skip("no AMX here: the best path is the widened one")
    yield request.param
    library.bf16_dot_amx(1)


def rounded(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


@pytest.mark.parametrize("out_features, in_features", [(96, 32), (37, 70), (130, 256), (512, 1344)])
def test_a_row_is_the_bfloat16_product_and_the_same_bits_at_any_width_and_thread_count(bf16_path, out_features, in_features):
    torch.manual_seed(out_features)
    weight = rounded(torch.randn(out_features, in_features) * 0.05)
    bias = torch.randn(out_features)
    linear = Linear(weight, bias, activations="bf16")
    assert linear.form == "bf16-dot" and linear.on_kernel and linear.activations == "bf16"
    x = torch.randn(70, in_features)
    y = linear(x)

    expected = rounded(x).double() @ weight.double().T + bias.double()
    bound = (rounded(x).abs().double() @ weight.abs().double().T) * 2**-20 + 1e-6  # float32 sums of exact products
    assert ((y.double() - expected).abs() <= bound).all()
    assert not torch.allclose(y, x @ weight.T + bias, rtol=0, atol=1e-7)  # the activations were rounded

    alone = torch.cat([linear(x[i : i + 1]) for i in range(len(x))])
    chunks = torch.cat([linear(x[:5]), linear(x[5:22]), linear(x[22:38]), linear(x[38:])])
    assert torch.equal(alone, y) and torch.equal(chunks, y)

    threads = torch.get_num_threads()
    try:  # and whatever number of threads share the columns out
        for n in (1, 3):
            torch.set_num_threads(n)
            assert torch.equal(linear(x), y), n
    finally:
        torch.set_num_threads(threads)

    residual = torch.randn(len(x), out_features)
    added = residual.clone()
    linear.into(x.contiguous(), added, accumulate=True)
    assert torch.equal(added, residual + y)


def test_bf16_activations_need_bfloat16_weights():
    with pytest.raises(ValueError, match="bfloat16 weight"):
        Linear(torch.randn(16, 32) * 0.05, activations="bf16")


@pytest.fixture(scope="module")
def bf16_pair(tiny_models):
    """The tiny target and draft under --activations bf16, on this machine's best path."""
    target = load_model(tiny_models["llama"], CPU, torch.float32, activations="bf16")
    draft = load_model(tiny_models["llama-draft"], CPU, torch.float32, role="draft", activations="bf16")
    return target, draft


def test_bf16_is_a_model_of_its_own_exact_at_any_width(bf16_path, tiny_models, monkeypatch):
    exact = load_model(tiny_models["llama"], CPU, torch.float32)
    lm = load_model(tiny_models["llama"], CPU, torch.float32, activations="bf16")  # packed for this path
    report = lm.path_report()
    assert lm.kernel_step and report["activations"] == "bf16" and report["forms"] == {"bf16-dot": len(lm.linears())}
    assert exact.path_report()["activations"] == "float"

    prompt, more = [5, 17, 3, 42, 9], [11, 30, 2, 60, 8, 13, 21]
    session = lm.session()
    session.extend(prompt)
    wide = session.extend(more)
    # The model it claims to be: the weights rounded to bfloat16 (--weights-dtype bfloat16), every
    # projection's input rounded to bfloat16, sums in float32; not bit for bit (the order of the
    # sums differs, and a rounding of the next input can move with it), but close, and not the
    # float model.
    converted = load_model(tiny_models["llama"], CPU, torch.float32, weights_dtype="bfloat16")
    expected = with_rounded_inputs(converted, Linear, rounded, prompt + more, monkeypatch)[len(prompt) :]
    float_logits = exact.session().extend(prompt + more)[len(prompt) :]
    scale = float_logits.abs().max()
    assert (wide - expected).abs().max() <= 0.02 * scale
    assert not torch.equal(wide, float_logits)
    session.rollback(len(prompt))
    for i, token in enumerate(more):  # decoded alone: the same bits as verified among 7
        assert torch.equal(session.extend([token])[0], wide[i]), i


def test_speculation_under_bf16_is_exact_alone_and_batched(bf16_pair, tiny_models):
    target, draft = bf16_pair
    tokenizer = load_tokenizer(tiny_models["llama"])
    params = SamplingParams(max_new_tokens=24)
    prompts = random_prompts(4, 64, seed=11, min_len=3, max_len=20)
    drafted = engine_for(target, tokenizer, DraftModelProposer(draft, target_vocab_size=target.vocab_size))
    reference = [drafted.generate(p, params, depth=0).token_ids for p in prompts]
    proposed = 0
    for depth in (1, 4):
        for prompt, expected in zip(prompts, reference, strict=True):
            out = drafted.generate(prompt, params, depth=depth)
            assert out.token_ids == expected, (depth, prompt)
            proposed += out.stats.proposed
    assert proposed > 0
    together, _ = run_together(drafted, prompts, params, depth=3)
    assert together == reference
    ngram = engine_for(target, tokenizer, NgramProposer(4, 1), SpeculationSettings(depth=3))
    assert [ngram.generate(p, params).token_ids for p in prompts] == reference


def test_bf16_where_it_cannot_apply_says_what_to_do(tiny_models, tmp_path):
    with pytest.raises(UserError, match="leave --weights-dtype at auto"):
        load_model(tiny_models["llama"], CPU, torch.float32, weights_dtype="float16", activations="bf16")
    with pytest.raises(UserError, match="lean backend"):
        load_model(tiny_models["llama"], CPU, torch.float32, backend="transformers", activations="bf16")
    with pytest.raises(UserError, match="needs the compiled CPU kernel"):
        load_model(tiny_models["llama"], CPU, torch.float32, cpu_kernel=False, activations="bf16")
    path = tmp_path / "q8_0.gguf"
    write_gguf(path, CASES["q8_0"])
    with pytest.raises(UserError, match="use --activations q8"):
        load_model(str(path), CPU, torch.float32, activations="bf16")


def test_the_bf16_model_is_part_of_the_identity():
    assert numeric_model("auto", "bf16") == "+activations=bf16"
    assert ModelSettings(activations="bf16").activations == "bf16"
