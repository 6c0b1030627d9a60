"""The one-call kernel step (`csrc/lean_step.c`: every layer of a pass in one call) gives the same
bits as the step it replaced, one ctypes call per operation from Python: a single sequence's
session (prompt, decode, verify) and the batched runner's paged passes, logits and caches.

The reference below is that per-operation step as it was (`LeanLM.kernel_pass` around an `attend`
callback, from `LeanLM._kernel_step` and `ModelRunner._kernel_pass`), kept here on its own so the
comparison does not lean on the code it checks.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import exact16_family_model, save, written_cache
from verispec.core.kv_cache import BlockTable
from verispec.core.runner import ModelRunner, Segment, attention_segments
from verispec.models import load_model
from verispec.models.kernels import kernel_library

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no C compiler or no AVX2/FMA/F16C here")

VOCAB = 96
ROWS = 256  # rows per contiguous attention call


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm(request, tmp_path_factory):
    """A tiny 16-bit-exact model on the kernel step: grouped-query attention, head size 64;
    Qwen2 adds a q/k/v bias (random here: a fresh model's is zero)."""
    model = exact16_family_model(request.param, VOCAB, seed=31, initializer_range=0.15)
    path = save(model, tmp_path_factory.mktemp(request.param) / "model", VOCAB)
    lm = load_model(path, torch.device("cpu"), torch.float32, backend="lean")
    assert lm.kernel_step and lm.native is not None, "the test model must run the one-call kernel step"
    return lm


def reference_pass(lm, ids, attend, rows):
    """The kernel step's layers, one C call per operation, around attend(layer, qkv, attn)."""
    ops = kernel_library()
    T, D = ids.shape[0], lm.embed.shape[1]
    H, Hkv, hd = lm.heads, lm.kv_heads, lm.head_dim
    ffn = lm.layers[0].down.in_features
    x = F.embedding(ids, lm.embed)
    h = torch.empty_like(x)
    qkv = torch.empty((T, (H + 2 * Hkv) * hd))
    attn = torch.empty((T, H * hd))
    gate_up = torch.empty((T, 2 * ffn))
    act = torch.empty((T, ffn))
    for i, layer in enumerate(lm.layers):
        ops.rms_norm(x.data_ptr(), T, D, layer.attn_norm.data_ptr(), lm.eps, h.data_ptr())
        layer.qkv.into(h, qkv)
        attend(i, qkv, attn)
        layer.o.into(attn, x, accumulate=True)
        ops.rms_norm(x.data_ptr(), T, D, layer.mlp_norm.data_ptr(), lm.eps, h.data_ptr())
        layer.gate_up.into(h, gate_up)
        ops.silu_mul(gate_up.data_ptr(), T, ffn, act.data_ptr())
        layer.down.into(act, x, accumulate=True)
    x = x[rows].contiguous()
    if x.shape[0] == 0:
        return x
    h = torch.empty_like(x)
    ops.rms_norm(x.data_ptr(), x.shape[0], D, lm.norm.data_ptr(), lm.eps, h.data_ptr())
    return lm.lm_head(h)


class ReferenceSession:
    """A single sequence's contiguous cache, stepped by the per-operation kernel step."""

    def __init__(self, lm, capacity: int):
        self.lm, self.capacity, self.length = lm, capacity, 0
        shape = (lm.kv_heads, capacity, lm.head_dim)
        self.keys = [torch.empty(shape) for _ in lm.layers]
        self.values = [torch.empty(shape) for _ in lm.layers]

    @torch.inference_mode()
    def extend(self, tokens: list[int]) -> torch.Tensor:
        lm, ops = self.lm, kernel_library()
        ids = torch.tensor(tokens, dtype=torch.long)
        T, H, Hkv, hd, start = len(tokens), lm.heads, lm.kv_heads, lm.head_dim, self.length
        cos, sin, scale, threads = lm.cos.data_ptr(), lm.sin.data_ptr(), hd**-0.5, torch.get_num_threads()

        def attend(i, qkv, attn):
            k, v = self.keys[i].data_ptr(), self.values[i].data_ptr()
            ops.rope_store(qkv.data_ptr(), T, H, Hkv, hd, cos, sin, start, k, v, self.capacity)
            for first in range(0, T, ROWS):
                rows = min(ROWS, T - first)
                ops.attention(
                    qkv[first].data_ptr(), rows, H, Hkv, hd, k, v, self.capacity, start + first, scale,
                    attn[first].data_ptr(), threads,
                )  # fmt: skip

        logits = reference_pass(lm, ids, attend, slice(0, T))
        self.length += T
        return logits


def reference_runner_pass(runner, ids, positions, slots, segments, rows, features=False, inputs=None):
    """ModelRunner._kernel_pass as it was: the per-operation step, attention on the paged cache."""
    lm, ops = runner.lm, kernel_library()
    T, H, Hkv, hd = ids.shape[0], lm.heads, lm.kv_heads, lm.head_dim
    bs, threads = runner.pool.block_size, torch.get_num_threads()
    cos, sin, scale = lm.cos.data_ptr(), lm.sin.data_ptr(), hd**-0.5
    position_array = torch.tensor(positions, dtype=torch.int64)
    slot_array = torch.tensor(slots, dtype=torch.int64)
    seg_row, seg_len, seg_pos, table_start, tables = (torch.tensor(a, dtype=torch.int64) for a in attention_segments(segments))

    def attend(i, qkv, attn):
        k, v = runner.keys[i].data_ptr(), runner.values[i].data_ptr()
        positions_at, slots_at = position_array.data_ptr(), slot_array.data_ptr()
        ops.rope_store_paged(qkv.data_ptr(), T, H, Hkv, hd, cos, sin, positions_at, slots_at, k, v, bs)
        ops.paged_attention(
            qkv.data_ptr(), len(segments), seg_row.data_ptr(), seg_len.data_ptr(), seg_pos.data_ptr(),
            tables.data_ptr(), table_start.data_ptr(), None, H, Hkv, hd, k, v, bs, scale, attn.data_ptr(), threads,
        )  # fmt: skip

    return reference_pass(lm, ids, attend, rows)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def test_a_session_step_is_the_per_operation_step_bitwise(lm):
    """Prompt (300 rows: two contiguous attention chunks), a decode step, then a width-5 verify
    after a rollback: the same logits and the same cached keys and values."""
    session = lm.session()
    reference = ReferenceSession(lm, session.capacity)
    prompt = tokens(1, 300)
    assert torch.equal(session.extend(prompt), reference.extend(prompt))
    assert torch.equal(session.extend([7]), reference.extend([7]))
    session.rollback(299)
    reference.length = 299
    verify = tokens(2, 5)
    assert torch.equal(session.extend(verify), reference.extend(verify))
    last = session.extend([3, 9], last_only=True)
    assert torch.equal(last, reference.extend([3, 9])[-1:])
    for mine, theirs in zip(session.keys + session.values, reference.keys + reference.values, strict=True):
        assert torch.equal(mine[:, : session.length], theirs[:, : session.length])


def test_the_per_operation_fallback_is_the_one_call_step_bitwise(lm, monkeypatch):
    """Without a native model descriptor (a projection the C step cannot run), the kernel step
    calls the kernels one operation at a time from Python: the same bits."""
    one_call = lm.session()
    expected = [one_call.extend(tokens(3, 40)), one_call.extend([5]), one_call.extend(tokens(4, 4))]
    monkeypatch.setattr(lm, "native", None)
    per_op = lm.session()
    got = [per_op.extend(tokens(3, 40)), per_op.extend([5]), per_op.extend(tokens(4, 4))]
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_a_paged_runner_pass_is_the_per_operation_step_bitwise(lm):
    """Three sequences of different lengths prefilled together, then a pass of a verify, a decode
    and a prompt chunk (no logits): two runners, one on the one-call step and one on the
    reference, give the same logits and fill their pools with the same bits."""
    runners = [ModelRunner(lm, 8 << 20, block_size=16) for _ in range(2)]
    reference = runners[1]
    reference._kernel_pass = lambda *args: reference_runner_pass(reference, *args)
    seqs = [tokens(10, 60), tokens(11, 23), tokens(12, 41)]
    tables = [[BlockTable(runner.pool) for _ in seqs] for runner in runners]
    outputs = []
    for runner, table in zip(runners, tables, strict=True):
        first = runner.forward([Segment(s[:-5], 0, t) for s, t in zip(seqs, table, strict=True)])
        second = runner.forward(
            [
                Segment(seqs[0][-5:], len(seqs[0]) - 5, table[0]),  # a width-5 verify
                Segment(seqs[1][-5:-4], len(seqs[1]) - 5, table[1]),  # a decode
                Segment(seqs[2][-5:], len(seqs[2]) - 5, table[2], logits=0),  # a prompt chunk
            ]
        )
        outputs.append(first + second)
    for mine, theirs in zip(*outputs, strict=True):
        assert (mine is None) == (theirs is None)
        assert mine is None or torch.equal(mine, theirs)
    assert [t.blocks for t in tables[0]] == [t.blocks for t in tables[1]]
    written = [len(seqs[0]), len(seqs[1]) - 4, len(seqs[2])]
    caches = [written_cache(runner, table, written) for runner, table in zip(runners, tables, strict=True)]
    for mine, theirs in zip(*caches, strict=True):
        assert torch.equal(mine, theirs)


def test_the_native_greedy_loop_chooses_what_the_python_loop_does(lm):
    """LeanSession.greedy (the draft's inner loop in one native call) against one extend per
    token: the same tokens, the same cache, and the draft proposer's proposals unchanged."""
    from verispec.config import SamplingParams
    from verispec.proposers.base import DraftPolicy
    from verispec.proposers.draft import DraftModelProposer

    assert lm.greedy_native()
    prompt = [3, 9, 1, 22, 5, 17, 40, 8]
    native, stepped = lm.session(), lm.session()
    first = int(native.extend(prompt)[-1].argmax())
    stepped.extend(prompt)
    tokens = native.greedy(first, 12, vocab=lm.vocab_size)
    expected, token = [], first
    for _ in range(12):
        token = int(stepped.extend([token])[-1].argmax())
        expected.append(token)
    assert tokens == expected and native.length == stepped.length == len(prompt) + 12
    for layer in range(len(lm.layers)):
        assert torch.equal(native.keys[layer][:, : native.length], stepped.keys[layer][:, : stepped.length])
    # a narrower vocabulary (a draft whose embedding is padded past the target's): argmax within it
    narrow = lm.session()
    narrow.extend(prompt)
    assert all(t < 20 for t in narrow.greedy(first, 6, vocab=20))

    policy = DraftPolicy(SamplingParams())
    proposer = DraftModelProposer(lm, target_vocab_size=lm.vocab_size)
    fast, slow = proposer.session(), proposer.session()
    slow.kv.greedy_native = lambda: False  # the per-token loop
    for context in (prompt, prompt + [4, 4, 4], prompt + [4, 4, 4, 7, 1]):
        assert fast.propose(context, 6, policy).tokens == slow.propose(context, 6, policy).tokens
        assert fast.cached == slow.cached
