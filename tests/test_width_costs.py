"""scripts/width_costs.py on tiny models: every requested width, prefill chunk and batch appears,
and every printed multiple of the decode step is the ratio of the printed medians (no timing
assertions). llama.cpp's side comes from a stand-in llama-bench that prints llama-bench's JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

from tests.scripts import load_script
from tests.test_batching import exact_pair
from tests.test_gguf import write_gguf
from verispec.models.kernels import kernel_library

ROOT = Path(__file__).resolve().parents[1]
KERNEL = kernel_library() is not None

# Prints what llama-bench -o json prints, with fixed samples: pp W takes 1 + W / 10 ms, tg N 2 ms a token.
FAKE_LLAMA_BENCH = """#!{python}
import json, sys
args = sys.argv[1:]
open({log!r}, "w").write(json.dumps(args))
value = lambda flag: args[args.index(flag) + 1]
tests = [{{"n_prompt": int(p), "n_gen": 0, "n_depth": int(value("-d")), "samples_ns": [1e6 + int(p) * 1e5] * 3}}
         for p in value("-p").split(",")]
n = int(value("-n"))
tests.append({{"n_prompt": 0, "n_gen": n, "n_depth": int(value("-d")), "samples_ns": [n * 2e6, n * 2e6, n * 3e6]}})
print(json.dumps(tests))
"""


def script():
    return load_script("width_costs")


def printed_rows(out: str) -> dict[str, list[str]]:
    """The printed table's rows, by the pass's name: its cells after the name."""
    rows = {}
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] != "pass" and set(cells[0]) != {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def check_ratios(out: str, report: dict, names: list[str], llama: bool) -> None:
    printed = printed_rows(out)
    assert list(printed) == names == [row["name"] for row in report["rows"]]
    decode = float(printed["width 1"][1])
    llama_decode = float(printed["width 1"][5]) if llama else None
    for row in report["rows"]:
        rows, ms, per_row, x_decode, _, llama_ms, llama_x = printed[row["name"]]
        assert int(rows) == row["rows"] and float(ms) == row["ms"] and float(per_row) == row["ms_per_row"]
        assert float(x_decode.rstrip("x")) == row["x_decode"] == round(float(ms) / decode, 2)
        if llama and row["kind"] != "batch":
            assert float(llama_x.rstrip("x")) == row["llama_x_decode"] == round(float(llama_ms) / llama_decode, 2)
        else:
            assert llama_ms == llama_x == "-"


def test_every_width_appears_and_ratios_are_those_of_the_printed_medians(tmp_path, capsys):
    target = exact_pair(tmp_path, seed=5)["target"]
    out_json = tmp_path / "costs.json"
    threads = str(torch.get_num_threads())
    report = script().main([target, "--context", "40", "--widths", "2,5,8", "--batch", "1,3", "--prefill", "16",
                            "--repeats", "3", "--warm-up", "1", "--threads", threads, "--json", str(out_json)])  # fmt: skip
    out = capsys.readouterr().out
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(report))
    batches = ["batch 1 x 1 row", "batch 3 x 1 row"] if KERNEL else []
    check_ratios(out, report, ["width 1", "width 2", "width 5", "width 8", "prefill 16", *batches], llama=False)
    assert "llama.cpp: not run, MODEL is not a GGUF file" in out
    assert all(row["gfma_s"] > 0 for row in report["rows"])
    if not KERNEL:
        assert "batch of one-row sequences: skipped" in out


@pytest.mark.skipif(not KERNEL, reason="no C compiler or no AVX2/FMA/F16C here")
def test_llama_bench_figures_sit_beside_ours(tmp_path, capsys):
    model = tmp_path / "tiny-f16.gguf"
    write_gguf(model, {"*": GGMLQuantizationType.F16})
    fake, log = tmp_path / "llama-bench", tmp_path / "llama-bench-args.json"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    threads = str(torch.get_num_threads())
    report = script().main([str(model), "--context", "40", "--widths", "1,4,16", "--batch", "2", "--prefill", "8",
                            "--repeats", "2", "--warm-up", "1", "--threads", threads, "--llama-bench", str(fake)])  # fmt: skip
    out = capsys.readouterr().out
    check_ratios(out, report, ["width 1", "width 4", "width 16", "prefill 8", "batch 2 x 1 row"], llama=True)
    args = json.loads(log.read_text())
    assert args[args.index("-d") + 1] == "40" and args[args.index("-t") + 1] == threads
    assert args[args.index("-p") + 1] == "4,8,16" and args[args.index("-n") + 1] == "32"
    llama = {row["name"]: row["llama_ms"] for row in report["rows"]}
    assert llama == {"width 1": 2.0, "width 4": 1.4, "width 16": 2.6, "prefill 8": 1.8, "batch 2 x 1 row": None}
