"""EAGLE-3 heads in their authors' layouts (SafeAILab's EAGLE, SGLang's SpecForge): the loader
reads both, the verifier's taps are Hugging Face's hidden states of the layers the head names,
the head's drafts are what an independent transcription of the authors' forward computes, and
speculation with it is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from tests.conftest import exact_at_depths, random_prompts, run_together, save
from tests.test_batching import _llama, exact16
from verispec.assemble import build_engine, resolve_models
from verispec.config import ModelSettings, SamplingParams, Settings
from verispec.core.goodput import PassCosts
from verispec.core.head_batch import HeadBatch
from verispec.core.kv_cache import BlockTable
from verispec.core.runner import ModelRunner, Segment
from verispec.errors import UserError
from verispec.models import load_model
from verispec.models.eagle3 import Eagle3Head, default_layers
from verispec.models.head import head_kind, load_head
from verispec.models.kernels import kernel_library

CPU = torch.device("cpu")
VOCAB, LAYERS, D, HEADS, KV_HEADS = 64, 8, 64, 4, 2
DRAFT_VOCAB = 40


@pytest.fixture(scope="module")
def target_path(tmp_path_factory) -> str:
    """An 8-layer target whose weights 16 bits hold exactly (the CPU kernel step)."""
    model = exact16(_llama(VOCAB, layers=LAYERS, seed=5, heads=HEADS, kv_heads=KV_HEADS, hidden=D))
    return save(model, tmp_path_factory.mktemp("eagle3") / "target", VOCAB)


def eagle3_weights(seed: int, fc_norm: bool, draft_vocab: int = DRAFT_VOCAB) -> dict[str, torch.Tensor]:
    """Random EAGLE-3 head weights under the authors' names, exact in bfloat16."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.15):
        return (torch.randn(*shape, generator=g) * scale).bfloat16().float()

    hd = D // HEADS
    weights = {
        "fc.weight": w(D, 3 * D),
        "midlayer.input_layernorm.weight": 1 + w(D, scale=0.1),
        "midlayer.hidden_norm.weight": 1 + w(D, scale=0.1),
        "midlayer.post_attention_layernorm.weight": 1 + w(D, scale=0.1),
        "midlayer.self_attn.q_proj.weight": w(HEADS * hd, 2 * D),
        "midlayer.self_attn.k_proj.weight": w(KV_HEADS * hd, 2 * D),
        "midlayer.self_attn.v_proj.weight": w(KV_HEADS * hd, 2 * D),
        "midlayer.self_attn.o_proj.weight": w(D, HEADS * hd),
        "midlayer.mlp.gate_proj.weight": w(2 * D, D),
        "midlayer.mlp.up_proj.weight": w(2 * D, D),
        "midlayer.mlp.down_proj.weight": w(D, 2 * D),
        "norm.weight": 1 + w(D, scale=0.1),
        "lm_head.weight": w(draft_vocab, D, scale=0.6),
    }
    if fc_norm:
        weights.update({f"fc_norm.{i}.weight": 1 + w(D, scale=0.1) for i in range(3)})
    if draft_vocab < VOCAB:  # SafeAILab and SpecForge store offsets: draft id d is target id d + d2t[d]
        ids = torch.randperm(VOCAB, generator=g)[:draft_vocab].sort().values
        weights["d2t"] = ids - torch.arange(draft_vocab)
        t2d = torch.zeros(VOCAB, dtype=torch.bool)
        t2d[ids] = True
        weights["t2d"] = t2d
    return weights


def config(draft_vocab: int = DRAFT_VOCAB, **extra) -> dict:
    return {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": D, "intermediate_size": 2 * D, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "vocab_size": VOCAB, "draft_vocab_size": draft_vocab, "torch_dtype": "bfloat16", **extra,
    }  # fmt: skip


def safeailab(folder: Path, seed: int = 7, draft_vocab: int = DRAFT_VOCAB) -> str:
    """SafeAILab's layout: pytorch_model.bin without the embedding, their training config
    (architectures LlamaForCausalLM beside draft_vocab_size); d2t dropped on a full vocabulary."""
    folder.mkdir(parents=True)
    weights = eagle3_weights(seed, fc_norm=False, draft_vocab=draft_vocab)
    torch.save(
        {k: v.bfloat16() if v.is_floating_point() else v for k, v in weights.items()},
        folder / "pytorch_model.bin",
    )
    (folder / "config.json").write_text(json.dumps(config(draft_vocab, architectures=["LlamaForCausalLM"])))
    return str(folder)


def specforge(folder: Path, target: str, seed: int = 8, layers=(2, 3, 5)) -> str:
    """SpecForge's layout: model.safetensors with the embedding copy, fc norms, t2d, and the
    captured layers named in eagle_config."""
    folder.mkdir(parents=True)
    weights = eagle3_weights(seed, fc_norm=True)
    weights["embed_tokens.weight"] = LlamaForCausalLM.from_pretrained(
        target
    ).model.embed_tokens.weight.detach()
    save_file(
        {k: v.bfloat16().contiguous() if v.is_floating_point() else v for k, v in weights.items()},
        folder / "model.safetensors",
    )
    extra = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": list(layers)}, "target_hidden_size": D}
    (folder / "config.json").write_text(json.dumps(config(**extra)))
    return str(folder)


# The authors' forward, transcribed on its own (SafeAILab eagle/model/cnets.py `Model` and
# `LlamaDecoderLayeremb`; SpecForge llama3_eagle.py `project_hidden_states`): full sequences, no cache.


def rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def authors_layer(w, x, emb):
    """LlamaDecoderLayeremb over rows x (L, D) with token embeddings emb (L, D), positions 0..L-1."""
    L, hd = x.shape[0], D // HEADS
    residual = x
    h = torch.cat(
        (rms(emb, w["midlayer.input_layernorm.weight"]), rms(x, w["midlayer.hidden_norm.weight"])), dim=-1
    )
    q = (h @ w["midlayer.self_attn.q_proj.weight"].T).view(L, HEADS, hd).transpose(0, 1)
    k = (h @ w["midlayer.self_attn.k_proj.weight"].T).view(L, KV_HEADS, hd).transpose(0, 1)
    v = (h @ w["midlayer.self_attn.v_proj.weight"].T).view(L, KV_HEADS, hd).transpose(0, 1)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.outer(torch.arange(L).float(), inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 0), v.repeat_interleave(HEADS // KV_HEADS, 0)
    scores = q @ k.transpose(1, 2) / hd**0.5 + torch.full((L, L), float("-inf")).triu(1)
    attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(L, HEADS * hd)
    x = residual + attn @ w["midlayer.self_attn.o_proj.weight"].T
    m = rms(x, w["midlayer.post_attention_layernorm.weight"])
    gate, up = m @ w["midlayer.mlp.gate_proj.weight"].T, m @ w["midlayer.mlp.up_proj.weight"].T
    return x + (F.silu(gate) * up) @ w["midlayer.mlp.down_proj.weight"].T


def authors_draft(w, embed, taps, tokens, steps):
    """A greedy chain of `steps` drafts after verified `tokens` (0..t) whose verifier streams at
    positions 0..t-1 are `taps` (t, 3D): per step the draft logits over the verifier's vocabulary."""
    streams = taps
    if "fc_norm.0.weight" in w:
        streams = torch.cat([rms(s, w[f"fc_norm.{i}.weight"]) for i, s in enumerate(taps.chunk(3, -1))], -1)
    inputs, ids, out = list(streams @ w["fc.weight"].T), list(tokens[1:]), []
    d2t = w.get("d2t", torch.zeros(w["lm_head.weight"].shape[0], dtype=torch.long))
    for _ in range(steps):
        hidden = authors_layer(w, torch.stack(inputs), embed[torch.tensor(ids)])
        logits = rms(hidden[-1], w["norm.weight"]) @ w["lm_head.weight"].T
        full = torch.full((VOCAB,), float("-inf"))
        full[torch.arange(len(d2t)) + d2t] = logits
        out.append(full)
        inputs.append(hidden[-1])
        ids.append(int(full.argmax()))
    return out


def hf_taps(target: str, tokens: list[int], layers) -> torch.Tensor:
    """The verifier's residual streams after `layers`, from Hugging Face's hidden states (entry
    i + 1 is layer i's output), concatenated low to high as the authors do."""
    model = LlamaForCausalLM.from_pretrained(target)
    with torch.no_grad():
        states = model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    return torch.cat([states[i + 1][0] for i in layers], dim=-1)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("layout", ["safeailab", "specforge"])
def test_drafts_are_the_authors_forward(target_path, tmp_path, layout, kernel):
    if kernel and kernel_library() is None:
        pytest.skip("no compiled kernel here")
    folder = safeailab(tmp_path / "h") if layout == "safeailab" else specforge(tmp_path / "h", target_path)
    assert head_kind(folder) == "eagle3" and head_kind(target_path) is None
    target = load_model(target_path, CPU, torch.float32, cpu_kernel=kernel)
    head = load_head(folder, target)
    assert isinstance(head, Eagle3Head) and head.kernel_step == kernel
    layers = default_layers(LAYERS) if layout == "safeailab" else [2, 3, 5]
    assert head.feature_layers == tuple(layers) and target.taps == tuple(layers)
    stored = (
        torch.load(Path(folder) / "pytorch_model.bin")
        if layout == "safeailab"
        else load_file(Path(folder) / "model.safetensors")
    )
    weights = {k: v.float() if v.is_floating_point() else v for k, v in stored.items()}

    tokens = random_prompts(1, VOCAB, seed=3, min_len=14, max_len=14)[0]
    runner = ModelRunner(target, 32 << 20, 16, prefix_cache=False)
    segment = Segment(tokens, 0, BlockTable(runner.pool), logits=1, features=True)
    runner.forward([segment])
    # The pass's features: the tapped streams (Hugging Face's hidden states), then the normed final state.
    taps = hf_taps(target_path, tokens, layers)
    assert segment.hidden.shape == (len(tokens), 4 * D)
    torch.testing.assert_close(segment.hidden[:, : 3 * D], taps, rtol=1e-4, atol=1e-4)

    steps, t = 3, len(tokens) - 1
    expected = authors_draft(weights, target.embed, taps[:t], tokens, steps)
    batch = HeadBatch(head, 16 << 20, 16)
    state = batch.state()
    state.observe(0, segment.hidden)
    table, inputs = state.table, state.features[:t]
    drafted = Segment(tokens[1:], 0, table, logits=1, features=True, inputs=inputs)
    for step in range(steps):
        logits = head.target_logits(batch.runner.forward([drafted])[0][-1])
        torch.testing.assert_close(logits, expected[step], rtol=2e-3, atol=2e-3)
        token = int(logits.argmax())
        assert token == int(expected[step].argmax())
        drafted = Segment([token], t + step, table, logits=1, features=True, inputs=drafted.hidden[-1:])


def test_greedy_speculation_is_the_verifiers(target_path, tmp_path):
    """Chains at fixed and auto depth, trees, and a batch: token-identical to verifier-only, with
    drafts proposed and some accepted."""
    settings = Settings(target=target_path, draft=specforge(tmp_path / "h", target_path))
    assert resolve_models(settings.part(ModelSettings)).proposer == "head"
    engine = build_engine(settings)
    assert engine.proposer.name.startswith("head:")
    engine.pin_costs(PassCosts(tuple(range(1, 10)), (1.0,) * 9, draft_s=0.01))
    prompts = random_prompts(5, VOCAB, seed=41, min_len=2, max_len=30)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    reference = exact_at_depths(engine, prompts, params)
    trees = build_engine(settings.model_copy(update={"tree_width": 3}))
    trees.pin_costs(PassCosts(tuple(range(1, 40)), (1.0,) * 39, draft_s=0.01))
    out, requests = run_together(trees, prompts, params, depth=3)
    assert out == reference
    assert all(r.stats.proposer_failures == 0 for r in requests)


def test_a_full_vocabulary_head_without_d2t_loads(target_path, tmp_path):
    target = load_model(target_path, CPU, torch.float32)
    head = load_head(safeailab(tmp_path / "h", draft_vocab=VOCAB), target)
    assert head.vocab_size == VOCAB and head.d2t.tolist() == list(range(VOCAB))


def test_mistakes_are_clear_errors(target_path, tmp_path, tiny_models):
    target = load_model(target_path, CPU, torch.float32)
    folder = Path(safeailab(tmp_path / "h"))
    narrow = load_model(tiny_models["llama"], CPU, torch.float32)  # 32 wide
    with pytest.raises(UserError, match="reads features of width 64, the verifier's are 32"):
        load_head(str(folder), narrow)
    shallow = save(
        _llama(VOCAB, layers=3, seed=6, heads=HEADS, kv_heads=KV_HEADS, hidden=D), tmp_path / "t3", VOCAB
    )
    with pytest.raises(
        UserError, match=r"verifier layers \[1, 0, -1\], which a verifier of 3 layers does not have"
    ):
        load_head(str(folder), load_model(shallow, CPU, torch.float32))
    cases = {
        "vocabulary of 65": {"vocab_size": VOCAB + 1},
        "rotary scaling 'yarn'": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "does not have": {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, LAYERS - 1]}},
    }
    for message, change in cases.items():
        (folder / "config.json").write_text(json.dumps(config(**change)))
        with pytest.raises(UserError, match=message):
            load_head(str(folder), target)
    (folder / "config.json").write_text(json.dumps(config()))
    weights = torch.load(folder / "pytorch_model.bin")
    del weights["d2t"]
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="no d2t map"):
        load_head(str(folder), target)
    del weights["fc.weight"]
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="lacks the tensor fc.weight"):
        load_head(str(folder), target)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="could not read the EAGLE-3 head"):
        load_head(str(folder), target)
