"""The paged KV cache kernels of layer_ops.c: `rope_store_paged` and `paged_attention` give every
row the same bits as `rope_store` and `attention` over a contiguous cache, whatever the block
table, the batch's segments and the thread count."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess

import pytest
import torch

from verispec.models import kernels
from verispec.models.kernels import kernel_library

ops = kernel_library()
pytestmark = pytest.mark.skipif(ops is None, reason="no C compiler or no AVX2/FMA/F16C here")

ROWS = 256  # rows per contiguous `attention` call, as LeanLM._kernel_step splits a pass
# (positions the sequence holds, first position of the pass's segment, rows of the segment):
# a 5-row verify at the end of a 600-position context, a 130-row prefill, a 1-row decode,
# 100 rows from mid-sequence across position 256, a 300-row prefill (more than one work item).
SEQUENCES = [(600, 595, 5), (130, 0, 130), (301, 300, 1), (300, 200, 100), (300, 0, 300)]


def i64(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def rope_tables(positions: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq).repeat(1, 2)
    return angles.cos().contiguous(), angles.sin().contiguous()


class Batch:
    """SEQUENCES written both ways: each into its own contiguous (Hkv, P, hd) cache by rope_store,
    and all together, rows interleaved in random order, into shuffled blocks of one paged pool
    by rope_store_paged."""

    def __init__(self, H: int, Hkv: int, hd: int, bs: int, seed: int = 0):
        self.H, self.Hkv, self.hd, self.bs = H, Hkv, hd, bs
        generator = torch.Generator().manual_seed(seed)
        shuffle = random.Random(seed)
        width = (H + 2 * Hkv) * hd
        self.cos, self.sin = rope_tables(max(p for p, _, _ in SEQUENCES), hd)
        self.raw = [torch.randn(p, width, generator=generator) for p, _, _ in SEQUENCES]  # before rotation
        self.rotated, self.keys, self.values = [], [], []
        for raw in self.raw:
            qkv, P = raw.clone(), raw.shape[0]
            keys, values = torch.zeros(Hkv, P, hd), torch.zeros(Hkv, P, hd)
            ops.rope_store(
                qkv.data_ptr(), P, H, Hkv, hd, self.cos.data_ptr(), self.sin.data_ptr(), 0,
                keys.data_ptr(), values.data_ptr(), P,
            )  # fmt: skip
            self.rotated.append(qkv)
            self.keys.append(keys)
            self.values.append(values)

        counts = [-(-p // bs) for p, _, _ in SEQUENCES]
        blocks = list(range(sum(counts) + 3))  # a few blocks no sequence holds
        shuffle.shuffle(blocks)
        self.tables, first = [], 0
        for count in counts:
            self.tables.append(blocks[first : first + count])
            first += count
        # NaN in every slot no position was written to: reading one would show in the output
        self.pool_keys = torch.full((len(blocks), Hkv, bs, hd), float("nan"))
        self.pool_values = torch.full((len(blocks), Hkv, bs, hd), float("nan"))
        order = [(s, p) for s, (P, _, _) in enumerate(SEQUENCES) for p in range(P)]
        shuffle.shuffle(order)
        self.paged_qkv = torch.stack([self.raw[s][p] for s, p in order])
        positions = i64(p for _, p in order)  # kept alive across the call
        slots = i64(self.tables[s][p // bs] * bs + p % bs for s, p in order)
        ops.rope_store_paged(
            self.paged_qkv.data_ptr(), len(order), H, Hkv, hd, self.cos.data_ptr(), self.sin.data_ptr(),
            positions.data_ptr(), slots.data_ptr(), self.pool_keys.data_ptr(), self.pool_values.data_ptr(), bs,
        )  # fmt: skip
        self.order = order

    def gathered(self, s: int, pool: torch.Tensor) -> torch.Tensor:
        """Sequence s's (Hkv, P, hd) keys or values read back from a paged pool."""
        P = SEQUENCES[s][0]
        return torch.cat([pool[block] for block in self.tables[s]], dim=1)[:, :P]

    def expected(self, s: int, threads: int) -> torch.Tensor:
        """Sequence s's segment rows from `attention` over its contiguous cache, ROWS rows a call."""
        P, start, T = SEQUENCES[s]
        qkv = self.rotated[s][start : start + T].contiguous()
        out = torch.empty(T, self.H * self.hd)
        for first in range(0, T, ROWS):
            rows = min(ROWS, T - first)
            ops.attention(
                qkv[first].data_ptr(), rows, self.H, self.Hkv, self.hd, self.keys[s].data_ptr(),
                self.values[s].data_ptr(), P, start + first, self.hd**-0.5, out[first].data_ptr(), threads,
            )  # fmt: skip
        return out

    def alone(self, s: int, row: int) -> torch.Tensor:
        """One row of sequence s's segment from `attention` as a pass of its own."""
        P, start, _ = SEQUENCES[s]
        qkv = self.rotated[s][start + row].contiguous()
        out = torch.empty(self.H * self.hd)
        ops.attention(
            qkv.data_ptr(), 1, self.H, self.Hkv, self.hd, self.keys[s].data_ptr(), self.values[s].data_ptr(),
            P, start + row, self.hd**-0.5, out.data_ptr(), 1,
        )  # fmt: skip
        return out

    def paged(self, segments: list[tuple[int, int, int]], threads: int, library=None) -> torch.Tensor:
        """paged_attention on segments (sequence, first row of its segment, rows), given in that
        order, their rows laid out in the batch in the reverse order; out (rows, H hd)."""
        library = library or ops
        rows_of = {}
        row = 0
        for s, first, T in reversed(segments):
            rows_of[(s, first)] = row
            row += T
        qkv = torch.empty(row, (self.H + 2 * self.Hkv) * self.hd)
        for s, first, T in segments:
            start = SEQUENCES[s][1] + first
            qkv[rows_of[(s, first)] : rows_of[(s, first)] + T] = self.rotated[s][start : start + T]
        seg_row = i64(rows_of[(s, f)] for s, f, _ in segments)
        seg_len = i64(T for _, _, T in segments)
        seg_pos = i64(SEQUENCES[s][1] + f for s, f, _ in segments)
        tables = i64(block for table in self.tables for block in table)
        table_start = i64(sum(len(self.tables[t]) for t in range(s)) for s, _, _ in segments)
        out = torch.full((row, self.H * self.hd), float("nan"))
        library.paged_attention(
            qkv.data_ptr(), len(segments), seg_row.data_ptr(), seg_len.data_ptr(), seg_pos.data_ptr(),
            tables.data_ptr(), table_start.data_ptr(), None, self.H, self.Hkv, self.hd, self.pool_keys.data_ptr(),
            self.pool_values.data_ptr(), self.bs, self.hd**-0.5, out.data_ptr(), threads,
        )  # fmt: skip
        return torch.cat([out[rows_of[(s, f)] : rows_of[(s, f)] + T] for s, f, T in segments])


HEADS = pytest.mark.parametrize("H, Hkv", [(8, 2), (4, 4)], ids=["gqa", "mha"])
HEAD_DIMS = pytest.mark.parametrize("hd", [8, 64])
BLOCKS = pytest.mark.parametrize("bs", [16, 32])


@HEADS
@HEAD_DIMS
@BLOCKS
def test_rope_store_paged_writes_what_rope_store_writes(H, Hkv, hd, bs):
    batch = Batch(H, Hkv, hd, bs)
    for row, (s, p) in enumerate(batch.order):  # rows of every sequence, interleaved; q rotated in place
        assert torch.equal(batch.paged_qkv[row, : H * hd], batch.rotated[s][p, : H * hd])
    for s in range(len(SEQUENCES)):
        assert torch.equal(batch.gathered(s, batch.pool_keys), batch.keys[s])
        assert torch.equal(batch.gathered(s, batch.pool_values), batch.values[s])


def whole_segments() -> list[tuple[int, int, int]]:
    return [(s, 0, T) for s, (_, _, T) in enumerate(SEQUENCES)]


def split_segments() -> list[tuple[int, int, int]]:
    """The same rows cut differently: the verify as 1 + 4 rows, the prefills and the mid-sequence
    segment in uneven pieces, listed out of order."""
    return [
        (3, 37, 63), (0, 1, 4), (4, 0, 7), (1, 0, 129), (2, 0, 1),
        (4, 7, 293), (0, 0, 1), (3, 0, 37), (1, 129, 1),
    ]  # fmt: skip


@HEADS
@HEAD_DIMS
@BLOCKS
def test_paged_attention_is_the_contiguous_kernel_bit_for_bit(H, Hkv, hd, bs):
    batch = Batch(H, Hkv, hd, bs, seed=hd + bs + H)
    expected = {s: batch.expected(s, threads=1) for s in range(len(SEQUENCES))}
    for s, (_, _, T) in enumerate(SEQUENCES):
        for row in {0, T // 2, T - 1}:  # the contiguous kernel's own row invariance, which this relies on
            assert torch.equal(batch.alone(s, row), expected[s][row])
        assert torch.equal(batch.expected(s, threads=2), expected[s])
    for segments in (whole_segments(), split_segments()):
        want = torch.cat([expected[s][first : first + T] for s, first, T in segments])
        for threads in (1, 2):
            assert torch.equal(batch.paged(segments, threads), want), (segments, threads)
    for s, first, T in split_segments():  # each segment alone in its call
        assert torch.equal(batch.paged([(s, first, T)], threads=2), expected[s][first : first + T])


@pytest.fixture(scope="module")
def small_scratch(tmp_path_factory):
    """layer_ops.c built with 64 floats of scratch per work item: work items of a few rows, and
    rows whose context does not fit done by the scratch-free path."""
    return layer_ops_built_with(tmp_path_factory.mktemp("small-scratch"), ["-DPAGED_SCRATCH_FLOATS=64"])


def layer_ops_built_with(folder, defines: list[str]):
    """layer_ops.c compiled alone with these defines, its paged_attention bound as the kernels' is."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    built = folder / "layer_ops.so"
    source = next(path for path in kernels.KERNEL_SOURCES if path.name == "layer_ops.c")
    subprocess.run(
        [compiler, *kernels.KERNEL_FLAGS, *defines, str(source), "-lm", "-o", str(built)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    library = ctypes.CDLL(str(built))
    library.paged_attention.argtypes = ops.paged_attention.argtypes
    library.paged_attention.restype = None
    return library


@pytest.mark.parametrize("hd", [8, 64])
def test_small_scratch_and_the_scratch_free_path_give_the_same_bits(small_scratch, hd):
    batch = Batch(8, 2, hd, 16, seed=7)
    expected = {s: batch.expected(s, threads=1) for s in range(len(SEQUENCES))}
    short = [(1, 0, 9), (1, 9, 3), (3, 0, 2)]  # contexts under 64 (work items of a few rows) and over
    for segments in (short, split_segments()):
        want = torch.cat([expected[s][first : first + T] for s, first, T in segments])
        for threads in (1, 2):
            assert torch.equal(batch.paged(segments, threads, small_scratch), want)


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """layer_ops.c built to sweep the cache in runs of one group of 8 positions and to prefetch one
    group on: runs that split every block, and the keys' prefetch crossing into the values at once."""
    return layer_ops_built_with(tmp_path_factory.mktemp("short-runs"), ["-DPAGED_RUN_FLOATS=8", "-DPAGED_AHEAD_FLOATS=8"])


# head sizes that are not a multiple of 8 (the values' sums past the last vector), a block of 8
# positions, and blocks longer than the runs the cache is swept in (64 positions at head size 64)
@pytest.mark.parametrize("hd, bs", [(12, 24), (20, 8), (64, 128)])
def test_paged_attention_at_other_head_and_block_sizes(short_runs, hd, bs):
    batch = Batch(8, 2, hd, bs, seed=hd * bs)
    expected = {s: batch.expected(s, threads=1) for s in range(len(SEQUENCES))}
    for segments in (whole_segments(), split_segments()):
        want = torch.cat([expected[s][first : first + T] for s, first, T in segments])
        for library in (ops, short_runs):
            for threads in (1, 2):
                assert torch.equal(batch.paged(segments, threads, library), want), (segments, threads)
