"""8-bit activations on the GGUF block-quantized weights (csrc/quant_int8.c, `--activations q8`):
each row of x quantized per block of 32 as llama.cpp's Q8_0 does, integer dot products with the
weights' small integers, float32 only for the scales. Checked against float64 on the same
quantized activations, and each output's bits independent of the rows that share its call, of the
threads and of the instruction set (AVX-512 VNNI and AVX2 give the same integers and the same
float operations)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_quant_kernels import LIBRARY, TYPES, T, dequantize, linear, same_bits, weights, width

ISAS = sorted({LIBRARY.quant_q8_isa(0), 2}, reverse=True)


@pytest.fixture(autouse=True)
def best_isa():
    LIBRARY.quant_q8_isa(0)
    yield
    LIBRARY.quant_q8_isa(0)


def quantized_activations(x: np.ndarray) -> np.ndarray:
    """x as the kernel quantizes it, back in float64: per block of 32, d = max|x| / 127 and
    q = x * (1 / d) rounded to nearest even, all in float32."""
    M, K = x.shape
    blocks = x.reshape(M, K // 32, 32).astype(np.float32)
    d = np.abs(blocks).max(-1) / np.float32(127)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.rint(blocks * inverse[..., None])
    assert np.abs(q).max() <= 127
    return (q.astype(np.float64) * d[..., None]).reshape(M, K)


def packed(qtype, w: np.ndarray, N: int, K: int) -> np.ndarray:
    """w's rows interleaved 8 at a time, as QuantLinear packs them for 8-bit activations."""
    out = np.full(LIBRARY.quant_q8_packed_bytes(int(qtype), N, K), 0xAB, dtype=np.uint8)
    assert out.size > 0 and LIBRARY.quant_q8_pack(int(qtype), w.ctypes.data, N, K, out.ctypes.data) == 0
    return out


def linear_q8(qtype, x, w, N, bias=None, y=None, accumulate=False, threads=2) -> np.ndarray:
    """q8(x) @ w^T for w already packed."""
    return linear(qtype, x, w, N, bias, y, accumulate, threads, kernel=LIBRARY.quant_linear_q8)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_q8_linear_against_float64(qtype):
    """The integer path computes q8(x) @ W exactly up to float32 rounding of the per-block scales
    and of the lane sums: within (K/8 + 8) ulps of sum |q8(x) w|, like the float path's bound."""
    K, N = width(qtype), 37
    rng = np.random.default_rng(4)
    for w in weights(qtype, N, K):
        weight = dequantize(qtype, w, K).astype(np.float64)
        w = packed(qtype, w, N, K)
        for M in (1, 3, 7):
            x = rng.standard_normal((M, K)).astype(np.float32)
            bias = rng.standard_normal(N).astype(np.float32)
            xq = quantized_activations(x)
            exact = xq @ weight.T
            bound = (K / 8 + 8) * 2.0**-24 * (np.abs(xq) @ np.abs(weight).T) + 1e-30
            assert np.all(np.abs(linear_q8(qtype, x, w, N) - exact) <= bound)
            residual = rng.standard_normal((M, N + 5)).astype(np.float32)
            y = linear_q8(qtype, x, w, N, bias, y=residual.copy(), accumulate=True)
            assert same_bits(y[:, N:], residual[:, N:])
            expected = exact + bias + residual[:, :N]
            assert np.all(np.abs(y[:, :N] - expected) <= bound + 1e-6 * (np.abs(bias) + np.abs(residual[:, :N])))


def test_q8_activations_change_the_result_by_their_rounding_only():
    """Against float activations on the same weights: close (8-bit activations), not equal."""
    K, N = 576, 64
    w = next(weights(T.Q4_1, N, K))
    x = np.random.default_rng(5).standard_normal((4, K)).astype(np.float32)
    weight = dequantize(T.Q4_1, w, K).astype(np.float64)
    exact = x.astype(np.float64) @ weight.T
    y = linear_q8(T.Q4_1, x, packed(T.Q4_1, w, N, K), N)
    scale = np.abs(x).astype(np.float64) @ np.abs(weight).T
    assert not np.array_equal(y, exact.astype(np.float32))
    assert np.all(np.abs(y - exact) <= 0.01 * scale)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_each_q8_output_independent_of_rows_threads_and_isa(qtype):
    K, N = width(qtype), 37
    rng = np.random.default_rng(6)
    w = packed(qtype, next(weights(qtype, N, K)), N, K)
    x = rng.standard_normal((16, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    residual = rng.standard_normal((16, N)).astype(np.float32)
    reference = linear_q8(qtype, x, w, N, bias, y=residual.copy(), accumulate=True, threads=1)
    for isa in ISAS:
        assert LIBRARY.quant_q8_isa(isa) == isa
        for threads in (1, 2):
            for M in (1, 2, 3, 4, 5, 7, 9, 16):
                for start in range(0, 16, M):
                    rows = slice(start, min(start + M, 16))
                    y = linear_q8(qtype, x[rows], w, N, bias, y=residual[rows].copy(), accumulate=True, threads=threads)
                    assert same_bits(y, reference[rows]), (isa, threads, M, start)


def test_q8_refuses_a_type_it_lacks_and_writes_nothing():
    K, N = 64, 3
    w = np.zeros((N, 2 * 22), dtype=np.uint8)
    x = np.ones((1, K), dtype=np.float32)
    y = np.full((1, N), 7.0, dtype=np.float32)
    args = (x.ctypes.data, 1, w.ctypes.data, N, K, None, y.ctypes.data, N, 0, 1)
    assert LIBRARY.quant_linear_q8(int(T.IQ2_XXS), *args) == -1
    assert LIBRARY.quant_linear_q8(int(T.Q4_K), *args) == -1  # K = 64 is not a whole block of 256
    assert np.all(y == 7.0)
    assert LIBRARY.quant_q8_packed_bytes(int(T.IQ2_XXS), N, K) == 0
    assert LIBRARY.quant_q8_packed_bytes(int(T.Q4_K), N, K) == 0
    assert LIBRARY.quant_q8_pack(int(T.IQ2_XXS), w.ctypes.data, N, K, y.ctypes.data) == -1
