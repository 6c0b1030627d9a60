"""Tiny random models, built and saved by the tests, loaded back through the normal loading code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from verispec.config import SpeculationSettings
from verispec.core.engine import Engine
from verispec.core.rounds import stop_tokens
from verispec.core.runner import ModelRunner, batchable
from verispec.core.session_runner import SessionRunner
from verispec.models import load_model, load_tokenizer
from verispec.proposers import DraftModelProposer, NgramProposer
from verispec.proposers.suffix import SuffixProposer

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "prompts" / "code-completion.jsonl"
EOS = 0


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """Word-level tokenizer: '<|endoftext|>' (id 0, BOS and EOS) then words t1 .. t{V-1}."""
    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(path)


def llama(vocab_size: int, layers: int, seed: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=512,
        initializer_range=0.2,  # peaked distributions, like a trained model's
        bos_token_id=EOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def gpt2(vocab_size: int, layers: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=512, n_embd=32, n_layer=layers, n_head=2,
        initializer_range=0.2, bos_token_id=EOS, eos_token_id=EOS,
    )
    return GPT2LMHeadModel(config)


def exact16_family_model(kind: str, vocab: int, seed: int, initializer_range: float):
    """A tiny Llama or Qwen2 ("llama", "qwen2") whose weights 16 bits hold exactly, so the lean
    backend runs it on the kernel step: grouped-query attention, head size 64; Qwen2 with a random
    q/k/v bias (a fresh model's is zero)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shape = dict(
        vocab_size=vocab, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, initializer_range=initializer_range, bos_token_id=EOS,
        eos_token_id=EOS, tie_word_embeddings=False,
    )  # fmt: skip
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape, use_sliding_window=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            p.copy_(p.half().float())
    return model


def save(model, path: Path, vocab_size: int) -> str:
    model.save_pretrained(path)
    save_tokenizer(path, vocab_size)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Paths of tiny random models sharing one 64-token vocabulary."""
    root = tmp_path_factory.mktemp("tiny-models")
    vocab = 64
    return {
        "llama": save(llama(vocab, layers=3, seed=1), root / "llama", vocab),
        "llama-draft": save(llama(vocab, layers=1, seed=2), root / "llama-draft", vocab),
        "gpt2": save(gpt2(vocab, layers=2, seed=3), root / "gpt2", vocab),
    }


def make_engine(
    target: str, draft: str | None = None, proposer: str = "draft", backend: str = "auto", **speculation
) -> Engine:
    device, dtype = torch.device("cpu"), torch.float32
    settings = SpeculationSettings(**speculation)
    target_lm = load_model(target, device, dtype, backend=backend)
    if proposer == "draft":
        draft_lm = target_lm if draft == target else load_model(draft, device, dtype, role="draft", backend=backend)
        prop = DraftModelProposer(draft_lm, target_vocab_size=target_lm.vocab_size)
    elif proposer == "ngram":
        prop = NgramProposer(settings.ngram_max, settings.ngram_min)
    elif proposer == "suffix":
        prop = SuffixProposer(settings.suffix_cache_tokens, settings.ngram_min)
    else:
        prop = None
    return engine_for(target_lm, load_tokenizer(target), prop, settings)


def engine_for(lm, tokenizer, proposer=None, speculation: SpeculationSettings | None = None) -> Engine:
    """The engine over a loaded target, as `verispec.assemble.build_engine` makes it."""
    return Engine(engine_runner(lm), tokenizer, stop_tokens(lm, tokenizer), proposer=proposer, speculation=speculation)


def engine_runner(lm, memory_bytes: int = 256 << 20):
    """The runner `verispec` picks for `lm`: the batched one where it can batch, else sessions in turn."""
    if batchable(lm) is not None:
        return SessionRunner(lm)
    per_block = 2 * len(lm.layers) * lm.kv_heads * 16 * lm.head_dim * 4
    window = (lm.max_positions // 16 + 1) * per_block  # the least the runner takes: one full window
    return ModelRunner(lm, max(memory_bytes, 2 * window))


def written_cache(runner, tables, lengths: list[int]) -> list[torch.Tensor]:
    """Per layer, keys then values: the pool positions each sequence has written (its first `lengths`
    positions, block by block), in table order. The rest of a pool is never written (the runner
    leaves it uninitialised), so two runners are compared on these alone."""
    size = runner.pool.block_size
    out = []
    for pool in runner.keys + runner.values:
        parts = []
        for table, length in zip(tables, lengths, strict=True):
            for i, block in enumerate(table.blocks[: -(-length // size)]):
                parts.append(pool[block, :, : min(size, length - i * size)].flatten())
        out.append(torch.cat(parts))
    return out


def with_rounded_inputs(lm, linear_class, rounding, ids: list[int], monkeypatch) -> torch.Tensor:
    """`lm`'s logits for `ids` on its per-operation path, every `linear_class` projection seeing its
    input passed through `rounding` first: the model a numeric mode (--activations) claims to be."""
    plain_into = linear_class.into

    def rounded_input(linear, x, y, accumulate=False):
        plain_into(linear, rounding(x), y, accumulate)

    with monkeypatch.context() as patch:
        patch.setattr(linear_class, "into", rounded_input)
        patch.setattr(lm, "native", None)
        return lm.session().extend(ids)


def random_prompts(count: int, vocab: int, seed: int, min_len: int = 1, max_len: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=g)
    # Ids from 1: keep EOS out of prompts.
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lengths]


def run_verispec(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The `verispec` command as a user runs it: a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "verispec.cli", *args], capture_output=True, text=True, input=stdin, timeout=300
    )


def exact_at_depths(engine, prompts: list[list[int]], params, depths=(1, 3, "auto")) -> list[list[int]]:
    """Each prompt's verifier-only tokens, once every depth has given them token for token, with
    drafts proposed."""
    reference = [engine.generate(p, params, depth=0).token_ids for p in prompts]
    proposed = 0
    for depth in depths:
        for prompt, expected in zip(prompts, reference, strict=True):
            out = engine.generate(prompt, params, depth=depth)
            assert out.token_ids == expected, (depth, prompt)
            proposed += out.stats.proposed
    assert proposed > 0
    return reference


def run_together(engine, prompts: list[list[int]], params, depth) -> tuple[list[list[int]], list]:
    """The prompts as requests of one engine, stepped together at `depth` until all end: each
    one's tokens, in order, and the requests."""
    requests = [
        engine.add(f"r{i}", p, params, engine.speculation, engine.proposer, depth=depth) for i, p in enumerate(prompts)
    ]
    out: dict = {r: [] for r in requests}
    while engine.busy:
        for request, delta in engine.step():
            out[request] += delta.token_ids
    return [out[r] for r in requests], requests


def write_prompts(path: Path, count: int) -> Path:
    """A JSONL prompt set in the tiny tokenizer's words."""
    lines = [{"id": f"p{i}", "prompt": " ".join(f"t{(i * 7 + j * 3) % 60 + 1}" for j in range(12))} for i in range(count)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for every Ray test of the session: its address.

    Started once, because a Ray start costs seconds; `ray start --block` in a process group of its
    own, so that taking it down stops this cluster's processes and no other (`ray stop` would stop
    every Ray cluster on the machine). The logical CPU count is set above the machine's so that
    replicas and batch workers (which ask for a fraction of a CPU) all fit.
    """
    pytest.importorskip("ray")
    import shutil
    import signal

    from tests.serving import free_port

    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    address = f"127.0.0.1:{free_port()}"
    temp = tmp_path_factory.mktemp("ray")
    # Loopback only, for this session: no token authentication (clients would need the token), no usage stats.
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env = dict(os.environ)
    start = [ray, "start", "--head", f"--port={address.rsplit(':', 1)[1]}", "--num-cpus=8", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={temp}", "--block"]  # fmt: skip
    log = (temp / "ray-start.log").open("w")
    head = subprocess.Popen(start, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "block forever" not in (temp / "ray-start.log").read_text():  # printed once the runtime has started
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {(temp / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(1)
        yield address
    finally:
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
                head.wait(wait_s)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()


@pytest.fixture(scope="session")
def ray_client(ray_cluster):
    """This test process as a driver on the session's cluster (to kill a replica, run or read Serve)."""
    import ray

    ray.init(address=ray_cluster, namespace="verispec-tests", logging_level="ERROR", log_to_driver=False)
    yield ray_cluster
    ray.shutdown()
