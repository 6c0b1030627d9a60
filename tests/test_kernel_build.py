"""The lean CPU kernels built at install time (setup.py): a wheel carries the library and its
sources, an editable checkout runs the library `pip install -e .` built, a library built from
other sources is not used and the fallback says so (log, path report, /readyz, the gauge), and
the kernels' out-of-memory paths (built with -DVS_NO_SCRATCH) give the same bits or a clear error.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import llama, save
from verispec.config import ServerSettings
from verispec.models import kernels, load_model
from verispec.models.kernels import kernel_build, kernel_library
from verispec.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[1]
COMPILER = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
CANNOT_BUILD = kernels._machine_problem() or (None if COMPILER else "no C compiler")
needs_build = pytest.mark.skipif(CANNOT_BUILD is not None, reason=f"this machine cannot build the kernels: {CANNOT_BUILD}")


@pytest.fixture
def fresh_load():
    """kernel_library() loads again in the test, and again after it, with the test's settings gone."""
    kernel_library.cache_clear()
    yield
    kernel_library.cache_clear()


def test_a_built_wheel_holds_the_demo_pair_the_compiled_library_and_every_source(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("verispec-*.whl")
    assert not wheel.name.endswith("-any.whl"), wheel.name  # a platform wheel: it holds a binary
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "verispec" / "models" / "csrc").glob("*.c"))
    assert len(sources) >= 4 and all(source in names for source in sources)
    assert {p.name for p in kernels.KERNEL_SOURCES} == {Path(s).name for s in sources}  # every source is built
    headers = [p.relative_to(ROOT).as_posix() for p in kernels.KERNEL_HEADERS]  # what the sources include
    assert headers and all(header in names for header in headers)
    for folder in ("verispec-demo-code", "verispec-demo-code-draft"):  # the built-in demo pair
        for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert f"verispec/demo/{folder}/{file}" in names
    assert {"verispec/demo/README.md", "verispec/demo/prompts.jsonl"} <= names
    if CANNOT_BUILD is not None:
        return
    assert {"verispec/models/_kernels.so", "verispec/models/_kernels.sha256"} <= names
    # setup.py's digest is kernels.py's, so the installed library is taken as current
    assert archive.read("verispec/models/_kernels.sha256").decode().strip() == kernels.sources_digest()
    unpacked = tmp_path / "site"
    archive.extractall(unpacked)
    probe = "import json; from verispec.models import kernels as k; print(json.dumps([k.kernel_build().source, k.__file__]))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(unpacked)},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    source, module = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(module).is_relative_to(unpacked) and source == "installed", done.stderr


@needs_build
def test_this_checkout_runs_the_library_built_by_pip_install_e(fresh_load, caplog):
    assert kernels.INSTALLED_LIBRARY.is_file(), "no verispec/models/_kernels.so: run `python -m pip install -e .`"
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        build = kernel_build()
    assert build == ("installed", str(kernels.INSTALLED_LIBRARY), ""), build
    assert "the library built at install" in caplog.text


@pytest.fixture
def stale(monkeypatch, tmp_path):
    """An installed library whose recorded digest is not the sources' (they changed since)."""
    library, digest = tmp_path / "_kernels.so", tmp_path / "_kernels.sha256"
    if kernels.INSTALLED_LIBRARY.is_file():
        shutil.copyfile(kernels.INSTALLED_LIBRARY, library)
    else:
        library.write_bytes(b"not loaded: the digest is checked first")
    digest.write_text("0" * 64 + "\n")
    monkeypatch.setattr(kernels, "INSTALLED_LIBRARY", library)
    monkeypatch.setattr(kernels, "INSTALLED_DIGEST", digest)
    return library


@needs_build
def test_a_stale_library_is_not_used_and_the_first_use_build_is(stale, fresh_load, caplog):
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        build = kernel_build()
    assert build.source == "compiled" and "stale" in build.reason, build
    assert Path(build.path) != stale and kernel_library() is not None
    assert "compiled on first use" in caplog.text


def test_a_library_without_its_digest_is_not_used(stale, fresh_load, monkeypatch, tmp_path):
    kernels.INSTALLED_DIGEST.unlink()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    build = kernel_build()
    assert build.source == "unavailable" and kernel_library() is None
    assert CANNOT_BUILD is not None or "_kernels.sha256" in build.reason, build


def test_a_stale_library_with_no_compiler_reports_the_slow_path(stale, fresh_load, monkeypatch, tmp_path, caplog):
    """The fallback is said in the log (a warning), the path report (/readyz) and the gauge."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing cached: it must compile
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    model = llama(64, 1, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # 16-bit exact: the kernel step where the kernels are had
    path = save(model, tmp_path / "model", 64)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        lm = load_model(path, torch.device("cpu"), torch.float32, backend="lean")
    report = lm.path_report()
    assert report["build"] == "unavailable" and not report["kernel_step"] and report["avoidable"], report
    assert "lean CPU kernel unavailable" in caplog.text
    if CANNOT_BUILD is None:
        assert "stale" in report["why"] and "stale" in caplog.text, report
    assert _build_gauges(report) == {"unavailable": 1.0}


@needs_build
def test_the_path_report_and_gauge_say_installed(fresh_load, tmp_path):
    assert kernels.INSTALLED_LIBRARY.is_file(), "no verispec/models/_kernels.so: run `python -m pip install -e .`"
    model = llama(64, 1, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    path = save(model, tmp_path / "model", 64)
    report = load_model(path, torch.device("cpu"), torch.float32, backend="lean").path_report()
    assert report["kernel_step"] and report["build"] == "installed", report
    assert _build_gauges(report) == {"installed": 1.0}
    plain = load_model(path, torch.device("cpu"), torch.float32, backend="lean", cpu_kernel=False)
    assert plain.path_report()["build"] is None  # --no-cpu-kernel: no build to speak of, and no gauge
    assert _build_gauges(plain.path_report()) == {}


def _build_gauges(report: dict) -> dict[str, float]:
    metrics = ServerMetrics("m", ServerSettings(), max_depth=4)
    metrics.observe_path("target", report)
    return {
        sample.labels["source"]: sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "verispec:kernel_build_info" and sample.labels["role"] == "target"
    }


# ---- out of memory in the C code: every scratch allocation fails (-DVS_NO_SCRATCH) ----


@pytest.fixture(scope="module")
def no_scratch(tmp_path_factory):
    if CANNOT_BUILD is not None or kernel_library() is None:
        pytest.skip(f"this machine cannot build the kernels: {CANNOT_BUILD or kernel_build().reason}")
    built = tmp_path_factory.mktemp("no-scratch") / "no_scratch.so"
    sources = [p for p in kernels.KERNEL_SOURCES if p.name in ("layer_ops.c", "quant_linear.c")]
    subprocess.run(
        [COMPILER, *kernels.KERNEL_FLAGS, "-DVS_NO_SCRATCH", *map(str, sources), "-lm", "-o", str(built)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    library = ctypes.CDLL(str(built))
    for name in ("attention", "quant_linear", "quant_set_lanes"):
        getattr(library, name).argtypes = getattr(kernel_library(), name).argtypes
        getattr(library, name).restype = getattr(kernel_library(), name).restype
    return library


@pytest.mark.parametrize("hd", [16, 12])
def test_attention_without_scratch_gives_the_same_bits(no_scratch, hd):
    torch.manual_seed(hd)
    T, H, Hkv, P, start = 5, 4, 2, 64, 21
    qkv = torch.randn(T, (H + 2 * Hkv) * hd)
    keys, values = torch.randn(Hkv, P, hd), torch.randn(Hkv, P, hd)
    outputs = []
    for library in (kernel_library(), no_scratch):
        for threads in (1, 2):
            out = torch.full((T, H * hd), float("nan"))
            library.attention(
                qkv.data_ptr(), T, H, Hkv, hd, keys.data_ptr(), values.data_ptr(), P, start, hd**-0.5, out.data_ptr(),
                threads,
            )  # fmt: skip
            outputs.append(out)
    assert not outputs[0].isnan().any()
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])


def test_a_quantized_pass_out_of_memory_is_a_clear_error(no_scratch):
    """-2 from quant_linear (a pass of more rows than it decodes in registers needs scratch), and
    the exception kernels.kernel_error makes of it; a decode pass needs none."""
    N, K, Q8_0 = 4, 64, 8
    rng = np.random.default_rng(0)
    blocks = np.zeros((N, K // 32), dtype=[("d", "<f2"), ("q", "i1", 32)])
    blocks["d"], blocks["q"] = 0.01, rng.integers(-127, 128, size=(N, K // 32, 32))
    weight = torch.from_numpy(blocks.view(np.uint8).reshape(-1).copy())
    for rows, expected in ((1, 0), (16, -2)):
        x, y = torch.randn(rows, K), torch.empty(rows, N)
        done = no_scratch.quant_linear(Q8_0, x.data_ptr(), rows, weight.data_ptr(), N, K, None, y.data_ptr(), N, 0, 2)
        assert done == expected, rows
    error = kernels.kernel_error(-2, "quant_linear")
    assert isinstance(error, MemoryError) and "out of memory" in str(error)
    assert isinstance(kernels.kernel_error(-1, "lean_layers"), RuntimeError)
