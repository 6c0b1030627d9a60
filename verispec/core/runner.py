"""The model runner: one forward pass over rows of many sequences, on a paged KV cache it owns.

A pass takes segments: consecutive positions of one sequence (a prompt chunk, or a round's last
verified token and drafts). Every row knows its sequence and position; its keys and values are
written to its sequence's blocks (`kv_cache.py`) and its attention reads only those blocks. On a
CPU where the lean model runs its kernel step, all its layers are one C call over all the rows
(`csrc/lean_step.c`, attending with `rope_store_paged` and `paged_attention` of
`csrc/layer_ops.c`), and every row is computed in an order that does not depend on the other
rows: a position's logits and its keys and values are the same bits alone or in a batch of any
width, and however its prompt was chunked. Elsewhere (CUDA, or weights the kernel cannot take)
the pass runs on torch operators, gathering each sequence's blocks for attention; outputs there
are exact up to the rounding of batched operators.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from verispec.core.kv_cache import BlockPool, BlockTable
from verispec.models.kernels import ATTENTION_PAGED, VsAttention, address_array, kernel_library
from verispec.models.lean import LeanLM
from verispec.models.reference import PagedCache
from verispec.proposers.base import node_depths


@dataclass
class Segment:
    """Positions start.. of one sequence, fed `tokens`. `logits`: how many of its last rows to
    return logits for; None = all (a round), 0 = none (a prompt chunk only writes its keys and
    values), 1 = the last (a draft model catching up)."""

    tokens: Sequence[int]
    start: int
    table: BlockTable
    logits: int | None = None
    features: bool = False  # also keep every row's normed final hidden state (a draft head reads them)
    hidden: torch.Tensor | None = None  # those, (len(tokens), D), once the pass ran
    inputs: torch.Tensor | None = None  # per row a vector fed beside its token (a draft head's runner: features)
    # A token tree (`trees` runners only): per row its parent's row in the segment, -1 for the
    # first; row i is at position start + its depth and keeps its keys and values at the slot of
    # position start + i until the accepted path is kept (`ModelRunner.keep_path`).
    parents: Sequence[int] | None = None

    def positions(self) -> list[int]:
        """Each row's position: consecutive for a chain, start + depth for a tree's nodes."""
        if self.parents is None:
            return list(range(self.start, self.start + len(self.tokens)))
        return [self.start + d for d in node_depths(self.parents)]

    @property
    def wanted(self) -> int:
        return len(self.tokens) if self.logits is None else min(self.logits, len(self.tokens))


def attention_segments(segments: Sequence[Segment]) -> tuple[list[int], ...]:
    """The attention work of a pass, as the kernel takes it: per segment its first row in the pass,
    its length, its first position, and where its block table starts in the concatenated tables
    (the last list)."""
    seg_row, seg_len, seg_pos, table_start, tables = [], [], [], [], []
    row = 0
    for s in segments:
        seg_row.append(row)
        seg_len.append(len(s.tokens))
        seg_pos.append(s.start)
        table_start.append(len(tables))
        tables.extend(s.table.blocks)
        row += len(s.tokens)
    return seg_row, seg_len, seg_pos, table_start, tables


def batchable(lm: object) -> str | None:
    """None if the runner can batch passes of `lm`, else why not."""
    if not isinstance(lm, LeanLM):
        backend = getattr(lm, "backend", "?")
        return "the transformers backend runs one sequence per pass" if backend != "lean" else "lean GPT-2 runs one sequence per pass"
    if lm.compiled:
        return "--compile traces the single-sequence step"
    return None


class ModelRunner:
    batches = True  # one pass computes the rows of many sequences
    chunks_prompts = True  # a prompt may be read in chunks beside other sequences' rounds
    features = True  # a segment may ask for its rows' final hidden states (`Segment.features`)

    def __init__(self, lm: LeanLM, memory_bytes: int, block_size: int = 16, prefix_cache: bool = True):
        self.lm = lm
        self.kernel = lm.kernel_step and kernel_library() is not None
        dtype = torch.float32 if self.kernel else lm.dtype
        per_block = 2 * len(lm.layers) * lm.kv_heads * block_size * lm.head_dim * dtype.itemsize
        num_blocks = memory_bytes // per_block
        if num_blocks < lm.max_positions // block_size + 1:
            need = (lm.max_positions // block_size + 1) * per_block
            raise ValueError(
                f"--kv-cache-memory of {memory_bytes} bytes holds {num_blocks} blocks of {block_size} positions; "
                f"one request at the model's full window of {lm.max_positions} positions needs {need} bytes"
            )
        self.pool = BlockPool(num_blocks, block_size, prefix_cache)
        # Left unwritten (no page is touched until a block is used: a command that runs one short
        # request pays for what it uses, not for --kv-cache-memory): a position is only ever read
        # after its own pass wrote it.
        shape = (num_blocks, lm.kv_heads, block_size, lm.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=lm.device) for _ in lm.layers]
        self.values = [torch.empty(shape, dtype=dtype, device=lm.device) for _ in lm.layers]
        self.bytes_per_block = per_block
        self.trees = self.kernel  # token trees are verified by the kernel's tree attention
        self._pools = None  # self.keys and self.values as the kernel step's per-layer address arrays

    @torch.inference_mode()
    def forward(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        """Run one pass; per segment the logits of its wanted rows (n, V) float32, or None."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        wanted: list[int] = []
        for s in segments:
            n = len(s.tokens)
            s.table.reserve(s.start + n)
            tokens.extend(s.tokens)
            positions.extend(s.positions())
            slots.extend(s.table.slots(s.start, n))
            wanted.extend(range(len(tokens) - s.wanted, len(tokens)))
        if self.kernel and tokens:  # on the CPU: from an int64 array, a fraction of torch.tensor's fixed cost
            ids = torch.frombuffer(array("q", tokens), dtype=torch.long)
        else:
            ids = torch.tensor(tokens, dtype=torch.long, device=self.lm.device)
        rows: list[int] | slice = wanted
        if wanted and wanted[-1] - wanted[0] == len(wanted) - 1:  # consecutive (a decode, a round): no index
            rows = slice(wanted[0], wanted[-1] + 1)
        step = self._kernel_pass if self.kernel else self._torch_pass
        features = any(s.features for s in segments)
        inputs = None
        if getattr(self.lm, "reads_inputs", False):  # a segment without inputs (a cost measurement) reads zeros
            width = self.lm.embed.shape[1]
            inputs = torch.cat([s.inputs if s.inputs is not None else torch.zeros(len(s.tokens), width) for s in segments])
        logits = step(ids, positions, slots, segments, rows, features, inputs)
        if features:
            logits, hidden = logits
            first = 0
            for s in segments:
                s.hidden = hidden[first : first + len(s.tokens)] if s.features else None
                first += len(s.tokens)
        logits = logits.float()
        if len(segments) == 1:  # its wanted rows are all the logits
            return [logits if segments[0].wanted else None]
        out: list[torch.Tensor | None] = []
        offset = 0
        for s in segments:
            out.append(logits[offset : offset + s.wanted] if s.wanted else None)
            offset += s.wanted
        return out

    def _kernel_pass(self, ids, positions, slots, segments, rows, features=False, inputs=None):
        """LeanLM's kernel step over many sequences: its layers in one C call, attention on the paged cache."""
        # Every index array of the pass in one int64 array, not in tensors (each torch.tensor cost
        # more than a short decode's attention): the rows' positions and slots, then
        # attention_segments' arrays (per segment its first row, length, first position and where
        # its block table starts in the tables that follow).
        index = array("q", positions)
        for part in (slots, *attention_segments(segments)):
            index.extend(part)
        T, S, size = len(positions), len(segments), index.itemsize
        tables = len(index) - 2 * T - 4 * S
        if any(s.parents is not None for s in segments):  # per row its parent's row in the pass
            first = 0
            for s in segments:
                n = len(s.tokens)
                parents = range(-1, n - 1) if s.parents is None else s.parents
                index.extend(first + p if p >= 0 else -1 for p in parents)
                first += n
        at = index.buffer_info()[0]  # `index` lives until this returns, past the C call
        attention = getattr(self, "_attention", None)
        if attention is None:  # the pools, described once; a runner runs one pass at a time
            if self._pools is None:
                self._pools = address_array(self.keys), address_array(self.values)
            attention = VsAttention(
                mode=ATTENTION_PAGED, keys=self._pools[0], values=self._pools[1], block_size=self.pool.block_size
            )
            self._attention = attention
        attention.positions, attention.slots, attention.segments = at, at + T * size, S
        attention.seg_row, attention.seg_len = at + 2 * T * size, at + (2 * T + S) * size
        attention.seg_pos, attention.table_start = at + (2 * T + 2 * S) * size, at + (2 * T + 3 * S) * size
        attention.tables = at + (2 * T + 4 * S) * size
        attention.parents = at + (2 * T + 4 * S + tables) * size if len(index) > 2 * T + 4 * S + tables else 0
        return self.lm.kernel_pass(ids, attention, rows, features=features, inputs=inputs)

    def keep_path(self, table: BlockTable, start: int, path: Sequence[int]) -> None:
        """After a tree's verdict: its accepted path (rows of the tree segment at `start`, root
        first) moves to positions start.. in every layer, where the next pass reads it. A row's
        slot is at or after its depth's, and a path's rows ascend, so moving them in order
        overwrites nothing still to be read."""
        moves = [(start + row, start + depth) for depth, row in enumerate(path) if row != depth]
        if not moves:
            return
        bs = self.pool.block_size
        source = torch.tensor([table.slots(p, 1)[0] for p, _ in moves], device=self.keys[0].device)
        target = torch.tensor([table.slots(p, 1)[0] for _, p in moves], device=self.keys[0].device)
        for pool in (*self.keys, *self.values):
            pool[target // bs, :, target % bs] = pool[source // bs, :, source % bs]

    def greedy(
        self, tables: Sequence[BlockTable], tokens: list[int], positions: list[int], steps: int, vocab: int,
        features: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """For each sequence, `steps` greedy tokens after `tokens[s]`, fed at `positions[s]` on, in
        one native call (`LeanLM.greedy_paged`): the tokens a pass per step would choose, without
        Python's cost per step. Each table gets blocks for every position fed first (OutOfBlocks
        if the pool runs out). A draft head's rows start from `features` (S, D), the features its
        last pass predicted. Only where `greedy_native()`."""
        for table, position in zip(tables, positions, strict=True):
            table.reserve(position + steps)
        table_start, blocks = [], []
        for table in tables:
            table_start.append(len(blocks))
            blocks.extend(table.blocks)
        starts, block_ids = torch.tensor(table_start, dtype=torch.int64), torch.tensor(blocks, dtype=torch.int64)
        if self._pools is None:
            self._pools = address_array(self.keys), address_array(self.values)
        attention = VsAttention(
            mode=ATTENTION_PAGED, keys=self._pools[0], values=self._pools[1], block_size=self.pool.block_size,
            tables=block_ids.data_ptr(), table_start=starts.data_ptr(),
        )  # fmt: skip
        return self.lm.greedy_paged(attention, tokens, positions, steps, vocab, features)

    def greedy_native(self) -> bool:
        """Whether `greedy` runs here (the kernel step, and a head on the kernel)."""
        return self.kernel and self.lm.greedy_native()

    def _torch_pass(self, ids, positions, slots, segments, rows, features=False, inputs=None):
        """LeanLM's torch forward (`models/reference.py`, its `_eager_step`) over many sequences, on
        torch operators (any device): each row's key and value stored in its sequence's blocks, each
        segment attending over its sequence's blocks, gathered."""
        spans = []  # per segment: its first position, its rows, its sequence's blocks up to its end
        for s in segments:
            end = s.start + len(s.tokens)
            spans.append((s.start, len(s.tokens), s.table.blocks[: self.pool.blocks_for(end)]))
        cache = PagedCache(self.lm, self.keys, self.values, self.pool.block_size, positions, slots, spans)
        return self.lm.torch_pass(ids, cache, rows, features, inputs)
