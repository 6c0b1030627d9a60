"""The lean backend: our own Llama-family forward pass over a preallocated KV cache.

On small and mid-size models a transformers forward spends a large share of its time outside
the matrix products (module calls, cache objects, mask building, a concatenation per layer per
step). Here a layer is eight tensor operations: one fused QKV projection, rotary embedding, a
write into the cache at the current position, attention over the cache, the output projection,
one fused gate/up projection, SwiGLU and the down projection. The cache is allocated once per
sequence and addressed by position, so rolling back rejected drafts is rewinding `length`.

Two implementations of that layer: `_eager_step` in torch operators (any device and dtype), and
on a CPU, where every projection holds 16-bit-exact weights, `_kernel_step`, one call per
operation into the compiled library of `kernels.py`, which is 2.7x faster on the reference
target and gives a position the same logits at any pass width.

Supports Llama, Mistral and Qwen2 checkpoints (RMSNorm, default rotary embeddings, grouped-query
attention, SwiGLU, optional QKV bias, tied or untied embeddings) stored as safetensors, and GPT-2
(`LeanGPT2` in `lean_gpt2.py`: learned positions, LayerNorm, GELU, over the same cache).
Anything else (other architectures, other rotary scalings, sliding windows shorter than the
context, GPT-2's layer-scaled or cross attention) is refused by `lean_support`, and the
transformers backend is used instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, GenerationConfig

from verispec.models.backend import generation_eos
from verispec.models.kernels import Linear, kernel_library

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")
ATTENTION_ROWS = 256  # query rows per attention call of the kernel step (its scratch is rows x context)
# GPT-2's activation_function values that the lean backend runs -> F.gelu's `approximate`.
GPT2_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def lean_support(path: str) -> str | None:
    """None if the lean backend can run the checkpoint at `path`, else why not."""
    folder = Path(path)
    if not folder.is_dir():
        return "not a local folder"
    if not any(folder.glob("*.safetensors")):
        return "no safetensors weights"
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in ARCHITECTURES:
        return f"architecture {config.model_type!r} (lean supports {', '.join(ARCHITECTURES)})"
    if config.model_type == "gpt2":
        for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if getattr(config, option, False):
                return f"GPT-2 with {option}"
        if config.activation_function not in GPT2_GELU:
            return f"activation {config.activation_function!r}"
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rotary scaling {rope.get('rope_type', rope.get('type'))!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    return None


@dataclass
class _Layer:
    attn_norm: torch.Tensor  # (D,)
    qkv: Linear  # D -> (H + 2 Hkv) hd: q, k and v projections stacked (with Qwen2's bias)
    o: Linear  # H hd -> D
    mlp_norm: torch.Tensor  # (D,)
    gate_up: Linear  # D -> 2 F: gate and up projections stacked
    down: Linear  # F -> D


class LeanModel:
    """What the lean models share: loading the config, the KV cache session, the choice of step
    (the CPU kernel step for a few rows where the model has one, else the torch step), and
    compiling the torch step. Subclasses set the layers and `_eager_step`."""

    backend = "lean"
    kernel_step = False  # a subclass with a `_kernel_step` turns it on where its weights allow

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, kernel: bool, compile: bool):
        self.kernel, self.compiled = kernel, compile
        self.folder = Path(path)
        self.config = AutoConfig.from_pretrained(self.folder)
        self.name = path
        self.device = device
        self.dtype = dtype
        try:
            self.eos_token_ids = generation_eos(GenerationConfig.from_pretrained(self.folder))
        except OSError:
            self.eos_token_ids = generation_eos(self.config)

    def session(self, capacity: int | None = None) -> LeanSession:
        return LeanSession(self, min(capacity or self.max_positions, self.max_positions))

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        """A projection in the form this model runs: plain float32 under torch.compile (which
        traces neither the C kernel nor prepacked oneDNN weights), else the fastest here."""
        return Linear(weight, bias, kernel=self.kernel and not self.compiled, prepack=not self.compiled)

    def forward(self, session: LeanSession, ids: torch.Tensor, last_only: bool) -> torch.Tensor:
        """ids (T,) at positions session.length.. -> logits (T or 1, V); writes the cache."""
        return self._step(ids, session.length, session.keys, session.values, last_only)

    def _compile(self) -> None:
        """Compile the decode and verify step with torch.compile (inductor; CPU or CUDA), on
        plain float32 linears (inductor traces neither the compiled kernel nor prepacked oneDNN
        weights with dynamic shapes).

        Shapes are marked dynamic, so one graph serves every position and pass width instead of
        one compilation per (position, width)."""
        self._step = torch.compile(self._eager_step, dynamic=True)

    def _step(self, ids, start, keys, values, last_only):
        if self.kernel_step:
            return self._kernel_step(ids, start, keys, values, last_only)
        return self._eager_step(ids, start, keys, values, last_only)


class LeanLM(LeanModel):
    def __init__(
        self, path: str, device: torch.device, dtype: torch.dtype, kernel: bool = True, compile: bool = False
    ):
        super().__init__(path, device, dtype, kernel, compile)
        config, folder = self.config, self.folder
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.max_positions = min(config.max_position_embeddings, window or config.max_position_embeddings)

        weights = _load_weights(folder)

        def take(name: str) -> torch.Tensor:
            return weights.pop(name).to(device=device, dtype=dtype)

        def projection(*names: str, bias: Sequence[torch.Tensor | None] = ()) -> Linear:
            weight = torch.cat([take(n) for n in names])  # (out, in)
            stacked = None if not bias or bias[0] is None else torch.cat(bias).to(device=device, dtype=dtype)
            return self.linear(weight, stacked)

        self.embed = take("model.embed_tokens.weight")  # (V, D)
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            bias = [weights.pop(f"{p}self_attn.{n}_proj.bias", None) for n in "qkv"]
            self.layers.append(
                _Layer(
                    attn_norm=take(p + "input_layernorm.weight"),
                    qkv=projection(*(f"{p}self_attn.{n}_proj.weight" for n in "qkv"), bias=bias),
                    o=projection(p + "self_attn.o_proj.weight"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=projection(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                    down=projection(p + "mlp.down_proj.weight"),
                )
            )
        self.norm = take("model.norm.weight")
        # Tied embeddings: the checkpoint may omit lm_head or repeat the embedding matrix.
        head = take("lm_head.weight") if "lm_head.weight" in weights else self.embed
        self.lm_head = self.linear(head)
        self.vocab_size = self.lm_head.out_features

        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)  # (P, hd/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (P, hd), the rotate-half layout of HF checkpoints
        self.cos = angles.cos().to(device=device, dtype=dtype)
        self.sin = angles.sin().to(device=device, dtype=dtype)
        # Passes on the CPU kernels where every layer projection runs on them (the head may not).
        self.kernel_step = all(linear.form.startswith("widen") for linear in self.linears()[:-1])
        if compile:
            self._compile()

    def linears(self) -> list[Linear]:
        """Every weight matrix a pass streams (the embedding table is only gathered from)."""
        return [linear for b in self.layers for linear in (b.qkv, b.o, b.gate_up, b.down)] + [self.lm_head]

    def _kernel_step(
        self, ids: torch.Tensor, start: int, keys: list[torch.Tensor], values: list[torch.Tensor], last_only: bool
    ) -> torch.Tensor:
        """The pass of `_eager_step` with one C call per operation (kernels.py): at one to a few
        rows torch's fixed cost per operator exceeds the arithmetic. Every row is computed alone,
        so a position's logits are the same bits at any pass width, and its keys and values the
        same however the prompt was split into passes (the batched runner, `core/runner.py`,
        relies on both)."""
        ops = kernel_library()
        T, H, Hkv, hd = ids.shape[0], self.heads, self.kv_heads, self.head_dim
        capacity, threads = keys[0].shape[1], torch.get_num_threads()
        cos, sin, scale = self.cos.data_ptr(), self.sin.data_ptr(), hd**-0.5

        def attend(i: int, qkv: torch.Tensor, attn: torch.Tensor) -> None:
            k, v = keys[i].data_ptr(), values[i].data_ptr()
            ops.rope_store(qkv.data_ptr(), T, H, Hkv, hd, cos, sin, start, k, v, capacity)
            for first in range(0, T, ATTENTION_ROWS):  # bounded scratch: rows are independent
                rows = min(ATTENTION_ROWS, T - first)
                ops.attention(
                    qkv[first].data_ptr(), rows, H, Hkv, hd, k, v, capacity, start + first, scale,
                    attn[first].data_ptr(), threads,
                )  # fmt: skip

        return self.kernel_pass(ids, attend, slice(T - 1 if last_only else 0, T))

    def kernel_pass(
        self, ids: torch.Tensor, attend: Callable[[int, torch.Tensor, torch.Tensor], None], rows: slice | list[int]
    ) -> torch.Tensor:
        """The kernel step's layers, one C call per operation, around `attend(layer, qkv, attn)`,
        which stores the rows' rotated keys and values in the cache (of one sequence, or paged)
        and writes their attention output; the logits of the rows `rows`."""
        ops = kernel_library()
        T, D = ids.shape[0], self.embed.shape[1]
        H, Hkv, hd = self.heads, self.kv_heads, self.head_dim
        ffn = self.layers[0].down.in_features
        x = F.embedding(ids, self.embed)  # (T, D), the residual stream
        h = torch.empty_like(x)
        qkv = torch.empty((T, (H + 2 * Hkv) * hd))
        attn = torch.empty((T, H * hd))
        gate_up = torch.empty((T, 2 * ffn))
        act = torch.empty((T, ffn))
        eps = self.eps
        for i, layer in enumerate(self.layers):
            ops.rms_norm(x.data_ptr(), T, D, layer.attn_norm.data_ptr(), eps, h.data_ptr())
            layer.qkv.into(h, qkv)
            attend(i, qkv, attn)
            layer.o.into(attn, x, accumulate=True)
            ops.rms_norm(x.data_ptr(), T, D, layer.mlp_norm.data_ptr(), eps, h.data_ptr())
            layer.gate_up.into(h, gate_up)
            ops.silu_mul(gate_up.data_ptr(), T, ffn, act.data_ptr())
            layer.down.into(act, x, accumulate=True)
        x = x[rows].contiguous()
        if x.shape[0] == 0:
            return x
        h = torch.empty_like(x)
        ops.rms_norm(x.data_ptr(), x.shape[0], D, self.norm.data_ptr(), eps, h.data_ptr())
        return self.lm_head(h)

    def _eager_step(
        self, ids: torch.Tensor, start: int, keys: list[torch.Tensor], values: list[torch.Tensor], last_only: bool
    ) -> torch.Tensor:
        T = ids.shape[0]
        end = start + T
        H, Hkv, hd = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[start:end], self.sin[start:end]  # (T, hd)
        # Query i sits at position start+i and sees keys 0..start+i.
        mask = None if T == 1 else _causal_mask(start, end, ids.device)
        x = F.embedding(ids, self.embed)  # (T, D)
        for layer, layer_keys, layer_values in zip(self.layers, keys, values, strict=True):
            h = F.rms_norm(x, (x.shape[-1],), layer.attn_norm, self.eps)
            qkv = layer.qkv(h)
            q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
            q = _rotate(q.view(T, H, hd).transpose(0, 1), cos, sin)  # (H, T, hd)
            layer_keys[:, start:end] = _rotate(k.view(T, Hkv, hd).transpose(0, 1), cos, sin)
            layer_values[:, start:end] = v.view(T, Hkv, hd).transpose(0, 1)
            attn = F.scaled_dot_product_attention(
                q, layer_keys[:, :end], layer_values[:, :end], attn_mask=mask, enable_gqa=Hkv != H
            )  # (H, T, hd)
            x = x + layer.o(attn.transpose(0, 1).reshape(T, H * hd))
            h = F.rms_norm(x, (x.shape[-1],), layer.mlp_norm, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        if last_only:
            x = x[-1:]
        return self.lm_head(F.rms_norm(x, (x.shape[-1],), self.norm, self.eps))


class LeanSession:
    """A KV cache preallocated for `capacity` positions; rollback rewinds `length`."""

    def __init__(self, lm: LeanModel, capacity: int):
        self.lm = lm
        self.capacity = capacity
        shape = (lm.kv_heads, capacity, lm.head_dim)  # per layer: (Hkv, P, hd)
        self.keys = [torch.empty(shape, device=lm.device, dtype=lm.dtype) for _ in lm.layers]
        self.values = [torch.empty(shape, device=lm.device, dtype=lm.dtype) for _ in lm.layers]
        self.length = 0

    @torch.inference_mode()
    def extend(self, token_ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        if self.length + len(token_ids) > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions is full")
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.lm.device)
        logits = self.lm.forward(self, ids, last_only)
        self.length += len(token_ids)
        return logits.float()

    def rollback(self, length: int) -> None:
        # Stale entries past `length` are never attended (attention stops at the current end)
        # and are overwritten by the next extend.
        self.length = min(self.length, length)



def _causal_mask(start: int, end: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(end, device=device)
    return positions[None, :] <= positions[start:end, None]  # (T, end) True = may attend


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form: x * cos + rotate_half(x) * sin. x (H, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(folder / name))
    return weights
