"""Whole passes of a model on a git revision's kernels against the working tree's, interleaved in one run:

    python scripts/step_ab.py MODEL [--base HEAD] [--context 400] [--widths 1,5,8,16] [--prefill 128]
        [--batch 8] [--repeats 30] [--threads 2] [--activations float]

Both versions of `verispec/models/csrc` are compiled with the install's flags into temporary
libraries. MODEL is loaded once, as `scripts/width_costs.py` loads it, and its passes (the same
cases: width W rows of one sequence at --context, a prefill chunk, one row of each of B sequences
of the batched runner) run on one library then the other within each repeat, the first rotating,
so that load drift hits both alike (the lean step calls `kernel_library()` per pass; this script
points it at each library in turn). Prints the median ms of each, their ratio, and whether the
logits have the same bits (they must, where only the scheduling of work changed). The LM head and
anything else that bound its library at load run on the installed library in both columns.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from verispec.models import kernels, lean, load_model

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


widen_ab, width_costs = _script("widen_ab"), _script("width_costs")


class _Older(ctypes.CDLL):
    """An older revision's library: a function it lacks (one added since, never called by the
    passes compared here) binds as an inert placeholder, so that its other functions can be declared."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__"):
                raise
            placeholder = types.SimpleNamespace()
            setattr(self, name, placeholder)
            return placeholder


def build(sources: Path, out: Path) -> ctypes.CDLL:
    widen_ab.build(sources, out)  # compiles with the install's flags
    differences = kernels.layout_differences
    # codes added since (absent from the older header) do not change what its structures hold
    kernels.layout_differences = lambda library: [d for d in differences(library) if "library None" not in d]
    try:
        return kernels._declare(_Older(str(out)))
    except OSError as exc:  # its structures differ from this tree's: its lean_layers cannot run our models
        raise SystemExit(f"{sources}: {exc}") from None
    finally:
        kernels.layout_differences = differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--base", default="HEAD")
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--widths", default="1,5,8,16")
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--batch", default="8")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warm-up", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activations", default="float")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        libraries = {
            args.base: build(widen_ab.checkout(args.base, tmp / "base"), tmp / "base.so"),
            "tree": build(ROOT / widen_ab.CSRC, tmp / "tree.so"),
        }
        lm = load_model(args.model, torch.device("cpu"), torch.float32, activations=args.activations)
        widths = [int(w) for w in args.widths.split(",") if w]
        cases = width_costs.width_cases(lm, args.context, widths, args.prefill)
        batched, why = width_costs.batch_cases(lm, args.context, [int(b) for b in args.batch.split(",") if b])
        if why:
            print(f"batch: skipped, {why}")
        cases += batched
        names = list(libraries)
        times = {(case.name, name): [] for case in cases for name in names}
        outputs = {}
        for repeat in range(args.warm_up + args.repeats):
            for name in names[repeat % 2 :] + names[: repeat % 2]:
                lean.kernel_library = lambda library=libraries[name]: library
                for case in cases:
                    start = time.perf_counter()
                    result = case.run()
                    elapsed = time.perf_counter() - start
                    if repeat >= args.warm_up:
                        times[(case.name, name)].append(elapsed)
                    logits = result[0] if isinstance(result, tuple) else result
                    if isinstance(logits, list):
                        logits = torch.cat([row for row in logits if row is not None])
                    if isinstance(logits, torch.Tensor):
                        outputs[(case.name, name)] = logits.clone()
        print(f"{args.model}: {args.threads} threads, context {args.context}, {args.repeats} repeats")
        print(f"| pass | {names[0]} ms | tree ms | tree/{names[0]} | same bits |")
        print("|---|---|---|---|---|")
        for case in cases:
            old, new = (statistics.median(times[(case.name, name)]) * 1e3 for name in names)
            a, b = (outputs.get((case.name, name)) for name in names)
            same = "-" if a is None else str(torch.equal(a, b))
            print(f"| {case.name} | {old:.3f} | {new:.3f} | {new / old:.2f} | {same} |")


if __name__ == "__main__":
    sys.exit(main())
