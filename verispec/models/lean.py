"""The lean backend: our own Llama-family forward pass over a preallocated KV cache.

On small and mid-size models a transformers forward spends a large share of its time outside
the matrix products (module calls, cache objects, mask building, a concatenation per layer per
step). Here a layer is eight tensor operations: one fused QKV projection, rotary embedding, a
write into the cache at the current position, attention over the cache, the output projection,
one fused gate/up projection, SwiGLU and the down projection. The cache is allocated once per
sequence and addressed by position, so rolling back rejected drafts is rewinding `length`.

Two implementations of that layer: `_eager_step`, the one torch forward of `reference.py` (any
device and dtype; the batched runner runs the same one on its paged cache), and on a CPU, where
every projection holds 16-bit-exact weights, `_kernel_step`, every layer of a pass in one call
into the compiled library of `kernels.py` (`csrc/lean_step.c`), which is faster than the torch
step (figures: docs/performance.md) and gives a position the same logits at any pass width.

Supports Llama, Mistral and Qwen2 checkpoints (RMSNorm, default rotary embeddings, grouped-query
attention, SwiGLU, optional QKV bias, tied or untied embeddings) stored as safetensors, and GPT-2
(`LeanGPT2` in `lean_gpt2.py`: learned positions, LayerNorm, GELU, over the same cache).
Anything else (other architectures, other rotary scalings, sliding windows shorter than the
context, GPT-2's layer-scaled or cross attention) is refused by `lean_support`, and the
transformers backend is used instead.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, GenerationConfig

from verispec.errors import UserError
from verispec.models.backend import generation_eos
from verispec.models.gguf_file import gguf_path, open_checkpoint
from verispec.models.kernels import (
    ATTENTION_CONTIGUOUS,
    ATTENTION_PAGED,
    ATTENTION_ROWS,
    Linear,
    VsAttention,
    VsLayer,
    VsModel,
    VsScratch,
    address_array,
    kernel_build,
    kernel_error,
    kernel_library,
)
from verispec.models.quant import QuantLinear, QuantWeight, store_as
from verispec.models.reference import ContiguousCache, llama_layers, reference_forward
from verispec.models.reference import causal_mask as _causal_mask  # noqa: F401 (lean_gpt2 imports it from here)

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")
# GPT-2's activation_function values that the lean backend runs -> F.gelu's `approximate`.
GPT2_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def lean_support(path: str) -> str | None:
    """None if the lean backend can run the checkpoint at `path`, else why not."""
    if gguf_path(path) is not None:
        return None  # GGUFCheckpoint refuses what it cannot read, naming it
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
    taps: tuple[int, ...] = ()  # layers whose output a pass's features carry (`LeanLM.tap`)
    kernel_step = False  # a subclass with a `_kernel_step` turns it on where its weights allow
    dequantized = 0  # quantized projections that run dequantized to float32 (no quantized kernel here)

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, kernel: bool, compile: bool):
        self.kernel, self.compiled = kernel, compile
        self.folder = Path(path)
        self.name = path
        self.device = device
        self.dtype = dtype
        file = gguf_path(path)
        self.checkpoint = open_checkpoint(file) if file else None
        if self.checkpoint is not None:
            self.config = self.checkpoint.config
            self.eos_token_ids = self.checkpoint.eos_token_ids
            return
        self.config = AutoConfig.from_pretrained(self.folder)
        try:
            self.eos_token_ids = generation_eos(GenerationConfig.from_pretrained(self.folder))
        except OSError:
            self.eos_token_ids = generation_eos(self.config)

    def session(self, capacity: int | None = None) -> LeanSession:
        return LeanSession(self, min(capacity or self.max_positions, self.max_positions))

    def linear(
        self, weight: torch.Tensor | QuantWeight | Sequence[torch.Tensor | QuantWeight], bias: torch.Tensor | None = None
    ) -> Linear | QuantLinear:
        """A projection in the form this model runs, from a weight or parts stacked by rows:
        quantized parts stay quantized on the CPU kernel; plain float32 under torch.compile
        (which traces neither the C kernel nor prepacked oneDNN weights), else the fastest here."""
        parts = list(weight) if isinstance(weight, list | tuple) else [weight]
        kernel = self.kernel and not self.compiled and self.device.type == "cpu"
        if all(isinstance(p, QuantWeight) for p in parts) and kernel and kernel_library() is not None:
            return QuantLinear(parts, None if bias is None else bias.float(), self.requested_activations)
        if any(isinstance(p, QuantWeight) for p in parts):  # the same values in float32, on the float path
            self.dequantized += 1
        stacked = torch.cat([p.dequantize() if isinstance(p, QuantWeight) else p for p in parts])
        stacked = stacked.to(device=self.device, dtype=self.dtype)
        bias = None if bias is None else bias.to(device=self.device, dtype=self.dtype)
        # bfloat16 dot products where asked and the kernel runs here (else float32: load_model says so)
        bf16 = self.requested_activations == "bf16" and kernel and kernel_library() is not None
        return Linear(stacked, bias, kernel=kernel, prepack=not self.compiled, activations="bf16" if bf16 else "float")

    requested_activations = "float"  # LeanLM's --activations: float, q8 (block-quantized weights) or bf16

    @property
    def activations(self) -> str:
        """"q8" where block-quantized matrices run with 8-bit activations, "bf16" where float ones
        run with bfloat16 activations, else "float"."""
        kinds = {getattr(linear, "activations", "float") for linear in self.linears()}
        return next((kind for kind in ("q8", "bf16") if kind in kinds), "float")

    def path_report(self) -> dict:
        """Which form every weight matrix runs in, whether passes run on the CPU kernel step,
        and why, and where its compiled library came from (`build`: "installed", "compiled" on
        first use, "unavailable"; None where this model does not use it): for the start-up log
        line, /readyz and the kernel-step gauges."""
        forms: dict[str, int] = {}
        for linear in self.linears():
            forms[linear.form] = forms.get(linear.form, 0) + 1
        on, avoidable = self.kernel_step, False  # avoidable: off by the weights or the machine, not by a choice
        uses_kernel = self.kernel and not self.compiled and self.device.type == "cpu"
        build = kernel_build() if uses_kernel else None
        if on:
            why = "every layer projection runs on the compiled CPU kernel"
        elif not self.kernel:
            why = "--no-cpu-kernel"
        elif self.compiled:
            why = "--compile runs torch.compile's step"
        elif self.device.type != "cpu":
            why = f"the kernel step is for the CPU, not {self.device.type}"
        elif build.source == "unavailable":
            why, avoidable = f"the compiled kernel is unavailable here: {build.reason}", True
        else:
            avoidable = True
            slow = sum(n for form, n in forms.items() if form in ("onednn", "dense"))
            why = (
                f"{slow} weight matrices are float32 that 16 bits cannot hold exactly: "
                "--weights-dtype float16, bfloat16 or q8_0 puts them on the kernel (a change of model)"
            )
        return {
            "kernel_step": on, "forms": forms, "activations": self.activations, "why": why, "avoidable": avoidable,
            "dequantized": self.dequantized,
            "build": None if build is None else build.source,
        }  # fmt: skip

    def forward(self, session: LeanSession, ids: torch.Tensor, last_only: bool) -> torch.Tensor:
        """ids (T,) at positions session.length.. -> logits (T or 1, V); writes the cache."""
        if self.kernel_step:
            return self._kernel_step(ids, session, last_only)
        return self._step(ids, session.length, session.keys, session.values, last_only)

    def _compile(self) -> None:
        """Compile the decode and verify step with torch.compile (inductor; CPU or CUDA), on
        plain float32 linears (inductor traces neither the compiled kernel nor prepacked oneDNN
        weights with dynamic shapes).

        Shapes are marked dynamic, so one graph serves every position and pass width instead of
        one compilation per (position, width)."""
        self._step = torch.compile(self._eager_step, dynamic=True)

    def _step(self, ids, start, keys, values, last_only):
        return self._eager_step(ids, start, keys, values, last_only)


class LeanLM(LeanModel):
    def __init__(
        self,
        path: str,
        device: torch.device,
        dtype: torch.dtype,
        kernel: bool = True,
        compile: bool = False,
        weights_dtype: str = "auto",
        activations: str = "float",
    ):
        super().__init__(path, device, dtype, kernel, compile)
        self.requested_activations = activations
        config, folder = self.config, self.folder
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        # Grouped-query attention, decided here: torch.compile(dynamic=True) makes the head counts
        # symbolic in the step, and scaled_dot_product_attention's enable_gqa takes only a bool.
        self.gqa = self.kv_heads != self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.max_positions = min(config.max_position_embeddings, window or config.max_position_embeddings)

        weights = self.checkpoint.weights() if self.checkpoint is not None else _load_weights(folder)
        if activations == "bf16":  # bfloat16 activations multiply bfloat16 weights: one change of model
            if weights_dtype not in ("auto", "bfloat16"):
                raise UserError(
                    f"--activations bf16 multiplies bfloat16 weights, not {weights_dtype}: "
                    "leave --weights-dtype at auto (or bfloat16)"
                )
            if any(isinstance(weight, QuantWeight) for weight in weights.values()):
                raise UserError(
                    f"--activations bf16 runs float weight matrices, and {path} is block-quantized: "
                    "use --activations q8 (or float) for it"
                )
            weights_dtype = "bfloat16"
        weights = store_as(weights, weights_dtype)

        def take(name: str) -> torch.Tensor:
            return weights.pop(name).to(device=device, dtype=dtype)

        embed = weights.pop("model.embed_tokens.weight")
        # A quantized table is gathered from in float32 (its exact values); the tied head runs quantized.
        self.embed = (embed.dequantize() if isinstance(embed, QuantWeight) else embed).to(device=device, dtype=dtype)
        self.layers = [self.read_layer(weights, f"model.layers.{i}.") for i in range(config.num_hidden_layers)]
        self.norm = take("model.norm.weight")
        # Tied embeddings: the checkpoint may omit lm_head or repeat the embedding matrix.
        self.lm_head = self.linear(weights.pop("lm_head.weight", embed))
        self.vocab_size = self.lm_head.out_features

        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)  # (P, hd/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (P, hd), the rotate-half layout of HF checkpoints
        self.cos = angles.cos().to(device=device, dtype=dtype)
        self.sin = angles.sin().to(device=device, dtype=dtype)
        # Passes on the CPU kernels where every layer projection runs on them (the head may not).
        self.kernel_step = all(linear.on_kernel for linear in self.linears()[:-1])
        self.native = self._native_model() if self.kernel_step else None
        if compile:
            self._compile()

    def read_layer(self, weights: dict, p: str) -> _Layer:
        """The decoder layer whose Hugging Face Llama weights are named `p`... (taken out of `weights`)."""

        def projection(*names: str, bias: Sequence[torch.Tensor | None] = ()) -> Linear | QuantLinear:
            stacked = None if not bias or bias[0] is None else torch.cat(bias).to(device=self.device, dtype=self.dtype)
            return self.linear([weights.pop(n) for n in names], stacked)  # parts stacked by rows: (out, in)

        bias = [weights.pop(f"{p}self_attn.{n}_proj.bias", None) for n in "qkv"]
        return _Layer(
            attn_norm=weights.pop(p + "input_layernorm.weight").to(device=self.device, dtype=self.dtype),
            qkv=projection(*(f"{p}self_attn.{n}_proj.weight" for n in "qkv"), bias=bias),
            o=projection(p + "self_attn.o_proj.weight"),
            mlp_norm=weights.pop(p + "post_attention_layernorm.weight").to(device=self.device, dtype=self.dtype),
            gate_up=projection(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            down=projection(p + "mlp.down_proj.weight"),
        )

    def linears(self) -> list[Linear]:
        """Every weight matrix a pass streams (the embedding table is only gathered from)."""
        return [linear for b in self.layers for linear in (b.qkv, b.o, b.gate_up, b.down)] + [self.lm_head]

    def _native_model(self) -> VsModel | None:
        """The layers as csrc/lean_step.c's vs_model, built once (it points into this model's
        tensors, which live as long as it); None if a layer projection has no native descriptor,
        and the kernel step then calls the kernels one operation at a time."""
        linears = [(b.qkv, b.o, b.gate_up, b.down) for b in self.layers]
        projections = [[getattr(linear, "projection", None) for linear in layer] for layer in linears]
        if any(p is None for layer in projections for p in layer):
            return None
        layers = (VsLayer * len(self.layers))(
            *(VsLayer(b.attn_norm.data_ptr(), qkv, o, b.mlp_norm.data_ptr(), gate_up, down)
              for b, (qkv, o, gate_up, down) in zip(self.layers, projections, strict=True))
        )  # fmt: skip
        return VsModel(
            len(self.layers), self.embed.shape[1], self.heads, self.kv_heads, self.head_dim,
            self.layers[0].down.in_features, self.eps, self.head_dim**-0.5, self.cos.data_ptr(), self.sin.data_ptr(),
            layers,
        )  # fmt: skip

    @staticmethod
    def _session_attention(session: LeanSession) -> VsAttention:
        """The session's caches as the kernel step's attention descriptor, described once."""
        if session.kernel_attention is None:
            session.kernel_attention = VsAttention(
                mode=ATTENTION_CONTIGUOUS, keys=address_array(session.keys), values=address_array(session.values),
                capacity=session.keys[0].shape[1],
            )  # fmt: skip
        return session.kernel_attention

    def _kernel_step(self, ids: torch.Tensor, session: LeanSession, last_only: bool) -> torch.Tensor:
        """The pass of `_eager_step` on the compiled kernels (kernels.py), all layers in one call:
        at one to a few rows torch's fixed cost per operator, and even ctypes' per call, exceeds
        the arithmetic. Every row is computed alone, so a position's logits are the same bits at
        any pass width, and its keys and values the same however the prompt was split into passes
        (the batched runner, `core/runner.py`, relies on both)."""
        attention = self._session_attention(session)
        attention.start = session.length
        T = ids.shape[0]
        return self.kernel_pass(ids, attention, slice(T - 1 if last_only else 0, T))

    def greedy_native(self) -> bool:
        """Whether `LeanSession.greedy` runs in native code here (the kernel step and a head on the kernel)."""
        return self.native is not None and getattr(self.lm_head, "projection", None) is not None

    def _scratch(self, T: int) -> tuple[torch.Tensor, list[int], tuple[int, ...]]:
        """One allocation holding a pass's buffers (h, qkv, attn, gate_up, act: T rows each, each
        64-byte aligned): the tensor, the buffers' offsets in floats, and their widths."""
        D, H, Hkv, hd = self.embed.shape[1], self.heads, self.kv_heads, self.head_dim
        ffn = self.layers[0].down.in_features
        widths = (D, (H + 2 * Hkv) * hd, H * hd, 2 * ffn, ffn)
        padded = [-(-w // 16) * 16 for w in widths]
        flat = torch.empty(T * sum(padded))
        return flat, [T * sum(padded[:i]) for i in range(len(padded))], widths

    def greedy(self, session: LeanSession, token: int, steps: int, vocab: int) -> list[int]:
        """`steps` greedy tokens after `token` (see LeanSession.greedy), in one native call."""
        attention = self._session_attention(session)
        attention.start = session.length
        flat, offsets, _ = self._scratch(1)
        scratch = VsScratch(*(flat.data_ptr() + 4 * o for o in offsets))
        D = self.embed.shape[1]
        x, h = torch.empty(D), torch.empty(D)
        logits = torch.empty(self.lm_head.out_features)
        out = torch.empty(steps, dtype=torch.int64)
        failed = kernel_library().lean_greedy(
            ctypes.byref(self.native), self.embed.data_ptr(), self.norm.data_ptr(), ctypes.byref(self.lm_head.projection),
            vocab, ctypes.byref(attention), ctypes.byref(scratch), x.data_ptr(), h.data_ptr(), logits.data_ptr(),
            token, steps, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            raise kernel_error(failed, "lean_greedy")
        return out.tolist()

    def greedy_paged(
        self, attention: VsAttention, tokens: list[int], positions: list[int], steps: int, vocab: int,
        features: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """`greedy` for several sequences of a paged cache at once (`ModelRunner.greedy`): per row,
        `steps` greedy tokens after `tokens[s]`, fed from `positions[s]` on, in one native call. A
        draft head (`reads_inputs`) feeds each row `features[s]` (S, D) beside its first token and
        its own predicted feature after that, and answers in the verifier's ids."""
        S, D = len(tokens), self.embed.shape[1]
        flat, offsets, _ = self._scratch(S)
        scratch = VsScratch(*(flat.data_ptr() + 4 * o for o in offsets))
        x, h = torch.empty(S * D), torch.empty(S * D)
        logits = torch.empty(S * self.lm_head.out_features)
        fed = torch.tensor(tokens, dtype=torch.int64)
        at = torch.tensor(positions, dtype=torch.int64)
        out = torch.empty(S * steps, dtype=torch.int64)
        head = (None, None, None, None)
        if getattr(self, "reads_inputs", False):  # a draft head: fc, d2t, the features (updated in place), [embedding, feature]
            fed_features, joined = features.float().contiguous().clone(), torch.empty(S * 2 * D)
            head = (ctypes.byref(self.fc.projection), self.d2t.data_ptr(), fed_features.data_ptr(), joined.data_ptr())
        failed = kernel_library().lean_greedy_paged(
            ctypes.byref(self.native), self.embed.data_ptr(), self.norm.data_ptr(), ctypes.byref(self.lm_head.projection),
            vocab, ctypes.byref(attention), ctypes.byref(scratch), x.data_ptr(), h.data_ptr(), logits.data_ptr(),
            S, fed.data_ptr(), at.data_ptr(), steps, out.data_ptr(), torch.get_num_threads(), *head,
        )  # fmt: skip
        if failed:
            raise kernel_error(failed, "lean_greedy_paged")
        return out.view(S, steps).tolist()

    def kernel_pass(
        self, ids: torch.Tensor, attention: VsAttention, rows: slice | list[int], per_op: bool = False,
        features: bool = False, inputs: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The kernel step's layers over the rows `ids`, in one call (csrc/lean_step.c), storing
        their rotated keys and values and attending as `attention` says (one sequence's cache, or
        the paged cache of a batch); the logits of the rows `rows`. `per_op`: one call per
        operation instead, from Python, the same bits (what a model whose projections have no
        native descriptor runs, and what scripts/profile_step.py times operation by operation).
        `features`: also every row's final hidden state, normed (T, D), what a draft head reads
        (`models/head.py`); the logits are the same bits either way (the norm is per row).
        `inputs` (T, D): a vector per row beside its token, for a model that reads them (a draft
        head, `embed_rows`)."""
        x = F.embedding(ids, self.embed) if inputs is None else self.embed_rows(ids, inputs)
        taps, first = [], 0
        for last in sorted(self.taps):  # the residual stream after each tapped layer, kept
            x = self.kernel_layers(x, attention, per_op, first, last + 1)
            taps.append(x.clone())
            first = last + 1
        x = self.kernel_layers(x, attention, per_op, first)  # (T, D), the residual stream
        h = self.final_norm(x if features else x[rows].contiguous())
        picked = h[rows].contiguous() if features else h
        logits = self.lm_head(picked) if picked.shape[0] else picked
        if features and taps:
            h = torch.cat([*(taps[sorted(self.taps).index(layer)] for layer in self.taps), h], dim=-1)
        return (logits, h) if features else logits

    def tap(self, layers: Sequence[int]) -> None:
        """Make the features of a pass (`kernel_pass`, `reference_forward`) also carry the residual
        stream after each of `layers` (EAGLE-3 heads read three: `models/eagle3.py`), in the
        columns `tap_columns` gives, before the normed final hidden state. Layers already tapped
        keep their columns, so a head loaded later moves no earlier head's."""
        for layer in layers:
            if not 0 <= layer < len(self.layers) - 1:
                raise ValueError(f"layer {layer} is not an inner layer of the {len(self.layers)}")
        self.taps = (*self.taps, *(layer for layer in dict.fromkeys(layers) if layer not in self.taps))

    def tap_columns(self, layer: int) -> slice:
        """Where the residual stream after `layer` (tapped) lies in a pass's features."""
        D, i = self.embed.shape[1], self.taps.index(layer)
        return slice(i * D, (i + 1) * D)

    def tapped(self, rows: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """The residual streams after `layers` (tapped) in a pass's features `rows` (n, ...)."""
        return [rows[:, self.tap_columns(layer)] for layer in layers]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm of rows x (T, D) on the kernel."""
        h = torch.empty_like(x)
        if x.shape[0]:
            kernel_library().rms_norm(x.data_ptr(), x.shape[0], x.shape[1], self.norm.data_ptr(), self.eps, h.data_ptr())
        return h

    def kernel_layers(
        self, x: torch.Tensor, attention: VsAttention, per_op: bool = False, first: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """The layers first..end-1 (all by default) over the residual stream x (T, D), in place, on
        the kernels (see kernel_pass)."""
        ops = kernel_library()
        T, end = x.shape[0], len(self.layers) if end is None else end
        flat, offsets, widths = self._scratch(T)
        if per_op or self.native is None:
            buffers = [flat[o : o + T * w].view(T, w) for o, w in zip(offsets, widths, strict=True)]
            llama_layers(self.layers[first:end], x, _KernelOps(self, attention, *buffers), first)  # x accumulates in place
        else:
            base = flat.data_ptr()
            scratch = VsScratch(*(base + 4 * o for o in offsets))
            model, attention = self.native, attention
            if (first, end) != (0, len(self.layers)):  # the same model and caches, from layer `first` on
                model, attention = _layer_range(self.native, attention, first, end)
            failed = ops.lean_layers(
                ctypes.byref(model), x.data_ptr(), T, ctypes.byref(attention), ctypes.byref(scratch),
                torch.get_num_threads(),
            )  # fmt: skip
            if failed:
                raise kernel_error(failed, "lean_layers")
        return x

    def torch_pass(
        self, ids: torch.Tensor, cache, rows: slice | list[int], features: bool = False, inputs: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`kernel_pass` on torch operators, over `cache` (the runner's `PagedCache`): `reference_forward`."""
        return reference_forward(self, ids, cache, rows, features, inputs)

    def _eager_step(
        self, ids: torch.Tensor, start: int, keys: list[torch.Tensor], values: list[torch.Tensor], last_only: bool
    ) -> torch.Tensor:
        """The torch forward (`reference.py`) of ids (T,) at positions start.., over a session's caches."""
        cache = ContiguousCache(self, keys, values, start, ids.shape[0])
        return reference_forward(self, ids, cache, slice(-1, None) if last_only else slice(None))


def _layer_range(model: VsModel, attention: VsAttention, first: int, end: int) -> tuple[VsModel, VsAttention]:
    """`model`'s layers first..end-1 as a model of their own, and `attention` with its per-layer
    caches shifted to match: what lean_layers runs to stop after a tapped layer."""
    part = VsModel.from_buffer_copy(model)
    part.layers = end - first
    part.layer = ctypes.cast(ctypes.addressof(model.layer.contents) + first * ctypes.sizeof(VsLayer), type(model.layer))
    shifted = VsAttention.from_buffer_copy(attention)
    for name in ("keys", "values"):
        caches = getattr(attention, name)
        setattr(shifted, name, ctypes.cast(ctypes.cast(caches, ctypes.c_void_p).value + first * 8, type(caches)))
    return part, shifted


class _KernelOps:
    """`llama_layers`' operations as one call each into the compiled kernels, on a pass's buffers
    (`LeanLM._scratch`: h, qkv, attn, gate_up, act), attending as `attention` says: the layers run
    this way are lean_step.c's `lean_layers` driven from Python, the same bits, so the Python
    structure is the torch forward's and only the operations differ. What a model whose
    projections have no native descriptor runs, and what scripts/profile_step.py times operation
    by operation (it counts the calls through this module's `kernel_library`)."""

    def __init__(
        self, lm: LeanLM, attention: VsAttention, h: torch.Tensor, qkv: torch.Tensor, attn: torch.Tensor,
        gate_up: torch.Tensor, act: torch.Tensor,
    ):  # fmt: skip
        self.lm, self.attention = lm, attention
        self.h, self.attn, self.act = h, attn, act
        self.buffers = {"qkv": qkv, "gate_up": gate_up}

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        kernel_library().rms_norm(x.data_ptr(), *x.shape, weight.data_ptr(), self.lm.eps, self.h.data_ptr())
        return self.h

    def project(self, linear: Linear | QuantLinear, h: torch.Tensor, buffer: str) -> torch.Tensor:
        linear.into(h, self.buffers[buffer])
        return self.buffers[buffer]

    def add_projection(self, x: torch.Tensor, linear: Linear | QuantLinear, y: torch.Tensor) -> torch.Tensor:
        linear.into(y, x, accumulate=True)
        return x

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        kernel_library().silu_mul(gate_up.data_ptr(), *self.act.shape, self.act.data_ptr())
        return self.act

    def attend(self, i: int, qkv: torch.Tensor) -> torch.Tensor:
        """lean_step.c's `attend`: store the rows' rotated keys and values in layer i's cache and
        write their attention output."""
        ops, lm, a, attn = kernel_library(), self.lm, self.attention, self.attn
        T, H, Hkv, hd = qkv.shape[0], lm.heads, lm.kv_heads, lm.head_dim
        cos, sin, scale, threads = lm.cos.data_ptr(), lm.sin.data_ptr(), hd**-0.5, torch.get_num_threads()
        k, v = a.keys[i], a.values[i]
        if a.mode == ATTENTION_PAGED:
            q = qkv.data_ptr()
            ops.rope_store_paged(q, T, H, Hkv, hd, cos, sin, a.positions, a.slots, k, v, a.block_size)
            ops.paged_attention(
                q, a.segments, a.seg_row, a.seg_len, a.seg_pos, a.tables, a.table_start, a.parents, H, Hkv, hd,
                k, v, a.block_size, scale, attn.data_ptr(), threads,
            )  # fmt: skip
            return attn
        ops.rope_store(qkv.data_ptr(), T, H, Hkv, hd, cos, sin, a.start, k, v, a.capacity)
        for first in range(0, T, ATTENTION_ROWS):  # bounded scratch: rows are independent
            rows = min(ATTENTION_ROWS, T - first)
            ops.attention(
                qkv[first].data_ptr(), rows, H, Hkv, hd, k, v, a.capacity, a.start + first, scale,
                attn[first].data_ptr(), threads,
            )  # fmt: skip
        return attn


class LeanSession:
    """A KV cache preallocated for `capacity` positions; rollback rewinds `length`."""

    def __init__(self, lm: LeanModel, capacity: int):
        self.lm = lm
        self.capacity = capacity
        shape = (lm.kv_heads, capacity, lm.head_dim)  # per layer: (Hkv, P, hd)
        self.keys = [torch.empty(shape, device=lm.device, dtype=lm.dtype) for _ in lm.layers]
        self.values = [torch.empty(shape, device=lm.device, dtype=lm.dtype) for _ in lm.layers]
        self.length = 0
        self.kernel_attention: VsAttention | None = None  # these caches as the kernel step's descriptor

    @torch.inference_mode()
    def extend(self, token_ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        if self.length + len(token_ids) > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions is full")
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.lm.device)
        logits = self.lm.forward(self, ids, last_only)
        self.length += len(token_ids)
        return logits.float()

    def greedy_native(self) -> bool:
        return self.lm.greedy_native() if isinstance(self.lm, LeanLM) else False

    @torch.inference_mode()
    def greedy(self, token: int, steps: int, vocab: int) -> list[int]:
        """Feed `token`, then each greedy choice, `steps` times, all in native code; the `steps`
        tokens chosen (the first maximal logit among the first `vocab`, as argmax picks it). The
        cache grows by `steps` positions: the last token chosen is not fed. Only where
        `greedy_native()`."""
        if self.length + steps > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions is full")
        tokens = self.lm.greedy(self, token, steps, vocab)
        self.length += steps
        return tokens

    def rollback(self, length: int) -> None:
        # Stale entries past `length` are never attended (attention stops at the current end)
        # and are overwritten by the next extend.
        self.length = min(self.length, length)


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(folder / name))
    return weights
