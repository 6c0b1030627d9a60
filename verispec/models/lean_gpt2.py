"""The lean backend's GPT-2 forward pass, over the same preallocated KV cache as `LeanLM`.

GPT-2 differs from the Llama family in its parts, not its shape: learned position embeddings
added to the token embeddings instead of rotary ones, LayerNorm with a bias instead of RMSNorm,
a biased fused QKV projection (`c_attn`), full multi-head attention, and a GELU MLP
(`c_fc`, `c_proj`) instead of SwiGLU. The LM head is the token embedding (tied). The cache,
its rollback and the causal mask are `lean.py`'s; which GPT-2 configurations run here is
decided by `lean_support`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from verispec.models.kernels import Linear
from verispec.models.lean import GPT2_GELU, LeanModel, _causal_mask, _load_weights


@dataclass
class _Block:
    ln_1: tuple[torch.Tensor, torch.Tensor]  # (D,) weight, (D,) bias
    qkv: Linear  # D -> 3 D: attn.c_attn, q, k and v stacked, with bias
    o: Linear  # D -> D: attn.c_proj
    ln_2: tuple[torch.Tensor, torch.Tensor]  # (D,) weight, (D,) bias
    fc: Linear  # D -> F: mlp.c_fc
    proj: Linear  # F -> D: mlp.c_proj


class LeanGPT2(LeanModel):
    def __init__(
        self, path: str, device: torch.device, dtype: torch.dtype, kernel: bool = True, compile: bool = False
    ):
        super().__init__(path, device, dtype, kernel, compile)
        config, folder = self.config, self.folder
        self.heads = self.kv_heads = config.n_head
        self.head_dim = config.n_embd // self.heads
        self.eps = config.layer_norm_epsilon
        self.scale = 1 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        self.gelu = GPT2_GELU[config.activation_function]  # F.gelu's `approximate`
        self.max_positions = config.n_positions

        # GPT2LMHeadModel checkpoints prefix the body's keys with "transformer."; the original
        # OpenAI conversions (GPT2Model) do not. The attention-mask buffers (attn.bias,
        # attn.masked_bias) some of them carry are left unread.
        weights = {name.removeprefix("transformer."): w for name, w in _load_weights(folder).items()}

        def take(name: str) -> torch.Tensor:
            return weights.pop(name).to(device=device, dtype=dtype)

        def conv1d(name: str) -> Linear:
            # HF's Conv1D stores its weight (in, out); Linear takes (out, in).
            weight = take(name + ".weight").t().contiguous()
            return self.linear(weight, take(name + ".bias"))

        self.wte = take("wte.weight")  # (V, D)
        self.wpe = take("wpe.weight")  # (P, D)
        self.layers = []
        for i in range(config.n_layer):
            p = f"h.{i}."
            self.layers.append(
                _Block(
                    ln_1=(take(p + "ln_1.weight"), take(p + "ln_1.bias")),
                    qkv=conv1d(p + "attn.c_attn"),
                    o=conv1d(p + "attn.c_proj"),
                    ln_2=(take(p + "ln_2.weight"), take(p + "ln_2.bias")),
                    fc=conv1d(p + "mlp.c_fc"),
                    proj=conv1d(p + "mlp.c_proj"),
                )
            )
        self.ln_f = (take("ln_f.weight"), take("ln_f.bias"))
        # Tied: the checkpoint usually omits lm_head, or repeats the embedding matrix.
        head = take("lm_head.weight") if "lm_head.weight" in weights else self.wte
        self.lm_head = self.linear(head)
        self.vocab_size = self.lm_head.out_features
        if compile:
            self._compile()

    def linears(self) -> list[Linear]:
        """Every weight matrix a pass streams (the embedding tables are only gathered from)."""
        return [linear for b in self.layers for linear in (b.qkv, b.o, b.fc, b.proj)] + [self.lm_head]

    def _eager_step(
        self, ids: torch.Tensor, start: int, keys: list[torch.Tensor], values: list[torch.Tensor], last_only: bool
    ) -> torch.Tensor:
        T = ids.shape[0]
        end = start + T
        H, hd = self.heads, self.head_dim
        # Query i sits at position start+i and sees keys 0..start+i.
        mask = None if T == 1 else _causal_mask(start, end, ids.device)
        x = F.embedding(ids, self.wte) + self.wpe[start:end]  # (T, D)
        D = x.shape[-1]
        for block, layer_keys, layer_values in zip(self.layers, keys, values, strict=True):
            h = F.layer_norm(x, (D,), *block.ln_1, self.eps)
            q, k, v = block.qkv(h).split(H * hd, dim=-1)
            q = q.view(T, H, hd).transpose(0, 1)  # (H, T, hd)
            layer_keys[:, start:end] = k.view(T, H, hd).transpose(0, 1)
            layer_values[:, start:end] = v.view(T, H, hd).transpose(0, 1)
            attn = F.scaled_dot_product_attention(
                q, layer_keys[:, :end], layer_values[:, :end], attn_mask=mask, scale=self.scale
            )  # (H, T, hd)
            x = x + block.o(attn.transpose(0, 1).reshape(T, H * hd))
            h = F.layer_norm(x, (D,), *block.ln_2, self.eps)
            x = x + block.proj(F.gelu(block.fc(h), approximate=self.gelu))
        if last_only:
            x = x[-1:]
        return self.lm_head(F.layer_norm(x, (D,), *self.ln_f, self.eps))
