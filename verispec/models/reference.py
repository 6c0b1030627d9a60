"""The Llama layer, written once, and the lean backend's one torch forward over it.

`llama_layers` is the structure of a layer: RMSNorm, the fused QKV projection, attention (rotary
embedding, storing the rows' keys and values, attending), the output projection added to the
residual stream, RMSNorm, the fused gate/up projection, SwiGLU, and the down projection added to
the residual stream. An ops object carries out each operation, so the structure is not copied
per way of running it:

- `TorchOps`, torch operators on any device and dtype. With `reference_forward` it is the lean
  backend's one torch forward: the single-sequence step (`LeanLM._eager_step`, over a session's
  contiguous cache: `ContiguousCache`) and the runner's pass over many sequences
  (`ModelRunner._torch_pass`, over the paged cache: `PagedCache`), and the reference that tests
  compare the C kernel step to (tests/test_reference_forward.py).
- `lean.py`'s `_KernelOps`, one call into the compiled kernels per operation on a pass's
  preallocated buffers: `csrc/lean_step.c`'s `lean_layers` driven from Python, the same bits (for
  a model whose projections have no native descriptor, and for timing by operation).

The production step on a CPU is `lean_layers` itself, in C; a change to the layer is made here and
there.

Both caches store a row's rotated key and its value before the rows attend, and a row at position
p attends over positions 0..p of its own sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def llama_layers(
    layers: Sequence, x: torch.Tensor, ops, first: int = 0, beside: torch.Tensor | None = None
) -> torch.Tensor:
    """Run `layers` (the model's layers first.., whose caches `ops` attends with) over the residual
    stream x (T, D), each operation by `ops`; the stream after. `beside` (T, D): EAGLE-3's layer
    (`models/eagle3.py`), whose attention reads [RMSNorm(beside), RMSNorm(x)] (the token's
    embedding and the stream, each normed by a weight of its own: `attn_norm`, `hidden_norm`)."""
    for i, layer in enumerate(layers, first):
        if beside is None:
            h = ops.norm(x, layer.attn_norm)
        else:
            h = torch.cat([ops.norm(beside, layer.attn_norm).clone(), ops.norm(x, layer.hidden_norm)], dim=-1)
        qkv = ops.project(layer.qkv, h, "qkv")
        x = ops.add_projection(x, layer.o, ops.attend(i, qkv))
        gate_up = ops.project(layer.gate_up, ops.norm(x, layer.mlp_norm), "gate_up")
        x = ops.add_projection(x, layer.down, ops.swiglu(gate_up))
    return x


def reference_forward(
    lm, ids: torch.Tensor, cache, rows: slice | list[int], features: bool = False, inputs: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The torch forward of the LeanLM `lm`: ids (T,) stored and attended by `cache`
    (`ContiguousCache` or `PagedCache`); the logits of the rows `rows`, and with `features` every
    row's features (what a draft head reads): its normed final hidden state (T, D), after the
    residual stream past each layer of `lm.taps` where a head asked for them (`LeanLM.tap`).
    `inputs` (T, D): a vector per row beside its token, for a model that reads them (a draft head, `embed_rows`)."""
    x = F.embedding(ids, lm.embed) if inputs is None else lm.embed_rows(ids, inputs)
    ops, taps, first = TorchOps(lm, cache), [], 0
    for last in (*lm.taps, len(lm.layers) - 1):  # the residual stream after each tapped layer kept
        x = llama_layers(lm.layers[first : last + 1], x, ops, first)
        taps.append(x)
        first = last + 1
    if features:
        h = F.rms_norm(x, (x.shape[-1],), lm.norm, lm.eps)
        return lm.lm_head(h[rows]), torch.cat([*taps[:-1], h], dim=-1)
    x = x[rows]
    return lm.lm_head(F.rms_norm(x, (x.shape[-1],), lm.norm, lm.eps))


class TorchOps:
    """The layer's operations on torch operators, storing and attending through `cache`."""

    def __init__(self, lm, cache):
        self.lm, self.cache = lm, cache

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.lm.eps)

    def project(self, linear, h: torch.Tensor, buffer: str) -> torch.Tensor:
        """linear(h); `buffer` names the scratch the kernel ops write it to (none here)."""
        return linear(h)

    def add_projection(self, x: torch.Tensor, linear, y: torch.Tensor) -> torch.Tensor:
        return x + linear(y)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def attend(self, i: int, qkv: torch.Tensor) -> torch.Tensor:
        """Layer i's attention: qkv (T, (H + 2 Hkv) hd) -> (T, H hd); stores the rows' keys and values."""
        lm, cache = self.lm, self.cache
        T, H, Hkv, hd = qkv.shape[0], lm.heads, lm.kv_heads, lm.head_dim
        q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = rotate(q.view(T, H, hd).transpose(0, 1), cache.cos, cache.sin)  # (H, T, hd)
        k = rotate(k.view(T, Hkv, hd).transpose(0, 1), cache.cos, cache.sin)  # (Hkv, T, hd)
        cache.store(i, k, v.view(T, Hkv, hd).transpose(0, 1))
        return cache.attend(i, q).transpose(0, 1).reshape(T, H * hd)


class ContiguousCache:
    """A LeanSession's cache, (Hkv, P, hd) per layer, for rows at positions start..start+T."""

    def __init__(self, lm, keys: list[torch.Tensor], values: list[torch.Tensor], start: int, T: int):
        self.keys, self.values, self.start, self.end = keys, values, start, start + T
        self.gqa = lm.gqa  # a bool, also under torch.compile (LeanLM.gqa)
        self.cos, self.sin = lm.cos[start : self.end], lm.sin[start : self.end]  # (T, hd)
        # Query i sits at position start+i and sees keys 0..start+i.
        self.mask = None if T == 1 else causal_mask(start, self.end, lm.device)

    def store(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (Hkv, T, hd) into layer i's cache at the rows' positions."""
        self.keys[i][:, self.start : self.end] = k
        self.values[i][:, self.start : self.end] = v

    def attend(self, i: int, q: torch.Tensor) -> torch.Tensor:
        """q (H, T, hd) over layer i's positions 0..end -> (H, T, hd)."""
        keys, values = self.keys[i][:, : self.end], self.values[i][:, : self.end]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, enable_gqa=self.gqa)


class PagedCache:
    """The runner's paged cache, (blocks, Hkv, block_size, hd) per layer. Row r sits at position
    `positions[r]` and is stored in slot `slots[r]` (block slot // block_size, offset slot %
    block_size); `segments` lists per segment, its rows consecutive in the pass, its first
    position, its number of rows and the blocks of its sequence up to its end, whose gathered
    keys and values it attends over."""

    def __init__(
        self, lm, keys: list[torch.Tensor], values: list[torch.Tensor], block_size: int, positions: Sequence[int],
        slots: Sequence[int], segments: Sequence[tuple[int, int, Sequence[int]]],
    ):  # fmt: skip
        device = lm.device
        self.keys, self.values, self.gqa = keys, values, lm.gqa
        position_t, slot_t = torch.tensor(positions, device=device), torch.tensor(slots, device=device)
        self.block, self.offset = slot_t // block_size, slot_t % block_size
        self.cos, self.sin = lm.cos[position_t][None], lm.sin[position_t][None]  # (1, T, hd)
        self.segments = []  # (its rows, its end, its block table, its causal mask), built once a pass
        row = 0
        for start, n, blocks in segments:
            end = start + n
            table = torch.tensor(blocks, device=device)
            self.segments.append((slice(row, row + n), end, table, causal_mask(start, end, device)))
            row += n

    def store(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (Hkv, T, hd) into layer i's pool at the rows' slots."""
        keys, values = self.keys[i], self.values[i]
        keys[self.block, :, self.offset] = k.transpose(0, 1).to(keys.dtype)
        values[self.block, :, self.offset] = v.transpose(0, 1).to(values.dtype)

    def attend(self, i: int, q: torch.Tensor) -> torch.Tensor:
        """q (H, T, hd), each segment over its own sequence's blocks of layer i -> (H, T, hd)."""
        pool_keys, pool_values = self.keys[i], self.values[i]
        Hkv, hd = pool_keys.shape[1], pool_keys.shape[3]
        attn = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for rows, end, table, mask in self.segments:
            keys = pool_keys[table].permute(1, 0, 2, 3).reshape(Hkv, -1, hd)[:, :end]
            values = pool_values[table].permute(1, 0, 2, 3).reshape(Hkv, -1, hd)[:, :end]
            attn[:, rows] = F.scaled_dot_product_attention(
                q[:, rows], keys, values, attn_mask=mask, enable_gqa=self.gqa
            )
        return attn


def causal_mask(start: int, end: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(end, device=device)
    return positions[None, :] <= positions[start:end, None]  # (T, end) True = may attend


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form: x * cos + rotate_half(x) * sin. x (H, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
