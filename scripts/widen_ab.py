"""The float16 projection kernel of a git revision against the working tree's, interleaved in one run:

    python scripts/widen_ab.py [--base HEAD] [--rows 1,2,5,8,12,16,32] [--repeats 25] [--threads 2]

Both versions of `verispec/models/csrc` are compiled with the install's flags into temporary
libraries; each pass runs `widen_linear_f16` over the reference target's projections (8 layers of
qkv, gate+up, down and o at hidden 512, intermediate 1344), the two libraries alternating within
each repeat (the first rotating) so that load drift hits both alike. Prints the median ms per
pass of each, their ratio, and whether every output has the same bits (it must: each output is
one fused multiply-add chain, whatever the tile). x86-64 with AVX2/FMA/F16C and a C compiler.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from verispec.models import kernels

ROOT = Path(__file__).resolve().parents[1]
CSRC = "verispec/models/csrc"
SHAPES = [(512 + 2 * 128, 512), (2 * 1344, 512), (512, 1344), (512, 512)]  # qkv, gate+up, down, o
LAYERS = 8


def build(sources: Path, out: Path) -> ctypes.CDLL:
    compiler = shutil.which("cc") or shutil.which("gcc")  # every C file of that revision's csrc
    subprocess.run([compiler, *kernels.KERNEL_FLAGS, *map(str, sorted(sources.glob("*.c"))), "-lm", "-o", str(out)], check=True)
    library = ctypes.CDLL(str(out))
    library.widen_linear_f16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]  # fmt: skip
    return library


def checkout(revision: str, into: Path) -> Path:
    """`verispec/models/csrc` as it was at `revision`."""
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{revision}:{CSRC}"], cwd=ROOT, check=True, capture_output=True, text=True)
    for name in listing.stdout.split():
        blob = subprocess.run(["git", "show", f"{revision}:{CSRC}/{name}"], cwd=ROOT, check=True, capture_output=True)
        (into / name).write_bytes(blob.stdout)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD")
    parser.add_argument("--rows", default="1,2,5,7,8,12,13,16,24,32,64")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        base = checkout(args.base, tmp / "base")
        libraries = {args.base: build(base, tmp / "base.so"), "tree": build(ROOT / CSRC, tmp / "tree.so")}
        widths = {name: lib.widen_panel() for name, lib in libraries.items()}
        if len(set(widths.values())) != 1:
            raise SystemExit(f"the two versions pack panels differently ({widths}); this script compares kernels on one layout")
        torch.manual_seed(0)
        weights = [kernels._panels(torch.randn(n, k).half()) for n, k in SHAPES]
        names = list(libraries)
        print(f"panels {widths['tree']} wide, {args.threads} threads, {args.repeats} repeats (the first 5 not counted)")
        print(f"| rows | {names[0]} ms | tree ms | tree/{names[0]} | same bits |")
        print("|---|---|---|---|---|")
        for rows in map(int, args.rows.split(",")):
            xs = [torch.randn(rows, k) for _, k in SHAPES]
            outs = {name: [torch.empty(rows, n) for n, _ in SHAPES] for name in names}
            times = {name: [] for name in names}
            for repeat in range(args.repeats):
                for name in names[repeat % 2 :] + names[: repeat % 2]:
                    library, start = libraries[name], time.perf_counter()
                    for _ in range(LAYERS):
                        for (n, k), w, x, y in zip(SHAPES, weights, xs, outs[name], strict=True):
                            library.widen_linear_f16(x.data_ptr(), rows, w.data_ptr(), n, k, None, y.data_ptr(), n, 0, args.threads)
                    times[name].append(time.perf_counter() - start)
            same = all(torch.equal(a, b) for a, b in zip(outs[names[0]], outs["tree"], strict=True))
            old, new = (statistics.median(times[name][5:]) * 1e3 for name in names)
            print(f"| {rows} | {old:.3f} | {new:.3f} | {new / old:.2f} | {same} |")


if __name__ == "__main__":
    main()
