"""The cost of a pass by width for one model file, beside llama.cpp's on the same file, in one run:

    python scripts/width_costs.py MODEL [--context 400] [--widths 1,2,4,5,8,16,32] [--batch 1,2,4,8]
        [--prefill 128] [--repeats 100] [--warm-up 5] [--threads 2] [--activations float,q8|float,bf16] [--weights-dtype q8_0]
        [--llama-bench PATH] [--json OUT]

MODEL (a Hugging Face folder or a GGUF file) is loaded as `verispec serve` loads it. Every pass
starts at --context cached positions and is rolled back after: width W is W rows of one sequence
(`lm.session().extend`, logits for every row, as a verify pass; width 1 is the decode step);
prefill is a chunk of --prefill rows, logits for the last only; batch B is one row of each of B
sequences in one pass of the batched runner (`core/runner.py`, the server's paged cache). The
cases are interleaved: each repeat runs every case once, the first one rotating, so that load
drift hits all alike; --warm-up repeats first are not counted. Printed per case: the median, its
multiple of the decode step (the ratio of the two printed medians), ms per row, and GFMA/s =
weight-matrix elements x rows / seconds (attention not counted, the head only for rows with logits).
--activations float,q8 (or float,bf16) loads the model once per numeric model (`--activations` of
verispec; q8 is for block-quantized weights, bf16 for float ones) and interleaves the sets of cases
in the same rounds; each set's multiples are of its own decode step.

Where MODEL is a GGUF file and llama-bench is found (--llama-bench, else $LLAMACPP_DIR/bin, default
~/.cache/verispec/llama.cpp/bin as scripts/build_llamacpp.sh builds it, else PATH), one run of
`llama-bench -m MODEL -d CONTEXT -p W,... -n 32 -t THREADS -r 10 -o json` gives llama.cpp's
medians beside ours: pp W at depth CONTEXT is the width-W pass (and the prefill chunk), tg32 per
token the decode step. llama-bench runs each test's repetitions in a row, not interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from verispec.config import BatchSettings
from verispec.core.kv_cache import BlockTable
from verispec.core.runner import ModelRunner, Segment, batchable
from verispec.errors import UserError
from verispec.models import load_model
from verispec.models.gguf_file import gguf_path
from verispec.models.kernels import kernel_library

LLAMA_BENCH = Path(os.environ.get("LLAMACPP_DIR", Path.home() / ".cache" / "verispec" / "llama.cpp")) / "bin" / "llama-bench"
LLAMA_GEN, LLAMA_REPS = 32, 10
BLOCK = BatchSettings().kv_block_size  # the server's default
FORMATS = ("{:.3f}", "{:.3f}", "{:.2f}x", "{:.1f}", "{:.3f}", "{:.2f}x")  # the table's figures, as rounded in Row


@dataclass
class Case:
    """One kind of pass: `run` times it once; rows computed, and of those rows with logits."""

    name: str
    kind: str  # "width", "prefill" or "batch"
    rows: int
    logit_rows: int
    run: Callable[[], object]
    seconds: list[float] = field(default_factory=list)


@dataclass
class Row:
    """One line of the table. ms are rounded as printed; every ratio is computed from them."""

    name: str
    kind: str
    rows: int
    ms: float
    ms_per_row: float
    x_decode: float
    gfma_s: float | None
    llama_ms: float | None = None
    llama_x_decode: float | None = None


def ids(n: int, vocab: int, offset: int = 0) -> list[int]:
    return [1 + (offset + i) % (vocab - 1) for i in range(n)]


def width_cases(lm, context: int, widths: list[int], prefill: int) -> list[Case]:
    """Passes of one sequence at `context` positions, rolled back after each."""
    session = lm.session(context + max(widths + [prefill]))
    session.extend(ids(context, lm.vocab_size))

    def one_pass(n: int, last_only: bool) -> Callable[[], object]:
        tokens = ids(n, lm.vocab_size, context)
        return lambda: (session.extend(tokens, last_only), session.rollback(context))

    cases = [Case(f"width {w}", "width", w, w, one_pass(w, False)) for w in widths]
    if prefill:
        cases.append(Case(f"prefill {prefill}", "prefill", prefill, 1, one_pass(prefill, True)))
    return cases


def batch_cases(lm, context: int, sizes: list[int]) -> tuple[list[Case], str | None]:
    """Passes of the batched runner over one row of each of B sequences; none, and why, where the
    runner cannot batch this model on the kernel step."""
    why = batchable(lm)
    if why is None and not (lm.kernel_step and kernel_library() is not None):
        why = f"the kernel step is off: {lm.path_report()['why']}"
    if why or not sizes:
        return [], why
    per_block = 2 * len(lm.layers) * lm.kv_heads * BLOCK * lm.head_dim * 4  # float32, as runner.py sizes blocks
    blocks = max(sizes) * (context // BLOCK + 1) + lm.max_positions // BLOCK + 1  # + the one window it demands
    runner = ModelRunner(lm, blocks * per_block, BLOCK, prefix_cache=False)
    tables = [BlockTable(runner.pool) for _ in range(max(sizes))]
    for i, table in enumerate(tables):  # each sequence's context, in one pass
        runner.forward([Segment(ids(context, lm.vocab_size, 7 * i), 0, table, logits=0)])

    def one_pass(b: int) -> Callable[[], object]:
        segments = [Segment(ids(1, lm.vocab_size, 3 * i), context, table, logits=1) for i, table in enumerate(tables[:b])]
        return lambda: runner.forward(segments)  # rewrites position `context` of each: nothing to roll back

    return [Case(f"batch {b} x 1 row", "batch", b, b, one_pass(b)) for b in sizes], None


def measure(cases: list[Case], repeats: int, warm_up: int) -> None:
    """Round-robin: each repeat runs every case once, starting one case later than the last."""
    for r in range(warm_up + repeats):
        for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
            start = time.perf_counter()
            case.run()
            if r >= warm_up:
                case.seconds.append(time.perf_counter() - start)


def weight_counts(lm) -> tuple[int, int] | None:
    """Elements of the weight matrices a pass streams: the layers', the head's (None if unknown)."""
    linears = lm.linears() if hasattr(lm, "linears") else []
    sizes = [linear.in_features * linear.out_features for linear in linears]
    return (sum(sizes[:-1]), sizes[-1]) if sizes else None


def llama_bench(path: Path, model: Path, context: int, sizes: list[int], threads: int) -> tuple[dict[int, float], str]:
    """llama-bench's medians in ms, by rows: the pp tests' pass, and the tg test's step as width 1."""
    command = [str(path), "-m", str(model), "-d", str(context), "-p", ",".join(map(str, sizes)) or "0",
               "-n", str(LLAMA_GEN), "-t", str(threads), "-r", str(LLAMA_REPS), "-o", "json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {(done.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    ms = {}
    for test in json.loads(done.stdout):
        median = statistics.median(test.get("samples_ns") or [test["avg_ns"]]) / 1e6
        if test["n_gen"] and not test["n_prompt"]:
            ms[1] = median / test["n_gen"]
        elif test["n_prompt"] and not test["n_gen"]:
            ms[test["n_prompt"]] = median
    return ms, shlex.join(command)


def build_rows(cases: list[Case], weights: tuple[int, int] | None, llama: dict[int, float]) -> list[Row]:
    decode = round(statistics.median(cases[0].seconds) * 1e3, 3)  # cases[0] is width 1
    llama_decode = round(llama[1], 3) if 1 in llama else None
    rows = []
    for case in cases:
        ms = round(statistics.median(case.seconds) * 1e3, 3)
        fma = weights and weights[0] * case.rows + weights[1] * case.logit_rows
        theirs = round(llama[case.rows], 3) if case.kind != "batch" and case.rows in llama else None
        rows.append(Row(
            case.name, case.kind, case.rows, ms, round(ms / case.rows, 3), round(ms / decode, 2),
            round(fma / ms / 1e6, 1) if fma else None, theirs,
            round(theirs / llama_decode, 2) if theirs and llama_decode else None,
        ))  # fmt: skip
    return rows


def table(rows: list[Row]) -> Table:
    out = Table(box=box.MARKDOWN)
    for name in ("pass", "rows", "ms", "ms/row", "x decode", "GFMA/s", "llama.cpp ms", "llama.cpp x decode"):
        out.add_column(name, justify="left" if name == "pass" else "right")
    for r in rows:
        shown = (r.ms, r.ms_per_row, r.x_decode, r.gfma_s, r.llama_ms, r.llama_x_decode)
        out.add_row(r.name, str(r.rows), *("-" if v is None else f.format(v) for f, v in zip(FORMATS, shown, strict=True)))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return sorted({int(x) for x in text.split(",") if x.strip()})

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Hugging Face model folder or a GGUF file")
    parser.add_argument("--context", type=int, default=400, help="positions in the cache before every timed pass")
    parser.add_argument("--widths", type=ints, default=[1, 2, 4, 5, 8, 16, 32], help="rows of one sequence per pass (1 is always run)")
    parser.add_argument("--batch", type=ints, default=[1, 2, 4, 8], help="sequences of one row per batched pass ('' for none)")
    parser.add_argument("--prefill", type=int, default=128, help="rows of the prefill chunk (0 for none)")
    parser.add_argument("--repeats", type=int, default=100, help="timed rounds over every case")
    parser.add_argument("--warm-up", type=int, default=5, help="rounds run first and not counted")
    parser.add_argument("--threads", type=int, default=2, help="torch threads here, -t for llama-bench")
    parser.add_argument("--activations", type=lambda text: [a for a in text.split(",") if a], default=["float"],
                        help="float, q8 or bf16, or several (float,bf16) to compare them side by side")
    parser.add_argument("--weights-dtype", default="auto", choices=("auto", "float16", "bfloat16", "q8_0"),
                        help="as verispec's --weights-dtype (q8_0 lets a float checkpoint take --activations q8)")
    parser.add_argument("--llama-bench", type=Path, default=None, help=f"llama-bench binary (default: {LLAMA_BENCH}, else PATH)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here as JSON")
    args = parser.parse_args(argv)
    args.widths = sorted({1, *args.widths})
    if min(args.widths + args.batch + [args.prefill, args.context - 1, args.repeats - 1, args.warm_up]) < 0:
        parser.error("sizes, --context and --repeats must be positive")
    if not args.activations or set(args.activations) - {"float", "q8", "bf16"}:
        parser.error("--activations takes float, q8 or bf16, or several, comma-separated (float,bf16)")
    if args.llama_bench is not None and not args.llama_bench.is_file():
        parser.error(f"no llama-bench at {args.llama_bench}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console, notes = Console(width=160), []
    torch.set_num_threads(args.threads)
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    groups = []  # per numeric model: its model and its cases, width 1 first
    for activations in args.activations:
        try:
            lm = load_model(
                args.model, torch.device("cpu"), torch.float32, weights_dtype=args.weights_dtype, activations=activations
            )
        except UserError as exc:
            sys.exit(f"error: {exc}")
        limit = getattr(lm, "max_positions", None)
        if limit and args.context + max(args.widths + [args.prefill]) > limit:
            sys.exit(f"error: context {args.context} plus the widest pass exceeds the model's {limit} positions")
        cases = width_cases(lm, args.context, args.widths, args.prefill)
        batched, why = batch_cases(lm, args.context, args.batch)
        if why and args.batch:
            notes.append(f"batch of one-row sequences: skipped, {why}")
        if len(args.activations) > 1:
            for case in cases + batched:
                case.name += f" ({activations})"
        groups.append((lm, cases + batched))
    measure([case for _, cases in groups for case in cases], args.repeats, args.warm_up)

    gguf, llama, llama_command = gguf_path(args.model), {}, None
    bench = args.llama_bench or (LLAMA_BENCH if LLAMA_BENCH.is_file() else shutil.which("llama-bench"))
    if gguf is None:
        notes.append("llama.cpp: not run, MODEL is not a GGUF file (llama-bench reads GGUF files only)")
    elif bench is None:
        notes.append(f"llama.cpp: no llama-bench at {LLAMA_BENCH} or on PATH (scripts/build_llamacpp.sh builds it)")
    else:
        sizes = sorted({w for w in args.widths if w > 1} | ({args.prefill} if args.prefill else set()))
        try:
            llama, llama_command = llama_bench(bench, gguf, args.context, sizes, args.threads)
            notes.append(f"llama.cpp: {llama_command}")
        except (RuntimeError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            notes.append(f"llama.cpp: llama-bench failed, {exc}")

    weights = weight_counts(lm)
    rows = [row for _, cases in groups for row in build_rows(cases, weights, llama)]
    load_after = tuple(round(x, 2) for x in os.getloadavg())
    console.print(f"{args.model}: context {args.context}, {args.threads} threads, medians of {args.repeats} interleaved repeats "
                  f"({args.warm_up} warm-up not counted); x decode = ms / width 1's ms", highlight=False, soft_wrap=True)  # fmt: skip
    console.print(table(rows))
    if weights:
        notes.append(f"weights: {weights[0] / 1e6:.2f}M in the layers + {weights[1] / 1e6:.2f}M in the head")
    notes.append(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    for note in notes:
        console.print(note, highlight=False, soft_wrap=True)

    report = {
        "command": shlex.join(["python", "scripts/width_costs.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model, "context": args.context, "threads": args.threads, "repeats": args.repeats,
        "warm_up": args.warm_up, "weights": list(weights) if weights else None,
        "paths": [getattr(model, "path_report", dict)() for model, _ in groups],
        "loadavg_before": list(load_before), "loadavg_after": list(load_after), "rows": [asdict(r) for r in rows],
        "llama_bench": {"command": llama_command, "ms": llama} if llama_command else None, "notes": notes,
    }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
