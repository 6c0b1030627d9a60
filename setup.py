"""Build step of the lean backend's CPU kernels at install time; the metadata is in pyproject.toml.

`pip install .`, `pip install -e .` and a built wheel compile `verispec/models/csrc/*.c` (which all
include `csrc/verispec_kernels.h`) with the flags of `verispec/models/kernels.py`
(KERNEL_SOURCE_NAMES, KERNEL_HEADER_NAMES, KERNEL_FLAGS, read from its source:
importing it needs torch, which a build environment may lack) into one shared library in the
package, `verispec/models/_kernels.so`, and write beside it the digest of what it was built from,
`_kernels.sha256` (kernels.sources_digest), so that a library left over from other sources is
not loaded. It is a ctypes library, not a Python extension: the wheel is tagged for the platform
only (py3-none-<platform>).

Where it cannot be built (not Linux on x86-64, no C compiler, the compiler fails) the install goes
on with a one-line warning: kernels.py then compiles the library on first use, or runs the torch
forms, as it says at start.
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = Path("verispec") / "models"  # relative to ROOT, as setuptools wants paths
LIBRARY, DIGEST = "_kernels.so", "_kernels.sha256"


def kernel_settings() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """KERNEL_SOURCE_NAMES, KERNEL_HEADER_NAMES and KERNEL_FLAGS, the literals kernels.py assigns."""
    wanted = {"KERNEL_SOURCE_NAMES", "KERNEL_HEADER_NAMES", "KERNEL_FLAGS"}
    values = {}
    for node in ast.parse((ROOT / PACKAGE / "kernels.py").read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and getattr(node.targets[0], "id", None) in wanted:
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values["KERNEL_SOURCE_NAMES"], values["KERNEL_HEADER_NAMES"], values["KERNEL_FLAGS"]


def sources_digest(sources: list[Path], flags: tuple[str, ...]) -> str:
    """kernels.sources_digest, byte for byte (tests/test_kernel_build.py checks they agree)."""
    digest = hashlib.sha256(" ".join(flags).encode())
    for source in sources:
        digest.update(f"\n{source.name}\n".encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


class build_kernels(build_ext):
    """build_ext for the kernels' library: compiled by the system C compiler with kernels.py's
    flags (not distutils' Python-extension flags) into build_lib, and copied into the source tree
    for an editable install (inplace). Never fails the install."""

    def run(self) -> None:
        built = Path(self.build_lib) / PACKAGE
        for name in (LIBRARY, DIGEST):  # none left from an earlier build of other sources
            (built / name).unlink(missing_ok=True)
        problem = self._compile(built)
        if problem is not None:
            print(
                f"warning: verispec's CPU kernels not built at install ({problem}); they are compiled on first use",
                file=sys.stderr,
            )
        if self.inplace:  # replaced, not rewritten: a process running from this checkout may have it mapped
            for name in (LIBRARY, DIGEST):
                target = ROOT / PACKAGE / name
                if (built / name).is_file():
                    shutil.copyfile(built / name, target.with_name(name + ".partial"))
                    os.replace(target.with_name(name + ".partial"), target)
                else:
                    target.unlink(missing_ok=True)

    def _compile(self, built: Path) -> str | None:
        """None once the library and its digest are in `built`, else why not."""
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            return f"needs Linux on x86-64, not {platform.system()} on {platform.machine()}"
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not compiler:
            return "no C compiler found"
        names, headers, flags = kernel_settings()
        sources = [ROOT / PACKAGE / "csrc" / name for name in names]
        headers = [ROOT / PACKAGE / "csrc" / name for name in headers]
        built.mkdir(parents=True, exist_ok=True)
        partial = built / (LIBRARY + ".partial")
        try:
            done = subprocess.run(
                [compiler, *flags, *map(str, sources), "-lm", "-o", str(partial)],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            partial.unlink(missing_ok=True)
            return f"{compiler}: {exc}"
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.strip().splitlines()[-1:]
            return f"{compiler} failed: {errors[0] if errors else done.returncode}"
        os.replace(partial, built / LIBRARY)
        (built / DIGEST).write_text(sources_digest(sources + headers, flags) + "\n")
        return None

    def get_outputs(self) -> list[str]:
        return [str(Path(self.build_lib) / PACKAGE / name) for name in (LIBRARY, DIGEST)]

    def get_output_mapping(self) -> dict[str, str]:
        """For an editable install: each built file and its copy in the source tree."""
        if not self.inplace:
            return {}
        return {str(Path(self.build_lib) / PACKAGE / name): str(PACKAGE / name) for name in (LIBRARY, DIGEST)}


class bdist_wheel_platform(bdist_wheel):
    """The library does not link Python: the wheel is for the platform, any Python 3."""

    def get_tag(self) -> tuple[str, str, str]:
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    # Declared so that setuptools knows the distribution holds a binary (a platform wheel, build_ext
    # runs); build_kernels builds it. Optional: a failed build is not a failed install.
    ext_modules=[
        Extension(
            "verispec.models._kernels",
            sources=[(PACKAGE / "csrc" / name).as_posix() for name in kernel_settings()[0]],
            depends=[(PACKAGE / "csrc" / name).as_posix() for name in kernel_settings()[1]],
            optional=True,
        )
    ],
    cmdclass={"build_ext": build_kernels, "bdist_wheel": bdist_wheel_platform},
)
