"""GGUF files as checkpoints: tiny files the tests write with the `gguf` package, one per storage
type, loaded through the normal loading code and checked against transformers running the same
(dequantized) weights in float32; refused types; --weights-dtype for float32 checkpoints."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import engine_for, llama, save
from verispec.config import SamplingParams, SpeculationSettings
from verispec.errors import UserError
from verispec.models import load_model, load_tokenizer
from verispec.models.kernels import kernel_library
from verispec.models.loading import model_name
from verispec.models.quant import QUANTIZED
from verispec.proposers import NgramProposer

T = GGMLQuantizationType
CPU = torch.device("cpu")
# D, F and H * hd are multiples of 256, the block of the K-quants.
D, F, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 64
# The gguf package quantizes these; the others' blocks are drawn at random.
QUANTIZABLE = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
# Byte offsets of the float16 fields (d, and dmin) of the blocks drawn at random.
HALF_FIELDS = {
    T.IQ4_NL: (0,), T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_XS: (0,), T.IQ2_XXS: (0,),
}  # fmt: skip


def _tiny_llama(seed: int = 7) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
        initializer_range=0.05, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _blocks(weight: torch.Tensor, kind: T, rng: np.random.Generator) -> np.ndarray:
    """The weight's rows in `kind`'s blocks: quantized where the package can, else random blocks
    whose float16 scale fields are small and finite (the test then runs whatever they decode to)."""
    array = weight.detach().float().numpy()
    if kind in QUANTIZABLE:
        return gguf_quants.quantize(array, kind)
    block, size = GGML_QUANT_SIZES[kind]
    rows, blocks = array.shape[0], array.shape[1] // block
    data = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    scales = (rng.random((rows, blocks, 2)) * 2e-3 + 1e-4).astype(np.float16).view(np.uint8)
    for i, offset in enumerate(HALF_FIELDS[kind]):
        data[..., offset : offset + 2] = scales[..., 2 * i : 2 * i + 2]
    return data.reshape(rows, blocks * size)


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: a Llama query/key weight's rows, per head, from halves to pairs."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def write_gguf(path, kinds: dict[str, T], tied: bool = False, name: str = "Tiny Test Llama") -> LlamaForCausalLM:
    """A tiny random Llama written as a GGUF file, each matrix in the type `kinds` names for its
    GGUF role ("attn_v", "ffn_down", "token_embd", ... or "*" for the rest); returns the
    transformers model holding exactly the weights the file decodes to."""
    model = _tiny_llama()
    rng = np.random.default_rng(3)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = model.state_dict()
    decoded: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, hf_name: str, role: str, heads: int | None = None) -> None:
        weight = state[hf_name]
        kind = kinds.get(role, kinds["*"])
        if kind == T.F32:
            stored, value = weight.float().numpy(), weight.float()
        elif kind == T.F16:
            stored = weight.half().numpy()
            value = weight.half().float()
        elif kind == T.BF16:
            stored = weight.bfloat16().view(torch.int16).numpy().view(np.uint8).reshape(weight.shape[0], -1)
            value = weight.bfloat16().float()
        else:
            stored = _blocks(weight, kind, rng)
            value = torch.from_numpy(gguf_quants.dequantize(stored, kind))
        decoded[hf_name] = value
        if heads is not None:
            stored = _permute(stored, heads)
        raw = {} if kind in (T.F32, T.F16) else {"raw_dtype": kind}
        writer.add_tensor(gguf_name, stored, **raw)

    add("token_embd.weight", "model.embed_tokens.weight", "token_embd")
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"].numpy())
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"].numpy())
        for hf, role in GGUF_NAMES.items():
            heads = HEADS if role == "attn_q" else KV_HEADS if role == "attn_k" else None
            add(f"blk.{i}.{role}.weight", f"{p}{hf}.weight", role, heads)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    if not tied:
        add("output.weight", "lm_head.weight", "output")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    if tied:
        model.config.tie_word_embeddings = True
        decoded["lm_head.weight"] = decoded["model.embed_tokens.weight"]
    reference = LlamaForCausalLM(model.config).eval()
    reference.load_state_dict({**state, **decoded})
    return reference


CASES = {
    "f32": {"*": T.F32},
    "f16": {"*": T.F16},
    "bf16": {"*": T.BF16},
    "q8_0": {"*": T.Q8_0},
    "q4_0": {"*": T.Q4_0},
    "q4_1": {"*": T.Q4_1, "token_embd": T.Q8_0},
    "q4_k_m": {"*": T.Q4_K, "attn_v": T.Q6_K, "ffn_down": T.Q6_K, "token_embd": T.Q6_K},  # like a Q4_K_M file
    "q5_0": {"*": T.Q5_0},  # Q4_K_M's type for tensors not a multiple of 256 wide (SmolLM2's 576)
    "q5_1": {"*": T.Q5_1},  # Q5_K_M's, likewise
    "iq4_nl": {"*": T.IQ4_NL},
    "q5_k_m": {"*": T.Q5_K, "attn_v": T.Q6_K, "ffn_down": T.Q5_1, "token_embd": T.Q5_0},
    "q3_k_m": {"*": T.Q3_K, "attn_v": T.Q5_K, "ffn_down": T.Q4_K},
    "q2_k": {"*": T.Q2_K, "attn_v": T.Q3_K, "token_embd": T.Q4_K},
    "iq4_xs": {"*": T.IQ4_XS, "token_embd": T.IQ4_NL},
}
QUANTIZED_CASES = {case for case, kinds in CASES.items() if not set(kinds.values()) <= {T.F32, T.F16, T.BF16}}


@pytest.fixture(scope="module", params=list(CASES))
def gguf_case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    reference = write_gguf(path, CASES[request.param], tied=request.param in ("q4_1", "q4_k_m"))
    return request.param, path, reference


def test_a_gguf_file_is_the_model_its_weights_decode_to(gguf_case):
    """Logits equal transformers' float32 forward on the dequantized weights (up to summation
    order), and greedy choices agree, for every storage type."""
    case, path, reference = gguf_case
    lm = load_model(str(path), CPU, torch.float32)
    prompt = [5, 17, 3, 42, 9, 11, 30, 2, 60, 8]
    ours = lm.session().extend(prompt)
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt])).logits[0]
    assert torch.allclose(ours, theirs, atol=2e-4, rtol=1e-4), (case, (ours - theirs).abs().max())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    if kernel_library() is not None:
        report = lm.path_report()
        assert report["kernel_step"] == (case != "f32"), report  # float32 weights 16 bits cannot hold: off
        quantized = any(part in QUANTIZED.values() for form in report["forms"] for part in form.split("+"))
        assert quantized == (case in QUANTIZED_CASES), report["forms"]


def test_a_position_has_the_same_logits_at_any_pass_width(gguf_case):
    """The quantized kernel step, like the 16-bit one: decode alone or verify among k+1."""
    _, path, _ = gguf_case
    lm = load_model(str(path), CPU, torch.float32)
    if not lm.kernel_step:
        pytest.skip("no kernel step here")
    prompt, more = [5, 17, 3, 42, 9], [11, 30, 2, 60, 8, 13, 21]
    session = lm.session()
    session.extend(prompt)
    wide = session.extend(more)
    session.rollback(len(prompt))
    for i, token in enumerate(more):
        alone = session.extend([token])
        assert torch.equal(alone[0], wide[i]), i


def test_the_served_name_is_the_models_own(tmp_path):
    path = tmp_path / "some-file-name.gguf"
    write_gguf(path, {"*": T.Q8_0}, name="Tiny Test Llama")
    assert model_name(str(path)) == "Tiny Test Llama"
    folder = tmp_path / "folder"
    folder.mkdir()
    path.rename(folder / path.name)
    assert model_name(str(folder)) == "Tiny Test Llama"  # a folder holding one GGUF file
    assert load_model(str(folder), CPU, torch.float32).vocab_size == VOCAB


def test_an_unsupported_tensor_type_is_refused_naming_it(tmp_path):
    path = tmp_path / "iq2.gguf"
    write_gguf(path, {"*": T.Q8_0, "ffn_up": T.IQ2_XXS})
    with pytest.raises(UserError, match=r"blk\.0\.ffn_up\.weight is IQ2_XXS.*supported: .*Q4_K") as error:
        load_model(str(path), CPU, torch.float32)
    assert "\n" not in str(error.value)


def test_a_missing_gguf_file_is_named_as_such(tmp_path):
    with pytest.raises(UserError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "nothing.gguf"), CPU, torch.float32)
    with pytest.raises(UserError, match="or a .gguf file"):
        load_model(str(tmp_path / "no-folder"), CPU, torch.float32)


@pytest.fixture(scope="module")
def float32_llama(tmp_path_factory) -> str:
    """A float32 checkpoint no 16-bit type holds exactly (what most conversion scripts write)."""
    root = tmp_path_factory.mktemp("f32")
    return save(llama(64, layers=2, seed=5, hidden=64), root / "llama", 64)


@pytest.mark.skipif(kernel_library() is None, reason="no compiled kernel here")
def test_a_float32_checkpoint_says_why_the_kernel_step_is_off(float32_llama, caplog):
    with caplog.at_level(logging.INFO, logger="verispec.models.loading"):
        lm = load_model(float32_llama, CPU, torch.float32)
    assert not lm.kernel_step
    assert "--weights-dtype" in lm.path_report()["why"]
    # a warning, seen without -v: the user can change it
    off = [r for r in caplog.records if "kernel step off" in r.getMessage()]
    assert off and off[0].levelno == logging.WARNING and "--weights-dtype" in off[0].getMessage()


@pytest.mark.skipif(kernel_library() is None, reason="no compiled kernel here")
@pytest.mark.parametrize(("weights_dtype", "form"), [("float16", "widen-f16"), ("bfloat16", "widen-bf16"), ("q8_0", "q8_0")])
def test_weights_dtype_puts_a_float32_checkpoint_on_the_kernel_step(float32_llama, weights_dtype, form, caplog):
    with caplog.at_level(logging.INFO, logger="verispec.models.loading"):
        lm = load_model(float32_llama, CPU, torch.float32, weights_dtype=weights_dtype)
    # bfloat16-rounded values that float16 also holds run widened from float16: the same values
    assert lm.kernel_step and set(lm.path_report()["forms"]) <= {form, "widen-f16"}
    assert "kernel step on" in caplog.text and form in caplog.text
    tokenizer = load_tokenizer(float32_llama)
    prompt = " ".join(f"t{i % 9 + 1}" for i in range(30))
    outputs = {}
    for depth in (0, 3):
        engine = engine_for(lm, tokenizer, NgramProposer(4, 1), SpeculationSettings(depth=depth))
        outputs[depth] = engine.generate(prompt, SamplingParams(max_new_tokens=24)).token_ids
    assert outputs[0] == outputs[3]
