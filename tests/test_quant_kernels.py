"""The GGUF block-quantized kernels (csrc/quant_linear.c): dequantization bit-identical to the gguf
package's numpy, projections accurate against float64, and each output's bits independent of the
rows that share its call and of the threads. Every test runs at each vector width this CPU has
(8 lanes: AVX2; 16: AVX-512); the two widths round differently, each in one fixed way."""

from __future__ import annotations

import numpy as np
import pytest

from verispec.models.kernels import kernel_library

gguf = pytest.importorskip("gguf")
quants = pytest.importorskip("gguf.quants")

LIBRARY = kernel_library()
if LIBRARY is None:
    pytest.skip("no C compiler or no AVX2/FMA/F16C here", allow_module_level=True)

T = gguf.GGMLQuantizationType
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS]
# gguf's numpy quantizes these; the others are random bytes
QUANTIZABLE = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
# Byte offsets of each block's float16 fields (d, and dmin or m).
HALF_FIELDS = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.IQ4_NL: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,),
}  # fmt: skip


def _best_lanes() -> int:
    LIBRARY.quant_set_lanes(0)
    return LIBRARY.quant_set_lanes(-1)


WIDTHS = [8] if _best_lanes() == 8 else [8, 16]


@pytest.fixture(params=WIDTHS, ids=lambda lanes: f"{lanes}lanes", autouse=True)
def lanes(request):
    assert LIBRARY.quant_set_lanes(request.param) == request.param
    yield request.param
    LIBRARY.quant_set_lanes(0)


def random_halves(rng: np.random.Generator, shape: tuple[int, ...], wild: bool) -> np.ndarray:
    """float16 values as bytes (..., 2): any finite bit pattern (subnormals, zeros, +-65504) if wild,
    else of the scale of real checkpoints' block scales."""
    if wild:
        bits = rng.integers(0, 1 << 16, shape, dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # inf/NaN exponent -> a finite one
        return bits.view(np.uint8).reshape(*shape, 2)
    return (rng.standard_normal(shape) * 0.01).astype(np.float16).view(np.uint8).reshape(*shape, 2)


def random_weight(qtype, rows: int, K: int, seed: int = 0, wild: bool = False) -> np.ndarray:
    """(rows, bytes per row) uint8 in GGUF layout: every byte random but the float16 fields finite."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, K // block, size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        blocks[..., offset : offset + 2] = random_halves(rng, (rows, K // block), wild)
    return blocks.reshape(rows, -1)


def quantized_weight(qtype, rows: int, K: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return quants.quantize(rng.standard_normal((rows, K)).astype(np.float32), qtype)


def weights(qtype, rows: int, K: int, seed: int = 0):
    yield random_weight(qtype, rows, K, seed)
    yield random_weight(qtype, rows, K, seed + 1, wild=True)
    if qtype in QUANTIZABLE:
        yield quantized_weight(qtype, rows, K, seed)


def width(qtype) -> int:
    return 576 if gguf.GGML_QUANT_SIZES[qtype][0] == 32 else 512  # 576: a short last chunk of k


def dequantize(qtype, w: np.ndarray, K: int) -> np.ndarray:
    out = np.full((w.shape[0], K), np.nan, dtype=np.float32)
    assert LIBRARY.quant_dequantize(int(qtype), w.ctypes.data, w.shape[0], K, out.ctypes.data) == 0
    return out


def linear(qtype, x, w, N, bias=None, y=None, accumulate=False, threads=2, kernel=None) -> np.ndarray:
    """x @ w^T by `kernel` (quant_linear; quant_linear_q8 takes w as quant_q8_pack left it)."""
    M, K = x.shape
    if y is None:
        y = np.full((M, N), np.nan, dtype=np.float32)
    status = (kernel or LIBRARY.quant_linear)(
        int(qtype), x.ctypes.data, M, w.ctypes.data, N, K, None if bias is None else bias.ctypes.data,
        y.ctypes.data, y.shape[1], int(accumulate), threads,
    )  # fmt: skip
    assert status == 0
    return y


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_and_rows_match_gguf_bit_for_bit(qtype):
    K = width(qtype)
    for w in weights(qtype, 37, K):
        expected = quants.dequantize(w, qtype)
        assert same_bits(dequantize(qtype, w, K), expected)
        ids = np.array([3, 0, 36, 3, 17], dtype=np.int64)
        out = np.full((len(ids), K), np.nan, dtype=np.float32)
        assert (
            LIBRARY.quant_rows(int(qtype), w.ctypes.data, K, ids.ctypes.data, len(ids), out.ctypes.data) == 0
        )
        assert same_bits(out, expected[ids])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bytes_from_a_gguf_file(qtype, tmp_path):
    K, N = width(qtype), 19
    w = next(weights(qtype, N, K, seed=7))
    path = tmp_path / f"{qtype.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", w, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(str(path)).tensors
    assert tensor.tensor_type == qtype and tuple(tensor.shape) == (K, N)  # gguf lists dims innermost first
    stored = np.ascontiguousarray(tensor.data)
    assert stored.shape == w.shape and np.array_equal(stored, w)
    weight = dequantize(qtype, stored, K)
    assert same_bits(weight, quants.dequantize(stored, qtype))
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    assert np.allclose(
        linear(qtype, x, stored, N), x.astype(np.float64) @ weight.T.astype(np.float64), rtol=1e-5, atol=1e-5
    )


def error_bound(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """float32 FMA chains over K/lanes terms, a lane sum, bias and residual: within (K/8 + 8) ulps of
    sum |x w| (lanes >= 8)."""
    magnitude = np.abs(x).astype(np.float64) @ np.abs(weight).T.astype(np.float64)
    return (x.shape[1] / 8 + 8) * 2.0**-24 * magnitude + 1e-30


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_linear_against_float64(qtype):
    K, N = width(qtype), 37
    rng = np.random.default_rng(2)
    for w in weights(qtype, N, K):
        weight = dequantize(qtype, w, K).astype(np.float64)
        for M in (1, 3, 7):
            x = rng.standard_normal((M, K)).astype(np.float32)
            bias = rng.standard_normal(N).astype(np.float32)
            exact = x.astype(np.float64) @ weight.T
            bound = error_bound(x, weight)
            assert np.all(np.abs(linear(qtype, x, w, N) - exact) <= bound)
            assert np.all(
                np.abs(linear(qtype, x, w, N, bias) - (exact + bias)) <= bound + 1e-6 * np.abs(bias)
            )
            # accumulate into a wider output: rows ldy = N + 5 apart, the extra columns untouched
            residual = rng.standard_normal((M, N + 5)).astype(np.float32)
            y = linear(qtype, x, w, N, bias, y=residual.copy(), accumulate=True)
            assert same_bits(y[:, N:], residual[:, N:])
            expected = exact + bias + residual[:, :N]
            assert np.all(
                np.abs(y[:, :N] - expected) <= bound + 1e-6 * (np.abs(bias) + np.abs(residual[:, :N]))
            )
            y = linear(qtype, x, w, N, bias, y=residual.copy())
            assert same_bits(y[:, N:], residual[:, N:])
            assert same_bits(y[:, :N], linear(qtype, x, w, N, bias))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_each_output_independent_of_rows_and_threads(qtype):
    K, N = width(qtype), 37  # 37: a short last tile of outputs
    rng = np.random.default_rng(3)
    w = next(weights(qtype, N, K))
    x = rng.standard_normal((16, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    residual = rng.standard_normal((16, N)).astype(np.float32)
    reference = linear(qtype, x, w, N, bias, y=residual.copy(), accumulate=True, threads=1)
    for threads in (1, 2):
        for M in (1, 2, 3, 4, 5, 7, 9, 16):
            for start in range(0, 16, M):
                rows = slice(start, min(start + M, 16))
                y = linear(
                    qtype, x[rows], w, N, bias, y=residual[rows].copy(), accumulate=True, threads=threads
                )
                assert same_bits(y, reference[rows]), (threads, M, start)


def test_unsupported_type_or_width():
    K, N, IQ2 = 64, 3, int(T.IQ2_XXS)
    w = np.zeros((N, 2 * 22), dtype=np.uint8)
    x = np.ones((1, K), dtype=np.float32)
    y = np.full((1, N), 7.0, dtype=np.float32)
    ids = np.zeros(1, dtype=np.int64)
    assert (
        LIBRARY.quant_linear(IQ2, x.ctypes.data, 1, w.ctypes.data, N, K, None, y.ctypes.data, N, 0, 1) == -1
    )
    assert LIBRARY.quant_dequantize(IQ2, w.ctypes.data, N, K, y.ctypes.data) == -1
    assert LIBRARY.quant_rows(IQ2, w.ctypes.data, K, ids.ctypes.data, 1, y.ctypes.data) == -1
    # K not a whole number of blocks
    assert (
        LIBRARY.quant_linear(int(T.Q4_K), x.ctypes.data, 1, w.ctypes.data, N, K, None, y.ctypes.data, N, 0, 1)
        == -1
    )
    assert np.all(y == 7.0)
