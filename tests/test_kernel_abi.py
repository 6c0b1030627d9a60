"""The boundary to the compiled kernels is declared once, in csrc/verispec_kernels.h, and
kernels.py's ctypes binding is checked against it: every structure's size and alignment, every
field's offset and size and every code's value against the library's own description of the
header as compiled (vs_layout), and every function's argument and return types against the
header's prototypes. A field reordered or retyped on one side only fails here, and a library
that disagrees with the binding is not loaded, instead of corrupting memory.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from pathlib import Path

import pytest

from verispec.models import kernels

HEADER = Path(kernels.__file__).with_name("csrc") / "verispec_kernels.h"
COMPILER = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
CANNOT_BUILD = kernels._machine_problem() or (None if COMPILER else "no C compiler")
needs_build = pytest.mark.skipif(
    CANNOT_BUILD is not None, reason=f"this machine cannot build the kernels: {CANNOT_BUILD}"
)


@pytest.fixture(scope="module")
def library() -> ctypes.CDLL:
    """The library of these sources, loaded without kernels.py's check (which would refuse a
    mismatched one): the one built at install if current, else compiled into the cache."""
    path = kernels.INSTALLED_LIBRARY if kernels._installed_problem() is None else kernels._build()
    return ctypes.CDLL(str(path))


@needs_build
def test_every_structure_field_and_code_of_the_header_is_the_bindings(library):
    native, bound = kernels.native_layout(library), kernels.binding_layout()
    assert set(kernels.C_STRUCTURES) <= native.keys()  # vs_layout describes every bound structure
    differences = kernels.layout_differences(library)
    assert not differences, "the binding differs from verispec_kernels.h:\n" + "\n".join(differences)
    assert native == bound


def test_the_binding_describes_every_structure_and_code_of_the_header():
    """What the header declares (its typedef'd structures, enum and #define codes) is what the
    binding lists, so a structure or code added to the header alone fails too."""
    text = _without_comments(HEADER.read_text())
    structures = set(re.findall(r"}\s*(vs_\w+)\s*;", text))
    codes = set(re.findall(r"\b(VS_[A-Z0-9_]+)\s*=", text))
    codes |= set(re.findall(r"#define\s+(VS_[A-Z0-9_]+)\s", text))
    assert structures == set(kernels.C_STRUCTURES)
    assert codes == set(kernels.C_CODES)


@needs_build
def test_every_function_of_the_header_is_bound_with_its_prototypes_types():
    library = kernels.kernel_library()
    assert library is not None, kernels.kernel_build().reason
    prototypes = _prototypes(HEADER.read_text())
    assert len(prototypes) >= 17 and "lean_layers" in prototypes and "vs_layout" in prototypes
    for name, (result, arguments) in prototypes.items():
        function = getattr(library, name)
        assert function.restype == _ctype(result) or (result == "void" and function.restype is None), name
        assert function.argtypes is not None and len(function.argtypes) == len(arguments), name
        for position, (declared, bound) in enumerate(zip(arguments, function.argtypes, strict=True)):
            assert _agrees(declared, bound), f"{name} argument {position}: {declared} bound as {bound}"


@needs_build
def test_a_library_that_disagrees_with_the_binding_is_not_loaded(library, monkeypatch):
    monkeypatch.setitem(kernels.C_CODES, "VS_PAGED", 7)
    with pytest.raises(OSError, match="VS_PAGED: library \\(1, 0\\), binding \\(7, 0\\)"):
        kernels._declare(library)


def test_the_header_is_part_of_what_the_library_is_built_from(tmp_path):
    """The digest that says whether the installed library is current covers the header: a
    change to it alone rebuilds (setup.py computes the same digest, test_kernel_build checks)."""
    csrc = Path(kernels.__file__).with_name("csrc")
    assert {p.name for p in csrc.glob("*.h")} == set(kernels.KERNEL_HEADER_NAMES)
    assert {p.name for p in csrc.glob("*.c")} == set(kernels.KERNEL_SOURCE_NAMES)
    copies = []
    for source in kernels.KERNEL_SOURCES + kernels.KERNEL_HEADERS:
        copies.append(tmp_path / source.name)
        shutil.copyfile(source, copies[-1])
    assert kernels.sources_digest(tuple(copies)) == kernels.sources_digest()
    header = tmp_path / HEADER.name
    header.write_text(header.read_text() + "\n")
    assert kernels.sources_digest(tuple(copies)) != kernels.sources_digest()
    for source in kernels.KERNEL_SOURCES:  # every source includes it
        assert f'#include "{HEADER.name}"' in source.read_text(), source.name


# ---- the header's prototypes, read as ctypes types ----

_SCALARS = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float, "char": ctypes.c_char}


def _without_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)


def _prototypes(header: str) -> dict[str, tuple[str, list[str]]]:
    """Each function the header declares: its return type and argument types, without names."""
    text = _without_comments(header)
    found = {}
    declaration = re.compile(r"^([A-Za-z_][\w \*]*?[\s\*])(\w+)\(([^()]*)\);", flags=re.M)
    for result, name, arguments in declaration.findall(text):
        arguments = " ".join(arguments.split())
        types = [] if arguments in ("", "void") else [_type_of(a, named=True) for a in arguments.split(",")]
        found[name] = (_type_of(result), types)
    return found


def _type_of(declaration: str, named: bool = False) -> str:
    """'const float* x' -> 'float*' (named: the last word is the argument's name)."""
    words = declaration.replace("*", " * ").replace("const", " ").split()
    if named:
        words = words[:-1]
    return "".join(words)


def _ctype(declared: str):
    base, stars = declared.rstrip("*"), len(declared) - len(declared.rstrip("*"))
    if stars == 0:
        return None if base == "void" else _SCALARS[base]
    if base == "char":
        return ctypes.c_char_p
    if base in kernels.C_STRUCTURES:
        return ctypes.POINTER(kernels.C_STRUCTURES[base])
    return ctypes.c_void_p


def _agrees(declared: str, bound) -> bool:
    """A scalar binds as its own type; a pointer to a structure as a pointer to its binding; any
    other pointer as an address (c_void_p) or a pointer to its scalar type."""
    expected = _ctype(declared)
    if bound == expected:
        return True
    base = declared.rstrip("*")
    return declared.count("*") == 1 and base in _SCALARS and bound == ctypes.POINTER(_SCALARS[base])
