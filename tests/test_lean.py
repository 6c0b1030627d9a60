"""The lean backend computes what transformers computes, on every architecture it claims."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.conftest import EOS, SHARED_MODELS, SHARED_PROMPTS, llama, make_engine, random_prompts, save
from verispec.config import SamplingParams
from verispec.errors import UserError
from verispec.models import LeanGPT2, LeanLM, TransformersLM, load_model
from verispec.models.kernels import kernel_library
from verispec.models.lean import lean_support
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


def gpt2(seed: int, **config):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2,
        bos_token_id=EOS, eos_token_id=EOS, **config,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # random biases and LayerNorm parameters (initialised to 0 and 1), so that they matter
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.5)
            elif ".ln_" in name:
                parameter.normal_(1, 0.3)
    return model


def unprefixed(path: str) -> str:
    """The checkpoint at `path` with keys as in the original GPT-2 conversions: no "transformer."
    prefix, and each layer's causal-mask buffer (attn.bias) stored with the weights."""
    weights = {name.removeprefix("transformer."): w for name, w in load_file(f"{path}/model.safetensors").items()}
    positions = weights["wpe.weight"].shape[0]
    mask = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
    for name in [n for n in weights if n.endswith(".attn.c_attn.bias")]:
        weights[name.replace(".c_attn.bias", ".bias")] = mask.clone()
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


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
        "gpt2-biases": save(gpt2(58), root / "gpt2", VOCAB),
        "gpt2-gelu-unscaled": save(gpt2(59, activation_function="gelu", scale_attn_weights=False), root / "gpt2-gelu", VOCAB),
        "gpt2-unprefixed": unprefixed(save(gpt2(60), root / "gpt2-unprefixed", VOCAB)),
        "gpt2-float16": save(rounded(gpt2(61), torch.float16), root / "gpt2-f16", VOCAB),
    }


FORMS = {"llama-float16": "widen-f16", "qwen2-bfloat16": "widen-bf16", "gpt2-float16": "widen-f16"}


@pytest.mark.parametrize(
    "arch",
    [
        "llama-gqa-untied", "llama-tied", "qwen2-bias-tied", "mistral-mqa", "llama-float16", "qwen2-bfloat16",
        "gpt2-biases", "gpt2-gelu-unscaled", "gpt2-unprefixed", "gpt2-float16",
    ],
)  # fmt: skip
def test_logits_match_transformers(architectures, arch):
    lean = load_model(architectures[arch], CPU, F32, backend="lean")
    reference = load_model(architectures[arch], CPU, F32, backend="transformers")
    assert isinstance(lean, LeanGPT2 if arch.startswith("gpt2") else LeanLM) and isinstance(reference, TransformersLM)
    expected_form = FORMS.get(arch, "dense") if kernel_library() else "dense"  # tiny float32: F.linear
    linears = lean.linears()
    assert len(linears) == 4 * len(lean.layers) + 1  # four projections per layer, and the head
    assert {linear.form for linear in linears} == {expected_form}
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


def test_auto_picks_lean_where_supported_and_falls_back(tiny_models, tmp_path):
    assert load_model(tiny_models["llama"], CPU, F32).backend == "lean"
    assert isinstance(load_model(tiny_models["gpt2"], CPU, F32), LeanGPT2)
    torch.manual_seed(62)
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=256, bos_token_id=EOS, eos_token_id=EOS,
        )
    )
    unsupported = save(neox, tmp_path / "gpt-neox", VOCAB)
    assert load_model(unsupported, CPU, F32).backend == "transformers"
    with pytest.raises(UserError, match="lean backend cannot run"):
        load_model(unsupported, CPU, F32, backend="lean")


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "GPT-2 with scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "GPT-2 with reorder_and_upcast_attn"),
        ({"add_cross_attention": True}, "GPT-2 with add_cross_attention"),
        ({"activation_function": "relu"}, "activation 'relu'"),
    ],
)
def test_lean_refuses_gpt2_variants_it_does_not_compute(tmp_path, config, reason):
    assert lean_support(save(gpt2(63, **config), tmp_path / "gpt2", VOCAB)) == reason


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
@pytest.mark.parametrize("target, draft", [("llama", "llama-draft"), ("gpt2", "gpt2-biases")])
def test_speculative_on_lean_equals_verifier_only(tiny_models, architectures, target, draft, proposer):
    models = {**tiny_models, **architectures}  # GPT-2 drafted by another GPT-2 (other weights, 4 heads not 2)
    engine = make_engine(models[target], models[draft], proposer=proposer, backend="lean")
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


# GPT-2's graph compiles from a cold inductor cache in over a minute on two cores: slow suite only.
@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_compiled_step_matches_eager(tiny_models, arch):
    eager = load_model(tiny_models[arch], CPU, F32, backend="lean")
    compiled = load_model(tiny_models[arch], CPU, F32, backend="lean", compile=True)
    a, b = eager.session(), compiled.session()
    prompt = random_prompts(1, VOCAB, seed=55, min_len=12, max_len=12)[0]
    torch.testing.assert_close(a.extend(prompt), b.extend(prompt), atol=ATOL, rtol=0)
    for step in ([7], [3, 9, 11, 2], [5], [1, 2, 3, 4]):  # several positions and widths, one graph
        torch.testing.assert_close(a.extend(step), b.extend(step), atol=ATOL, rtol=0)
    a.rollback(14)
    b.rollback(14)
    torch.testing.assert_close(a.extend([6]), b.extend([6]), atol=ATOL, rtol=0)
