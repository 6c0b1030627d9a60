"""`--activations q8` end to end: a GGUF model whose block-quantized projections run with 8-bit
activations (csrc/quant_int8.c) is a model of its own, chosen and shown (path report, identity),
and exact as any other: a position's logits are the same bits at any pass width, and speculative
greedy output equals verifier-only output under that model. Refused, with what to do, where it
cannot apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import engine_for, save_tokenizer, with_rounded_inputs
from tests.test_gguf import CASES, CPU, QUANTIZED_CASES, VOCAB, write_gguf
from tests.test_quant_int8 import quantized_activations
from verispec.config import ModelSettings, SamplingParams, SpeculationSettings
from verispec.errors import UserError
from verispec.models import load_model
from verispec.models.kernels import kernel_library
from verispec.models.loading import numeric_model
from verispec.models.quant import QuantLinear
from verispec.proposers import NgramProposer

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no compiled kernel here")


@pytest.fixture(scope="module", params=sorted(QUANTIZED_CASES))
def q8_case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf-q8") / f"tiny-{request.param}.gguf"
    write_gguf(path, CASES[request.param], tied=request.param in ("q4_1", "q4_k_m"))
    return request.param, path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(folder, VOCAB)
    return AutoTokenizer.from_pretrained(folder)


def test_q8_is_a_model_of_its_own_exact_at_any_width_and_depth(q8_case, tokenizer, monkeypatch):
    case, path = q8_case
    exact = load_model(str(path), CPU, torch.float32)
    lm = load_model(str(path), CPU, torch.float32, activations="q8")
    report = lm.path_report()
    assert lm.kernel_step and report["activations"] == "q8" and exact.path_report()["activations"] == "float"

    prompt, more = [5, 17, 3, 42, 9], [11, 30, 2, 60, 8, 13, 21]
    session = lm.session()
    session.extend(prompt)
    wide = session.extend(more)
    # The model it claims to be: the float model whose quantized projections see their input
    # quantized to 8 bits (the per-operation path, activations rounded in numpy as the kernel
    # rounds them); not bit for bit, as a summation-order difference upstream can move a value
    # across a rounding boundary of the next quantization (one step of 1/127 of its block), but
    # within a few such steps (a wrong layout or sign is off wholesale). And not the float model.
    def quantized(x):
        return torch.from_numpy(quantized_activations(x.numpy()).astype(np.float32))

    expected = with_rounded_inputs(exact, QuantLinear, quantized, prompt + more, monkeypatch)[len(prompt) :]
    float_logits = exact.session().extend(prompt + more)[len(prompt) :]
    scale = float_logits.abs().max()
    assert (wide - expected).abs().max() <= 0.03 * scale, case
    assert not torch.equal(wide, float_logits), case
    session.rollback(len(prompt))
    for i, token in enumerate(more):  # decoded alone: the same bits as verified among 7
        assert torch.equal(session.extend([token])[0], wide[i]), (case, i)

    ids = [1 + (7 * i) % (VOCAB - 1) for i in range(12)] * 2
    outputs = {}
    for depth in (0, 3):
        engine = engine_for(lm, tokenizer, NgramProposer(4, 1), SpeculationSettings(depth=depth))
        outputs[depth] = engine.generate(ids, SamplingParams(max_new_tokens=20)).token_ids
    assert outputs[0] == outputs[3], case


def test_q8_on_weights_with_no_block_quantized_matrix_says_what_to_do(tmp_path):
    path = tmp_path / "f16.gguf"
    write_gguf(path, {"*": CASES["f16"]["*"]})
    with pytest.raises(UserError, match="--weights-dtype q8_0"):
        load_model(str(path), CPU, torch.float32, activations="q8")
    with pytest.raises(UserError, match="lean backend"):
        load_model(str(path), CPU, torch.float32, backend="transformers", activations="q8")


def test_the_numeric_model_is_part_of_the_identity():
    assert numeric_model() == ""
    assert numeric_model("auto", "q8") == "+activations=q8"
    assert numeric_model("q8_0", "q8") == "+weights=q8_0+activations=q8"
    assert ModelSettings(activations="q8").activations == "q8"
    with pytest.raises(ValueError):
        ModelSettings(activations="int4")
