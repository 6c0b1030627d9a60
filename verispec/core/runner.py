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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from verispec.core.kv_cache import BlockPool, BlockTable
from verispec.models.kernels import ATTENTION_PAGED, VsAttention, address_array, kernel_library
from verispec.models.lean import LeanLM, _rotate


@dataclass
class Segment:
    """Positions start.. of one sequence, fed `tokens`. `logits`: how many of its last rows to
    return logits for; None = all (a round), 0 = none (a prompt chunk only writes its keys and
    values), 1 = the last (a draft model catching up)."""

    tokens: Sequence[int]
    start: int
    table: BlockTable
    logits: int | None = None

    @property
    def wanted(self) -> int:
        return len(self.tokens) if self.logits is None else min(self.logits, len(self.tokens))


def attention_segments(segments: Sequence[Segment]) -> tuple[torch.Tensor, ...]:
    """The attention work of a pass, as the kernel takes it: per segment its first row in the pass,
    its length, its first position, and where its block table starts in the concatenated tables."""
    seg_row, seg_len, seg_pos, table_start, tables = [], [], [], [], []
    row = 0
    for s in segments:
        seg_row.append(row)
        seg_len.append(len(s.tokens))
        seg_pos.append(s.start)
        table_start.append(len(tables))
        tables.extend(s.table.blocks)
        row += len(s.tokens)
    return tuple(torch.tensor(a, dtype=torch.int64) for a in (seg_row, seg_len, seg_pos, table_start, tables))


def batchable(lm: object) -> str | None:
    """None if the runner can batch passes of `lm`, else why not."""
    if not isinstance(lm, LeanLM):
        backend = getattr(lm, "backend", "?")
        return "the transformers backend runs one sequence per pass" if backend != "lean" else "lean GPT-2 runs one sequence per pass"
    if lm.compiled:
        return "--compile traces the single-sequence step"
    return None


class ModelRunner:
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
        shape = (num_blocks, lm.kv_heads, block_size, lm.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=lm.device) for _ in lm.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=lm.device) for _ in lm.layers]
        self.bytes_per_block = per_block
        self._pools = None  # self.keys and self.values as the kernel step's per-layer address arrays

    @torch.inference_mode()
    def forward(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        """Run one pass; per segment the logits of its wanted rows (n, V) float32, or None."""
        for segment in segments:
            segment.table.reserve(segment.start + len(segment.tokens))
        ids = torch.tensor([t for s in segments for t in s.tokens], dtype=torch.long, device=self.lm.device)
        positions = [p for s in segments for p in range(s.start, s.start + len(s.tokens))]
        slots = [slot for s in segments for slot in s.table.slots(s.start, len(s.tokens))]
        rows, row = [], 0
        for s in segments:
            row += len(s.tokens)
            rows.extend(range(row - s.wanted, row))
        step = self._kernel_pass if self.kernel else self._torch_pass
        logits = step(ids, positions, slots, segments, rows).float()
        out: list[torch.Tensor | None] = []
        offset = 0
        for s in segments:
            out.append(logits[offset : offset + s.wanted] if s.wanted else None)
            offset += s.wanted
        return out

    def _kernel_pass(self, ids, positions, slots, segments, rows) -> torch.Tensor:
        """LeanLM's kernel step over many sequences: its layers in one C call, attention on the paged cache."""
        position_array = torch.tensor(positions, dtype=torch.int64)
        slot_array = torch.tensor(slots, dtype=torch.int64)
        seg_row, seg_len, seg_pos, table_start, tables = attention_segments(segments)
        if self._pools is None:  # the per-layer pools, described once
            self._pools = address_array(self.keys), address_array(self.values)
        attention = VsAttention(
            mode=ATTENTION_PAGED, keys=self._pools[0], values=self._pools[1], positions=position_array.data_ptr(),
            slots=slot_array.data_ptr(), block_size=self.pool.block_size, segments=len(segments),
            seg_row=seg_row.data_ptr(), seg_len=seg_len.data_ptr(), seg_pos=seg_pos.data_ptr(),
            tables=tables.data_ptr(), table_start=table_start.data_ptr(),
        )  # fmt: skip
        return self.lm.kernel_pass(ids, attention, rows)

    def _torch_pass(self, ids, positions, slots, segments, rows) -> torch.Tensor:
        """LeanLM._eager_step over many sequences, on torch operators (any device)."""
        lm = self.lm
        T = ids.shape[0]
        H, Hkv, hd, bs = lm.heads, lm.kv_heads, lm.head_dim, self.pool.block_size
        device = ids.device
        position_t = torch.tensor(positions, device=device)
        slot_t = torch.tensor(slots, device=device)
        block_t, offset_t = slot_t // bs, slot_t % bs
        cos, sin = lm.cos[position_t][None], lm.sin[position_t][None]  # (1, T, hd)
        x = F.embedding(ids, lm.embed)
        for layer, keys, values in zip(lm.layers, self.keys, self.values, strict=True):
            h = F.rms_norm(x, (x.shape[-1],), layer.attn_norm, lm.eps)
            q, k, v = layer.qkv(h).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
            q = _rotate(q.view(T, H, hd).transpose(0, 1), cos, sin)  # (H, T, hd)
            k = _rotate(k.view(T, Hkv, hd).transpose(0, 1), cos, sin)  # (Hkv, T, hd)
            keys[block_t, :, offset_t] = k.transpose(0, 1).to(keys.dtype)
            values[block_t, :, offset_t] = v.view(T, Hkv, hd).to(values.dtype)
            attn = torch.empty((H, T, hd), dtype=q.dtype, device=device)
            row = 0
            for s in segments:
                n, end = len(s.tokens), s.start + len(s.tokens)
                table = torch.tensor(s.table.blocks[: self.pool.blocks_for(end)], device=device)
                seq_k = keys[table].permute(1, 0, 2, 3).reshape(Hkv, -1, hd)[:, :end]
                seq_v = values[table].permute(1, 0, 2, 3).reshape(Hkv, -1, hd)[:, :end]
                mask = torch.arange(end, device=device)[None, :] <= torch.arange(s.start, end, device=device)[:, None]
                attn[:, row : row + n] = F.scaled_dot_product_attention(
                    q[:, row : row + n], seq_k, seq_v, attn_mask=mask, enable_gqa=Hkv != H
                )
                row += n
            x = x + layer.o(attn.transpose(0, 1).reshape(T, H * hd))
            h = F.rms_norm(x, (x.shape[-1],), layer.mlp_norm, lm.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        x = x[rows]
        return lm.lm_head(F.rms_norm(x, (x.shape[-1],), lm.norm, lm.eps))
