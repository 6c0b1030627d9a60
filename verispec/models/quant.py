"""Block-quantized weights (the GGUF formats) and the projection that runs on them.

A quantized weight stays in its file's block format in memory: rows of blocks, each block a few
scales and 32 or 256 small integers. `QuantLinear` multiplies float32 activations by it in
`csrc/quant_linear.c`, which dequantizes each block in registers to exactly the float32 values
the `gguf` package's own dequantization gives, and accumulates in float32 in an order that does
not depend on the number of rows in the pass. The model is therefore "the dequantized weights in
float32", and a position's logits are the same bits decoded alone, verified among k+1 positions
or in a batch, which is what keeps speculative output token-identical to verifier-only decoding.

Where the kernel cannot run (no compiler, not x86-64 with AVX2, a CUDA device) the weights are
dequantized once to float32 and take the float path of `kernels.Linear`: the same model, slower.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from verispec.models.kernels import (
    QUANTIZED_FORM,
    QUANTIZED_Q8_FORM,
    Part,
    VsProjection,
    kernel_error,
    kernel_library,
    native_projection,
)

# The block formats the kernel runs: those llama-quantize writes for the common file types
# (Q4_K_M files are Q4_K with Q6_K for some layers, and Q5_0 for tensors whose width is not a
# multiple of 256, as SmolLM2's 576; Q5_K_M files fall back to Q5_1 the same way; Q2_K and Q3_K_*
# files mix Q2_K, Q3_K, Q4_K and Q5_K; IQ4_XS files fall back to IQ4_NL).
QUANTIZED = {
    GGMLQuantizationType.Q8_0: "q8_0",
    GGMLQuantizationType.Q4_0: "q4_0",
    GGMLQuantizationType.Q4_1: "q4_1",
    GGMLQuantizationType.Q5_0: "q5_0",
    GGMLQuantizationType.Q5_1: "q5_1",
    GGMLQuantizationType.IQ4_NL: "iq4_nl",
    GGMLQuantizationType.Q2_K: "q2_k",
    GGMLQuantizationType.Q3_K: "q3_k",
    GGMLQuantizationType.Q4_K: "q4_k",
    GGMLQuantizationType.Q5_K: "q5_k",
    GGMLQuantizationType.Q6_K: "q6_k",
    GGMLQuantizationType.IQ4_XS: "iq4_xs",
}


@dataclass(frozen=True)
class QuantWeight:
    """An (out, in) weight in a GGUF block format: `data` holds its rows of blocks as stored."""

    type: GGMLQuantizationType
    data: torch.Tensor  # uint8 (out, bytes per row)
    in_features: int

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def form(self) -> str:
        return QUANTIZED[self.type]

    def dequantize(self) -> torch.Tensor:
        """The float32 (out, in) weight, by the gguf package's own dequantization."""
        return torch.from_numpy(np.ascontiguousarray(gguf_quants.dequantize(self.data.numpy(), self.type)))

    def rows(self, index: torch.Tensor) -> QuantWeight:
        """The weight with its rows reordered (or selected) by `index`."""
        return QuantWeight(self.type, self.data[index].contiguous(), self.in_features)

    @classmethod
    def quantize(cls, weight: torch.Tensor, type: GGMLQuantizationType) -> QuantWeight:
        """A float (out, in) weight in a block format, by the gguf package's quantizer."""
        array = weight.detach().float().contiguous().numpy()
        return cls(type, torch.from_numpy(gguf_quants.quantize(array, type)), weight.shape[1])


def check_shape(type: GGMLQuantizationType, in_features: int, name: str) -> None:
    block = GGML_QUANT_SIZES[type][0]
    if in_features % block:
        raise ValueError(f"{name}: {in_features} inputs is not a multiple of {type.name}'s block of {block}")


class QuantLinear:
    """y = x @ W.T (+ bias) for a weight made of quantized parts stacked by rows (a fused q/k/v
    projection may hold two formats, e.g. Q4_K and Q6_K in a Q4_K_M file): each part writes its
    columns of y, dequantized in registers by the compiled kernel. `activations`: "float" multiplies
    float32 activations by the exact dequantized weights (csrc/quant_linear.c); "q8" quantizes each
    row's activations to 8 bits per block of 32 and multiplies integers (csrc/quant_int8.c), as
    llama.cpp does: faster, and a different model, chosen by the user (ModelSettings.activations)."""

    def __init__(self, parts: Sequence[QuantWeight], bias: torch.Tensor | None = None, activations: str = "float"):
        if activations not in ("float", "q8"):
            raise ValueError(f"activations must be float or q8, not {activations!r}")
        self.activations = activations
        self.parts = list(parts)
        self.in_features = self.parts[0].in_features
        self.out_features = sum(part.out_features for part in self.parts)
        self.bias = None if bias is None else bias.float().contiguous()
        self.form = "+".join(dict.fromkeys(part.form for part in self.parts))
        self._library = kernel_library()
        self._columns = np.cumsum([0] + [part.out_features for part in self.parts[:-1]]).tolist()
        # What the kernel streams: the blocks as stored, or with q8 activations their rows
        # interleaved 8 at a time once here (csrc/quant_int8.c: quant_q8_pack).
        self._streamed = [part.data if activations == "float" else self._packed(part) for part in self.parts]

    def _packed(self, part: QuantWeight) -> torch.Tensor:
        size = self._library.quant_q8_packed_bytes(int(part.type), part.out_features, self.in_features)
        if size <= 0:
            raise RuntimeError(f"8-bit activations do not run {part.type.name}")
        packed = torch.empty(size, dtype=torch.uint8)
        data = part.data.contiguous()
        if self._library.quant_q8_pack(int(part.type), data.data_ptr(), part.out_features, self.in_features, packed.data_ptr()):
            raise RuntimeError(f"8-bit activations do not run {part.type.name}")
        return packed

    on_kernel = True

    @property
    def nbytes(self) -> int:
        return sum(weight.numel() for weight in self._streamed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        y = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
        self.into(x, y)
        return y

    def into(self, x: torch.Tensor, y: torch.Tensor, accumulate: bool = False) -> None:
        """y = x @ W.T + bias, or y += it; x and y contiguous float32. Every row is computed alone."""
        threads = torch.get_num_threads()
        kernel = self._library.quant_linear_q8 if self.activations == "q8" else self._library.quant_linear
        for part, weight, column in zip(self.parts, self._streamed, self._columns, strict=True):
            bias = None if self.bias is None else self.bias[column:].data_ptr()
            done = kernel(
                int(part.type), x.data_ptr(), x.shape[0], weight.data_ptr(), part.out_features, self.in_features,
                bias, y.data_ptr() + 4 * column, self.out_features, accumulate, threads,
            )  # fmt: skip
            if done == -2:
                raise kernel_error(done, "quant_linear")
            if done != 0:
                raise RuntimeError(f"the quantized kernel does not run {part.type.name}")


    @property
    def _form(self) -> int:
        return QUANTIZED_Q8_FORM if self.activations == "q8" else QUANTIZED_FORM

    def native_parts(self) -> list[Part]:
        """Its parts as the one-call step (`csrc/lean_step.c`) runs them, each writing its columns."""
        return [
            Part(self._form + int(part.type), weight, part.out_features, self.in_features,
                 None if self.bias is None else self.bias[column:], column)
            for part, weight, column in zip(self.parts, self._streamed, self._columns, strict=True)
        ]  # fmt: skip

    @functools.cached_property
    def projection(self) -> VsProjection:
        return native_projection(self.native_parts(), self.out_features)


def store_as(weights: dict[str, torch.Tensor | QuantWeight], dtype: str) -> dict[str, torch.Tensor | QuantWeight]:
    """The checkpoint's float weight matrices in the storage `--weights-dtype` asks for: "auto"
    keeps them as stored; float16/bfloat16 round them to 16 bits (held in float32, so the widening
    kernel takes them); q8_0 quantizes them to Q8_0 blocks. A documented change of model, for
    float32 checkpoints that would otherwise miss the kernel step. Norms, biases and quantized
    weights are left alone."""
    if dtype == "auto":
        return weights
    converted: dict[str, torch.Tensor | QuantWeight] = {}
    for name, weight in weights.items():
        if isinstance(weight, QuantWeight) or weight.dim() != 2:
            converted[name] = weight
        elif dtype == "q8_0":
            converted[name] = (
                QuantWeight.quantize(weight, GGMLQuantizationType.Q8_0) if weight.shape[1] % 32 == 0 else weight
            )
        else:
            converted[name] = weight.to({"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]).float()
    return converted
