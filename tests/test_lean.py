"""The lean backend computes what transformers computes, on every architecture it claims."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.conftest import SHARED_MODELS, SHARED_PROMPTS, llama, make_engine, random_prompts, save
from verispec.config import SamplingParams
from verispec.errors import UserError
from verispec.models import LeanLM, TransformersLM, load_model
from verispec.models.kernels import kernel_library
from verispec.prompts import load_prompts

VOCAB = 64
CPU, F32 = torch.device("cpu"), torch.float32
# float32 on the CPU: the two implementations differ only in summation order.
ATOL = 1e-4


def qwen2(seed: int):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # random QKV biases, so that they matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def mistral(seed: int):
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, sliding_window=None, initializer_range=0.2,
    )
    return MistralForCausalLM(config)


def rounded(model, dtype: torch.dtype):
    """The model with every weight rounded to `dtype`, kept in float32: a float16 or bfloat16
    checkpoint, which the lean backend runs with its 16-bit weight kernel. For bfloat16, one
    entry per matrix is set below float16's range, as in real bfloat16 checkpoints (values of
    ordinary size rounded to bfloat16 fit float16 exactly, which the backend then prefers)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(dtype).float())
            if dtype == torch.bfloat16 and parameter.dim() == 2:
                parameter[0, 0] = 2.0**-40
    return model


@pytest.fixture(scope="module")
def architectures(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("lean-archs")
    tied = llama(VOCAB, layers=2, seed=50)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    return {
        "llama-gqa-untied": tiny_models["llama"],
        "llama-tied": save(tied, root / "llama-tied", VOCAB),
        "qwen2-bias-tied": save(qwen2(51), root / "qwen2", VOCAB),
        "mistral-mqa": save(mistral(52), root / "mistral", VOCAB),
        "llama-float16": save(rounded(llama(VOCAB, layers=2, seed=56), torch.float16), root / "llama-f16", VOCAB),
        "qwen2-bfloat16": save(rounded(qwen2(57), torch.bfloat16), root / "qwen2-bf16", VOCAB),
    }


FORMS = {"llama-float16": "widen-f16", "qwen2-bfloat16": "widen-bf16"}


@pytest.mark.parametrize(
    "arch", ["llama-gqa-untied", "llama-tied", "qwen2-bias-tied", "mistral-mqa", "llama-float16", "qwen2-bfloat16"]
)
def test_logits_match_transformers(architectures, arch):
    lean = load_model(architectures[arch], CPU, F32, backend="lean")
    reference = load_model(architectures[arch], CPU, F32, backend="transformers")
    assert isinstance(lean, LeanLM) and isinstance(reference, TransformersLM)
    expected_form = FORMS.get(arch, "onednn") if kernel_library() else "onednn"
    assert {layer.qkv.form for layer in lean.layers} | {lean.lm_head.form} == {expected_form}
    for prompt in random_prompts(3, VOCAB, seed=53, min_len=5, max_len=40):
        a, b = lean.session(), reference.session()
        torch.testing.assert_close(a.extend(prompt), b.extend(prompt), atol=ATOL, rtol=0)  # prefill
        for step in ([7], [3, 9, 11], [5]):  # decode and verify passes
            torch.testing.assert_close(a.extend(step), b.extend(step), atol=ATOL, rtol=0)
        a.rollback(len(prompt) + 1)  # drop rejected positions, then continue
        b.rollback(len(prompt) + 1)
        torch.testing.assert_close(a.extend([2, 4]), b.extend([2, 4]), atol=ATOL, rtol=0)
        torch.testing.assert_close(a.extend([8], last_only=True), b.extend([8], last_only=True), atol=ATOL, rtol=0)


def test_rollback_is_a_rewind(tiny_models):
    lm = load_model(tiny_models["llama"], CPU, F32, backend="lean")
    session = lm.session()
    session.extend([1, 2, 3, 4, 5])
    keys_before = session.keys[0].data_ptr()
    session.extend([6, 7, 8])
    session.rollback(5)
    assert session.length == 5 and session.keys[0].data_ptr() == keys_before  # no copy, no reallocation
    fresh = lm.session()
    fresh.extend([1, 2, 3, 4, 5])
    torch.testing.assert_close(session.extend([9, 10]), fresh.extend([9, 10]))


def test_auto_picks_lean_where_supported_and_falls_back(tiny_models):
    assert load_model(tiny_models["llama"], CPU, F32).backend == "lean"
    assert load_model(tiny_models["gpt2"], CPU, F32).backend == "transformers"
    with pytest.raises(UserError, match="lean backend cannot run"):
        load_model(tiny_models["gpt2"], CPU, F32, backend="lean")


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_speculative_on_lean_equals_verifier_only(tiny_models, proposer):
    engine = make_engine(tiny_models["llama"], tiny_models["llama-draft"], proposer=proposer, backend="lean")
    for prompt in random_prompts(8, VOCAB, seed=54):
        reference = engine.generate(prompt, SamplingParams(max_new_tokens=30), depth=0)
        for depth in (1, 3, 8, "auto"):
            assert engine.generate(prompt, SamplingParams(max_new_tokens=30), depth=depth).token_ids == reference.token_ids


@pytest.mark.skipif(not (SHARED_MODELS / "ref-code-target").is_dir(), reason="reference models absent")
def test_reference_pair_greedy_identical_across_backends():
    target, draft = str(SHARED_MODELS / "ref-code-target"), str(SHARED_MODELS / "ref-code-draft")
    lean = make_engine(target, draft, backend="lean")
    hf = make_engine(target, draft, backend="transformers")
    params = SamplingParams(max_new_tokens=48)
    for prompt in load_prompts(SHARED_PROMPTS, limit=4):
        expected = hf.generate(prompt.text, params, depth=0).token_ids
        assert lean.generate(prompt.text, params, depth=0).token_ids == expected
        assert lean.generate(prompt.text, params, depth=3).token_ids == expected


def test_compiled_step_matches_eager(tiny_models):
    eager = load_model(tiny_models["llama"], CPU, F32, backend="lean")
    compiled = load_model(tiny_models["llama"], CPU, F32, backend="lean", compile=True)
    a, b = eager.session(), compiled.session()
    prompt = random_prompts(1, VOCAB, seed=55, min_len=12, max_len=12)[0]
    torch.testing.assert_close(a.extend(prompt), b.extend(prompt), atol=ATOL, rtol=0)
    for step in ([7], [3, 9, 11, 2], [5], [1, 2, 3, 4]):  # several positions and widths, one graph
        torch.testing.assert_close(a.extend(step), b.extend(step), atol=ATOL, rtol=0)
    a.rollback(14)
    b.rollback(14)
    torch.testing.assert_close(a.extend([6]), b.extend([6]), atol=ATOL, rtol=0)
