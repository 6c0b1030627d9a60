"""The lean backend's linear layers: each form computes x @ W.T, and the 16-bit weight kernel
gives a row the same value whatever the width of the pass it is in."""

import logging

import pytest
import torch
import torch.nn.functional as F

from verispec.models import kernels
from verispec.models.kernels import Linear, kernel_library

WIDE = 70  # rows of a prompt chunk or a batched pass: wider than any single round

needs_kernel = pytest.mark.skipif(kernel_library() is None, reason="no C compiler or no AVX2/FMA/F16C here")


# bfloat16 test weights are scaled below float16's range, so that only bfloat16 holds them
# (bfloat16-rounded values of ordinary size fit float16 exactly, which the layer then prefers).
SCALE = {torch.float16: 1.0, torch.bfloat16: 2.0**-40, None: 1.0}


def weight(out_features: int, in_features: int, dtype: torch.dtype | None, seed: int = 0) -> torch.Tensor:
    """A float32 weight; rounded through `dtype` when given (a 16-bit checkpoint's values)."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * SCALE[dtype]
    return w if dtype is None else w.to(dtype).float()


@needs_kernel
@pytest.mark.parametrize("dtype, form", [(torch.float16, "widen-f16"), (torch.bfloat16, "widen-bf16")])
@pytest.mark.parametrize("in_features", [512, 1344, 37, 8, 3])  # multiples of 16 and of 8, and ragged tails
def test_widened_weights_compute_the_float32_product(dtype, form, in_features):
    """Within the float32 rounding bound of a dot product of this length, whatever order the
    kernel sums in: |error| <= gamma_n (|x| @ |w|.T + |b|), gamma_n = n u / (1 - n u), u = 2^-24."""
    w = weight(67, in_features, dtype)
    generator = torch.Generator().manual_seed(in_features)
    bias = torch.randn(67, generator=generator) * SCALE[dtype]
    n = in_features + 1  # the bias is one more term
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    for layer_bias in (None, bias):
        linear = Linear(w, layer_bias)
        assert linear.form == form and linear.weight.dtype == dtype  # half the bytes of float32
        for rows in (1, 2, 3, 4, 5, 9, 16, WIDE):
            x = torch.randn(rows, in_features, generator=generator)
            b = None if layer_bias is None else layer_bias.double()
            exact = F.linear(x.double(), w.double(), b)
            bound = gamma * (x.double().abs() @ w.double().abs().T + (0 if b is None else b.abs()))
            error = (linear(x).double() - exact).abs()
            assert (error <= bound).all(), f"{rows} rows: error {error.max():.3g} past the bound"


@needs_kernel
def test_a_row_is_the_same_bits_at_every_pass_width():
    w = weight(301, 520, torch.float16)
    linear = Linear(w)
    x = torch.randn(WIDE, 520)
    together = linear(x)
    for start in range(WIDE):
        for end in (start + 1, min(start + 3, WIDE), WIDE):
            assert torch.equal(linear(x[start:end]), together[start:end])


@pytest.mark.parametrize("shape, form", [((40, 24), "dense"), ((512, 520), "onednn")])
def test_weights_16_bits_cannot_hold_stay_float32(shape, form):
    """Prepacked for oneDNN where the matrix is large enough to repay oneDNN's per-call cost."""
    w = weight(*shape, None)  # arbitrary float32 values
    linear = Linear(w)
    expected = form if torch.backends.mkldnn.is_available() else "dense"
    assert linear.form == expected and linear.weight.dtype == torch.float32
    for rows in (1, 4, 40):
        x = torch.randn(rows, shape[1])
        torch.testing.assert_close(linear(x), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_kernel_off_keeps_float32_and_the_same_results():
    w = weight(40, 24, torch.float16)
    linear = Linear(w, kernel=False, prepack=False)
    assert linear.form == "dense"
    x = torch.randn(3, 24)
    torch.testing.assert_close(linear(x), F.linear(x, w))


def test_a_failed_build_falls_back_with_a_logged_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "INSTALLED_LIBRARY", tmp_path / "none.so")  # as if the install built none
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: it must build
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    kernel_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=kernels.__name__):
            assert kernel_library() is None
            linear = Linear(weight(16, 16, torch.float16))
        assert linear.form == "dense"
        assert "lean CPU kernel unavailable" in caplog.text
    finally:
        kernel_library.cache_clear()


@needs_kernel
def test_the_kernel_is_built_once_and_reused(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "INSTALLED_LIBRARY", tmp_path / "none.so")  # as if the install built none
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernel_library.cache_clear()
    try:
        assert kernel_library() is not None
        built = list((tmp_path / "verispec" / "kernels").glob("lean_cpu-*.so"))
        assert len(built) == 1 and not [p for p in built[0].parent.iterdir() if p.is_dir()]  # no scratch left
        stamp = built[0].stat().st_mtime_ns
        kernel_library.cache_clear()
        assert kernel_library() is not None and built[0].stat().st_mtime_ns == stamp
    finally:
        kernel_library.cache_clear()


@needs_kernel
def test_lean_kernel_step_gives_a_position_the_same_logits_at_any_pass_width(tmp_path):
    """Verifier-only decoding scores one position per pass, speculative decoding k+1: on the
    kernel step both give the same bits, so greedy speculative output cannot drift by rounding."""
    from tests.conftest import llama, random_prompts, save
    from verispec.models import load_model

    model = llama(64, layers=2, seed=60)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())  # a float16 checkpoint
    lm = load_model(save(model, tmp_path / "llama-f16", 64), torch.device("cpu"), torch.float32, backend="lean")
    assert lm.kernel_step
    prompt = random_prompts(1, 64, seed=61, min_len=30, max_len=30)[0]
    continuation = [5, 9, 2, 33, 17, 8, 41]
    one_pass, step_by_step = lm.session(), lm.session()
    one_pass.extend(prompt)
    step_by_step.extend(prompt)
    together = one_pass.extend(continuation)
    alone = torch.cat([step_by_step.extend([token]) for token in continuation])
    assert torch.equal(together, alone)
    one_pass.rollback(len(prompt) + 2)  # reject the rest, then verify a different continuation
    step_by_step.rollback(len(prompt) + 2)
    assert torch.equal(one_pass.extend([7, 7, 1]), torch.cat([step_by_step.extend([t]) for t in (7, 7, 1)]))


@pytest.mark.skipif(kernel_library() is None, reason="no compiled kernel here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_projections_bits_do_not_depend_on_its_thread_count(dtype):
    """Wide passes widen each panel pair once into a scratch of each thread's own (16 rows and
    more): whichever threads take which panels, every output is the same bits."""
    library = kernel_library()
    kernel = library.widen_linear_f16 if dtype == torch.float16 else library.widen_linear_bf16
    torch.manual_seed(5)
    weight, bias = torch.randn(333, 200).to(dtype), torch.randn(333)
    packed = kernels._panels(weight)
    for rows in (1, 5, 15, 16, 17, 40, 128):
        x = torch.randn(rows, 200)
        outputs = []
        for threads in (1, 2, 3):
            y = torch.empty(rows, 333)
            kernel(x.data_ptr(), rows, packed.data_ptr(), 333, 200, bias.data_ptr(), y.data_ptr(), 333, 0, threads)
            outputs.append(y)
        assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2]), rows


@pytest.mark.skipif(kernel_library() is None, reason="no compiled kernel here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_avx512_path_gives_the_avx2_paths_bits(dtype):
    """Each output is one FMA chain in a lane of its own on both paths (32-wide panels with
    AVX-512, 24-wide with AVX2): the same bits, at every width, bias and residual included."""
    library = kernel_library()
    if library.widen_force_panel(0) != 32:
        pytest.skip("no AVX-512 here")
    kernel = library.widen_linear_f16 if dtype == torch.float16 else library.widen_linear_bf16
    torch.manual_seed(3)
    try:
        for out_features, in_features in ((200, 130), (1536, 64), (33, 40)):
            weight, bias = torch.randn(out_features, in_features).to(dtype), torch.randn(out_features)
            for rows in (1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 24, 25, 37):  # AVX-512 tiles: up to 12 rows, evened
                x = torch.randn(rows, in_features)
                outputs = []
                for width in (24, 32):
                    assert library.widen_force_panel(width) == width
                    packed = kernels._panels(weight)
                    y = torch.ones(rows, out_features + 3)
                    kernel(x.data_ptr(), rows, packed.data_ptr(), out_features, in_features, bias.data_ptr(),
                           y.data_ptr(), out_features + 3, 1, 2)  # fmt: skip
                    outputs.append(y)
                assert torch.equal(*outputs), (out_features, in_features, rows)
    finally:
        library.widen_force_panel(0)
