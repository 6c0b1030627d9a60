"""Linear layers of the lean backend, in the form that is fastest on the device.

A decode or verify pass multiplies a few rows of activations by every weight matrix, so on a CPU
its cost is the time to stream the weights from memory. Three forms, chosen per matrix (the
lean backend's kernel step, `LeanLM._kernel_step`, also runs the rest of a layer on this
module's compiled library, `csrc/layer_ops.c`, and all the layers of a pass in one call,
`csrc/lean_step.c`, over the projections' `Linear.projection` descriptors):

- `widen-f16` / `widen-bf16` (CPU, float32 compute): a weight whose float32 values are all
  exactly representable in float16 (checkpoints stored in float16, like the reference pair) or
  bfloat16 is kept in 16 bits and widened to float32 in registers by a small compiled kernel
  (`csrc/widen_linear.c`, AVX2/FMA/F16C). The arithmetic is float32 on the same values; a step
  streams half the bytes. Each output is accumulated in an order that does not depend on the
  number of rows in the pass, so a position's logits are the same decoded alone, verified among
  k+1 positions or in a batched pass of any width, and a prompt's keys and values the same
  however it is chunked. A float32 GEMM would be faster at a few hundred rows (prefill), but its
  sums run in an order that depends on the shape, which would break that.
- `bf16-dot` (CPU, `--activations bf16`, a change of model): the weight rounded to bfloat16 and
  each row of activations too, the products summed in float32 on AMX tiles where the CPU has them
  (`csrc/bf16_dot.c`), else on the widened kernel; the same bits at any number of rows, like the
  widened forms. A wide pass (a prompt, a batch of verify rows) runs several times faster on AMX.
- `onednn` (CPU, float32 weights that 16 bits cannot hold exactly, from PREPACK_MIN_ELEMENTS
  up): the weight prepacked once for oneDNN, whose small-M GEMM costs about the same for 1 to 8
  rows (plain MKL `x @ w` costs more at 4 rows than at 1).
- `dense` (CUDA, reduced-precision compute, torch.compile, small matrices, or where neither of
  the above is available): `x @ w` on the weight transposed once to (in, out).

Where the compiled library comes from (`kernel_build()` says which, and why not an earlier one):
1. `installed`: built at install time by `setup.py` (`pip install .`, `pip install -e .`, a
   wheel) into this package as `_kernels.so`, with the digest of the sources it was built from
   beside it (`_kernels.sha256`: the C files and `csrc/verispec_kernels.h`, the header that
   declares their boundary once); used only if that digest is the installed sources' (an edited
   source in an editable checkout makes it stale), the CPU has AVX2, FMA and F16C, and its
   structures and codes are this module's binding of them (`layout_differences`).
2. `compiled`: else compiled once per machine on first use with the system C compiler (`$CC`,
   else `cc`) into `$XDG_CACHE_HOME/verispec/kernels` (default `~/.cache/verispec/kernels`).
3. `unavailable`: where that fails too (no compiler, not x86-64 with AVX2) the torch forms are
   used and the reason is logged once, as a warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

# setup.py reads these three literals (it cannot import this module: it needs torch) to build the
# same library at install time. The header declares the library's boundary once: every source
# includes it, this module's ctypes binding mirrors it (tests/test_kernel_abi.py checks the two
# against the library's vs_layout), and a change to it rebuilds the library (sources_digest).
KERNEL_SOURCE_NAMES = (
    "widen_linear.c", "layer_ops.c", "quant_linear.c", "quant_int8.c", "bf16_dot.c", "lean_step.c", "layout.c",
)  # fmt: skip
KERNEL_HEADER_NAMES = ("verispec_kernels.h", "quant_blocks.h", "team.h")
KERNEL_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
KERNEL_SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in KERNEL_SOURCE_NAMES)
KERNEL_HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in KERNEL_HEADER_NAMES)
# The library built at install (setup.py) and the digest of what it was built from (sources_digest).
INSTALLED_LIBRARY = Path(__file__).with_name("_kernels.so")
INSTALLED_DIGEST = Path(__file__).with_name("_kernels.sha256")
# A oneDNN call has a fixed cost before any arithmetic, about ten times F.linear's: prepacking
# pays only for matrices whose streaming takes longer than that, from about 1 MB of float32.
PREPACK_MIN_ELEMENTS = 1 << 18
_NEEDED_CPU_FLAGS = {"avx2", "fma", "f16c"}


class Linear:
    """y = x @ weight.T (+ bias) for a checkpoint weight (out, in), in the fastest form here."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        kernel: bool = True,
        prepack: bool = True,
        activations: str = "float",
    ):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.activations = activations
        narrow = _exact_16bit(weight, activations) if kernel and weight.device.type == "cpu" else None
        library = kernel_library() if narrow is not None else None
        if activations == "bf16":
            if library is None:  # _exact_16bit gives only bfloat16 here
                raise ValueError("bf16 activations need a bfloat16 weight and the compiled CPU kernel")
            self.form = "bf16-dot"
            self.weight = _bf16_packed(narrow, library)
            self._kernel = library.bf16_linear
        elif library is not None:
            self.form = "widen-f16" if narrow.dtype == torch.float16 else "widen-bf16"
            self.weight = _panels(narrow)
            self._kernel = library.widen_linear_f16 if narrow.dtype == torch.float16 else library.widen_linear_bf16
        elif (
            prepack
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and weight.numel() >= PREPACK_MIN_ELEMENTS
            and torch.backends.mkldnn.is_available()
        ):
            self.form = "onednn"
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        else:
            self.form = "dense"
            # (in, out): for the few rows of a decode or verify pass, `x @ w` on this layout
            # streams the weight faster on a CPU than F.linear on (out, in).
            self.weight = weight.t().contiguous()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @property
    def on_kernel(self) -> bool:
        """Whether this projection runs on the compiled kernel (the kernel step needs every one to)."""
        return self.form.startswith("widen") or self.form == "bf16-dot"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "onednn":
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        elif self.form == "dense":
            y = x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)
        else:
            x = x.contiguous()
            y = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
            self.into(x, y)
        return y

    def into(self, x: torch.Tensor, y: torch.Tensor, accumulate: bool = False) -> None:
        """Kernel forms only: y = x @ W.T + bias, or y += it; x and y contiguous float32. Every
        row is computed alone, at any number of rows: a prompt's keys and values are the same bits
        however it is chunked, and a position's logits the same whatever shares its pass."""
        failed = self._kernel(
            x.data_ptr(), x.shape[0], self.weight.data_ptr(), self.out_features, self.in_features,
            None if self.bias is None else self.bias.data_ptr(), y.data_ptr(), self.out_features, accumulate,
            torch.get_num_threads(),
        )  # fmt: skip
        if failed:
            raise kernel_error(failed, f"the {self.form} projection")

    def native_parts(self) -> list[Part]:
        """This projection's stored matrices as the one-call step (`csrc/lean_step.c`) runs them:
        one part for a widened form. Empty: no form it runs."""
        form = NATIVE_FORMS.get(self.form)
        if form is None:
            return []
        return [Part(form, self.weight, self.out_features, self.in_features, self.bias, 0)]

    @functools.cached_property
    def projection(self) -> VsProjection | None:
        """`native_parts()` as lean_step.c's vs_projection, built once; None if empty."""
        parts = self.native_parts()
        return native_projection(parts, self.out_features) if parts else None


# Storage forms that csrc/lean_step.c runs, by vs_part.form code (csrc/verispec_kernels.h:
# VS_WIDEN_F16, VS_WIDEN_BF16, VS_BF16_DOT); a GGUF-quantized part is VS_QUANTIZED + its GGML type id.
NATIVE_FORMS = {"widen-f16": 1, "widen-bf16": 2, "bf16-dot": 3}
QUANTIZED_FORM = 100
QUANTIZED_Q8_FORM = 200  # the same weights times activations quantized to 8 bits (csrc/quant_int8.c)


class Part(NamedTuple):
    """One stored matrix of a projection: columns [column, column + out_features) of its output."""

    form: int  # a NATIVE_FORMS code, or QUANTIZED_FORM + GGML type id
    weight: torch.Tensor  # in the layout that form's kernel streams
    out_features: int
    in_features: int
    bias: torch.Tensor | None  # float32, from this part's first column
    column: int


def native_projection(parts: list[Part], out_features: int) -> VsProjection:
    """A projection of `out_features` output columns made of `parts` (each writing its columns;
    a fused projection whose pieces are stored in different forms has one part per piece), as
    lean_step.c takes it. It points into the parts' tensors and keeps them alive: build it once
    the weights are final, and keep it (`Linear.projection`)."""
    array = (VsPart * len(parts))(
        *(VsPart(p.form, p.weight.data_ptr(), p.out_features, p.in_features, _address_of(p.bias), p.column)
          for p in parts)
    )  # fmt: skip
    projection = VsProjection(len(parts), array, out_features)
    projection.keep = (array, parts)
    return projection


def _address_of(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


# The structures of csrc/verispec_kernels.h, field for field (C_STRUCTURES; tests/test_kernel_abi.py
# checks every size and offset against the library's vs_layout).
_i64, _f32, _address = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class VsPart(ctypes.Structure):
    _fields_ = [
        ("form", _i64), ("weight", _address), ("out_features", _i64), ("in_features", _i64), ("bias", _address),
        ("column", _i64),
    ]  # fmt: skip


class VsProjection(ctypes.Structure):
    _fields_ = [("parts", _i64), ("part", ctypes.POINTER(VsPart)), ("out_features", _i64)]


class VsLayer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", _address), ("qkv", VsProjection), ("o", VsProjection), ("mlp_norm", _address),
        ("gate_up", VsProjection), ("down", VsProjection),
    ]  # fmt: skip


class VsModel(ctypes.Structure):
    _fields_ = [
        ("layers", _i64), ("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64), ("ffn", _i64),
        ("eps", _f32), ("scale", _f32), ("cos", _address), ("sin", _address), ("layer", ctypes.POINTER(VsLayer)),
    ]  # fmt: skip


ATTENTION_CONTIGUOUS, ATTENTION_PAGED = 0, 1  # VsAttention.mode: VS_CONTIGUOUS, VS_PAGED
# Query rows per contiguous attention call of the kernel step, in C (VS_ATTENTION_ROWS) and in the
# per-call step (lean.py): its scratch is rows x context.
ATTENTION_ROWS = 256


class VsAttention(ctypes.Structure):
    _fields_ = [
        ("mode", _i64), ("keys", ctypes.POINTER(_address)), ("values", ctypes.POINTER(_address)),
        ("capacity", _i64), ("start", _i64),
        ("positions", _address), ("slots", _address), ("block_size", _i64), ("segments", _i64),
        ("seg_row", _address), ("seg_len", _address), ("seg_pos", _address), ("tables", _address),
        ("table_start", _address), ("parents", _address),
    ]  # fmt: skip


class VsScratch(ctypes.Structure):
    _fields_ = [("h", _address), ("qkv", _address), ("attn", _address), ("gate_up", _address), ("act", _address)]  # fmt: skip


# Each structure of csrc/verispec_kernels.h and its binding here.
C_STRUCTURES: dict[str, type[ctypes.Structure]] = {
    "vs_part": VsPart, "vs_projection": VsProjection, "vs_layer": VsLayer, "vs_model": VsModel,
    "vs_attention": VsAttention, "vs_scratch": VsScratch,
}  # fmt: skip


def address_array(tensors: list[torch.Tensor]) -> ctypes.Array:
    """The tensors' addresses as a C array: VsAttention's per-layer key and value caches (a
    VsAttention given it keeps it alive; the tensors must outlive both)."""
    return (_address * len(tensors))(*(t.data_ptr() for t in tensors))


PANEL = 24  # output columns per panel of a packed 16-bit weight (VS_PANEL in csrc/verispec_kernels.h)
PANEL_AVX512 = 32  # the same on the AVX-512 path (VS_PANEL_AVX512); widen_panel() says which runs


def _panels(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) -> (panels, in, width): the layout the widening kernel streams, zero-padded; the
    panel width is its path's on this CPU (`widen_panel()`: 32 with AVX-512, else PANEL)."""
    library = kernel_library()
    width = library.widen_panel() if library is not None else PANEL
    out_features, in_features = weight.shape
    padded = torch.zeros((-(-out_features // width) * width, in_features), dtype=weight.dtype)
    padded[:out_features] = weight
    return padded.view(-1, width, in_features).transpose(1, 2).contiguous()


def _bf16_packed(weight: torch.Tensor, library: ctypes.CDLL) -> torch.Tensor:
    """A bfloat16 weight (out, in) as csrc/bf16_dot.c streams it on this CPU: in AMX tiles' blocks
    where it runs on them (bf16_pack), else in the widened kernel's panels."""
    if not library.bf16_dot_amx(0):
        return _panels(weight)
    out_features, in_features = weight.shape
    packed = torch.empty(library.bf16_packed_bytes(out_features, in_features) // 2, dtype=torch.int16)
    library.bf16_pack(weight.contiguous().view(torch.int16).data_ptr(), out_features, in_features, packed.data_ptr())
    return packed


def _exact_16bit(weight: torch.Tensor, activations: str = "float") -> torch.Tensor | None:
    """The weight in float16 or bfloat16 (only bfloat16 for bfloat16 activations) if that holds
    every value exactly, else None."""
    if weight.dtype != torch.float32:
        return None
    for dtype in (torch.bfloat16,) if activations == "bf16" else (torch.float16, torch.bfloat16):
        narrow = weight.to(dtype)
        if torch.equal(narrow.float(), weight):
            return narrow
    return None


class KernelBuild(NamedTuple):
    """Which compiled library the lean CPU kernels run on: `source` is "installed" (built at
    install time), "compiled" (on first use, into the cache) or "unavailable" (the torch forms);
    `reason` says why not the earlier ones ("" for installed)."""

    source: str
    path: str | None  # the shared library loaded; None if unavailable
    reason: str


_last_build = KernelBuild("unavailable", None, "not loaded yet")


def kernel_build() -> KernelBuild:
    """Where `kernel_library()` came from (loading it if it is not yet loaded)."""
    kernel_library()
    return _last_build


@functools.cache
def kernel_library() -> ctypes.CDLL | None:
    """The compiled kernels: the library built at install, else built on first use; None
    (logged once, with the reason) where neither can be had. `kernel_build()` says which."""
    global _last_build
    library, _last_build = _load()
    return library


def _load() -> tuple[ctypes.CDLL | None, KernelBuild]:
    problem = _machine_problem()
    if problem is not None:
        log.warning("lean CPU kernel unavailable (%s); using float32 weights with oneDNN", problem)
        return None, KernelBuild("unavailable", None, problem)
    why_not_installed = _installed_problem()
    if why_not_installed is None:
        try:
            library = _declare(ctypes.CDLL(str(INSTALLED_LIBRARY)))
            log.info("lean CPU kernel: the library built at install (%s)", INSTALLED_LIBRARY)
            return library, KernelBuild("installed", str(INSTALLED_LIBRARY), "")
        except (OSError, AttributeError) as exc:
            why_not_installed = f"the library built at install does not load ({exc})"
    try:
        path = _build()
        library = _declare(ctypes.CDLL(str(path)))
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as exc:
        reason = f"{why_not_installed}; compiling it failed: {exc}"
        log.warning("lean CPU kernel unavailable (%s); using float32 weights with oneDNN", reason)
        return None, KernelBuild("unavailable", None, reason)
    log.info("lean CPU kernel: compiled on first use (%s), as %s", why_not_installed, path)
    return library, KernelBuild("compiled", str(path), why_not_installed)


def sources_digest(
    sources: tuple[Path, ...] = KERNEL_SOURCES + KERNEL_HEADERS, flags: tuple[str, ...] = KERNEL_FLAGS
) -> str:
    """sha256 of the flags and every source and header, name and bytes, in order: what a library
    is built from. setup.py computes the same at install time and writes it beside the library."""
    digest = hashlib.sha256(" ".join(flags).encode())
    for source in sources:
        digest.update(f"\n{source.name}\n".encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def _installed_problem() -> str | None:
    """None if the library built at install is there and built from the sources installed; else why not."""
    if not INSTALLED_LIBRARY.is_file():
        return f"no library built at install ({INSTALLED_LIBRARY.name})"
    try:
        recorded = INSTALLED_DIGEST.read_text().strip()
    except OSError:
        return f"the library built at install has no {INSTALLED_DIGEST.name}"
    if recorded != sources_digest():
        return "the library built at install is stale: the kernel sources changed since (reinstall to rebuild it)"
    return None


def _machine_problem() -> str | None:
    """Why this machine cannot run the kernels (they need x86-64 with AVX2, FMA and F16C), or None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64, not {platform.system()} on {platform.machine()}"
    missing = _NEEDED_CPU_FLAGS - _cpu_flags()
    if missing:
        return f"CPU lacks {', '.join(sorted(missing))}"
    return None


# What a kernel's nonzero return means (quant_linear, lean_layers, lean_greedy): the header's
# VS_ERROR_UNSUPPORTED and VS_ERROR_NO_MEMORY.
ERROR_UNSUPPORTED, ERROR_NO_MEMORY = -1, -2
KERNEL_ERRORS = {
    ERROR_UNSUPPORTED: "a projection form or quantized type the kernel does not run",
    ERROR_NO_MEMORY: "out of memory in the kernel",
}


# Each code of csrc/verispec_kernels.h and the value this package uses for it.
C_CODES = {
    "VS_WIDEN_F16": NATIVE_FORMS["widen-f16"], "VS_WIDEN_BF16": NATIVE_FORMS["widen-bf16"],
    "VS_BF16_DOT": NATIVE_FORMS["bf16-dot"],
    "VS_QUANTIZED": QUANTIZED_FORM, "VS_QUANTIZED_Q8": QUANTIZED_Q8_FORM, "VS_CONTIGUOUS": ATTENTION_CONTIGUOUS, "VS_PAGED": ATTENTION_PAGED,
    "VS_ERROR_UNSUPPORTED": ERROR_UNSUPPORTED, "VS_ERROR_NO_MEMORY": ERROR_NO_MEMORY,
    "VS_PANEL": PANEL, "VS_PANEL_AVX512": PANEL_AVX512, "VS_ATTENTION_ROWS": ATTENTION_ROWS,
}  # fmt: skip


def native_layout(library: ctypes.CDLL) -> dict[str, tuple[int, int]]:
    """The library's description of csrc/verispec_kernels.h as it was compiled (vs_layout): for a
    structure "vs_part" (sizeof, alignof), for a field "vs_part.form" (offsetof, sizeof), for a
    code "VS_PAGED" (value, 0)."""
    i64 = ctypes.c_int64
    library.vs_layout.argtypes = [i64, ctypes.POINTER(i64), ctypes.POINTER(i64)]
    library.vs_layout.restype = ctypes.c_char_p
    layout, a, b = {}, i64(), i64()
    i = 0
    while (name := library.vs_layout(i, ctypes.byref(a), ctypes.byref(b))) is not None:
        layout[name.decode()] = (a.value, b.value)
        i += 1
    return layout


def binding_layout() -> dict[str, tuple[int, int]]:
    """This module's binding of the header in vs_layout's terms: what `native_layout` must equal."""
    layout = {}
    for c_name, structure in C_STRUCTURES.items():
        layout[c_name] = (ctypes.sizeof(structure), ctypes.alignment(structure))
        for field, kind in structure._fields_:
            layout[f"{c_name}.{field}"] = (getattr(structure, field).offset, ctypes.sizeof(kind))
    layout.update((name, (value, 0)) for name, value in C_CODES.items())
    return layout


def layout_differences(library: ctypes.CDLL) -> list[str]:
    """Each structure, field or code on which the library and this binding disagree, as
    "name: library (a, b), binding (a, b)" (missing on one side: None); empty if none."""
    native, bound = native_layout(library), binding_layout()
    return [
        f"{name}: library {native.get(name)}, binding {bound.get(name)}"
        for name in sorted(native.keys() | bound.keys())
        if native.get(name) != bound.get(name)
    ]


def kernel_error(code: int, call: str) -> Exception:
    """The exception for a kernel call's nonzero return: MemoryError for -2, else RuntimeError."""
    message = f"{call} failed ({code}): {KERNEL_ERRORS.get(code, 'unknown error')}"
    return MemoryError(message) if code == ERROR_NO_MEMORY else RuntimeError(message)


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """The library with every function's argument and return types set (AttributeError: one is missing)."""
    pointer, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "widen_linear_f16": [pointer, i64, pointer, i64, i64, pointer, pointer, i64, i32, i32],
        "widen_linear_bf16": [pointer, i64, pointer, i64, i64, pointer, pointer, i64, i32, i32],
        "rms_norm": [pointer, i64, i64, pointer, f32, pointer],
        "rope_store": [pointer, i64, i64, i64, i64, pointer, pointer, i64, pointer, pointer, i64],
        "attention": [pointer, i64, i64, i64, i64, pointer, pointer, i64, i64, f32, pointer, i32],
        "silu_mul": [pointer, i64, i64, pointer],
        "rope_store_paged": [pointer, i64, i64, i64, i64, pointer, pointer, pointer, pointer, pointer, pointer, i64],
        "paged_attention": [
            pointer, i64, pointer, pointer, pointer, pointer, pointer, pointer, i64, i64, i64, pointer, pointer, i64,
            f32, pointer, i32,
        ],  # fmt: skip
    }
    for name, arguments in signatures.items():
        function = getattr(library, name)
        function.argtypes = arguments
        function.restype = None
    # csrc/quant_linear.c: GGUF block-quantized weights; these return 0, -1 for a type they lack, or
    # (quant_linear) -2 out of memory: `kernel_error` turns that into an exception.
    quant_signatures = {
        "quant_linear": [i32, pointer, i64, pointer, i64, i64, pointer, pointer, i64, i32, i32],
        "quant_dequantize": [i32, pointer, i64, i64, pointer],
        "quant_rows": [i32, pointer, i64, pointer, i64, pointer],
        "quant_set_lanes": [i32],
        "quant_linear_q8": [i32, pointer, i64, pointer, i64, i64, pointer, pointer, i64, i32, i32],
        "quant_q8_isa": [i32],
        "quant_q8_pack": [i32, pointer, i64, i64, pointer],
        "bf16_linear": [pointer, i64, pointer, i64, i64, pointer, pointer, i64, i32, i32],
        "bf16_dot_amx": [i32],
    }
    for name, arguments in quant_signatures.items():
        function = getattr(library, name)
        function.argtypes = arguments
        function.restype = i32
    library.quant_q8_packed_bytes.argtypes, library.quant_q8_packed_bytes.restype = [i32, i64, i64], i64
    # csrc/bf16_dot.c: bfloat16 dot products (--activations bf16).
    library.bf16_packed_bytes.argtypes, library.bf16_packed_bytes.restype = [i64, i64], i64
    library.bf16_pack.argtypes, library.bf16_pack.restype = [pointer, i64, i64, pointer], None
    # csrc/lean_step.c: every layer of a pass in one call; 0, or quant_linear's codes (`kernel_error`).
    library.lean_layers.argtypes = [
        ctypes.POINTER(VsModel), pointer, i64, ctypes.POINTER(VsAttention), ctypes.POINTER(VsScratch), i32,
    ]  # fmt: skip
    library.lean_layers.restype = i32
    library.widen_panel.argtypes, library.widen_panel.restype = [], i32
    library.widen_force_panel.argtypes, library.widen_force_panel.restype = [i32], i32
    library.lean_greedy.argtypes = [
        ctypes.POINTER(VsModel), pointer, pointer, ctypes.POINTER(VsProjection), i64, ctypes.POINTER(VsAttention),
        ctypes.POINTER(VsScratch), pointer, pointer, pointer, i64, i64, pointer, i32,
    ]  # fmt: skip
    library.lean_greedy.restype = i32
    library.lean_greedy_paged.argtypes = [
        ctypes.POINTER(VsModel), pointer, pointer, ctypes.POINTER(VsProjection), i64, ctypes.POINTER(VsAttention),
        ctypes.POINTER(VsScratch), pointer, pointer, pointer, i64, pointer, pointer, i64, pointer, i32,
        ctypes.POINTER(VsProjection), pointer, pointer, pointer,
    ]  # fmt: skip
    library.lean_greedy_paged.restype = i32
    # csrc/layout.c: the header's layout as compiled (native_layout declares vs_layout).
    differing = layout_differences(library)
    if differing:  # a stale or foreign build: calling it would corrupt memory
        raise OSError(f"its structures or codes are not kernels.py's binding: {', '.join(differing[:4])}")
    return library


def _build() -> Path:
    """The library compiled into the per-user cache (once per machine and source version)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    digest = hashlib.sha256(" ".join((compiler, *KERNEL_FLAGS)).encode())
    for source in KERNEL_SOURCES + KERNEL_HEADERS:
        digest.update(source.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "verispec" / "kernels"
    library = cache / f"lean_cpu-{digest.hexdigest()[:16]}.so"
    if library.is_file():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / library.name
        done = subprocess.run(
            [compiler, *KERNEL_FLAGS, *map(str, KERNEL_SOURCES), "-lm", "-o", str(built)], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.strip().splitlines()[-1:]
            raise RuntimeError(f"{compiler} failed: {errors[0] if errors else done.returncode}")
        os.replace(built, library)  # atomic: processes building at once all end with a whole file
    log.info("built the lean CPU kernel: %s", library)
    return library


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()
