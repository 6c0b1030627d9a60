"""The Ray Serve path's overhead: `verispec serve` against `verispec serve --replicas 1`, one
replica each, same models, same machine, measured side by side (rounds alternate between the two).

    python scripts/ray_overhead.py [--levels 1,4] [--requests 16] [--rounds 3] [--out docs/scale-out]

Prints a table of median tokens/s and p50 latency per concurrency level and writes the raw
loadtest reports beside it. The replica gets the machine's CPUs (--replica-cpus), so that it runs
with as many threads as the plain server: the comparison is of the paths, not of thread counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import ServerProcess  # noqa: E402
from verispec.tools.loadtest import default_prompts, loadtest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4")
    parser.add_argument("--requests", type=int, default=16, help="requests per level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scale-out")
    parser.add_argument("--replica-cpus", default=str(os.cpu_count() or 1), help="CPUs (threads) of the replica (default: all)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    cpus = args.replica_cpus
    common = ["--audit-url", "none", "--log-level", "warning"]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    servers = {
        "plain": ServerProcess(common, log_dir=logs),
        "ray serve": ServerProcess([*common, "--replicas", "1", "--replica-cpus", cpus], log_dir=logs),
    }
    prompts = default_prompts()
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        for proc in servers.values():
            proc.wait_ready(600)
        for r in range(args.rounds):
            for level in levels:
                for name, proc in servers.items():
                    report = asyncio.run(loadtest(proc.url, prompts[r * args.requests:] + prompts, level, args.requests,
                                                  args.max_tokens, None, False, 1, warmup=2 if r == 0 else 0))
                    runs.setdefault((name, level), []).append(report["results"][0])
                    s = report["results"][0]
                    print(f"round {r} c={level} {name:9s}: {s['tokens_per_s']:.1f} tok/s, p50 {s['latency_p50_s']:.3f} s, ok {s['ok']}/{s['requests']}", flush=True)
    finally:
        for proc in servers.values():
            proc.stop()
    lines = ["| concurrency | path | tokens/s (median) | p50 latency s (median) | ok |", "|---|---|---|---|---|"]
    summary = []
    for level in levels:
        base = None
        for name in servers:
            results = runs[(name, level)]
            rate = statistics.median(r["tokens_per_s"] for r in results)
            p50 = statistics.median(r["latency_p50_s"] for r in results)
            ok = f"{sum(r['ok'] for r in results)}/{sum(r['requests'] for r in results)}"
            ratio = "" if base is None else f" ({rate / base[0]:.2f}x, p50 {p50 / base[1]:.2f}x)"
            base = base or (rate, p50)
            lines.append(f"| {level} | {name} | {rate:.1f}{ratio} | {p50:.3f} | {ok} |")
            summary.append({"concurrency": level, "path": name, "tokens_per_s": rate, "latency_p50_s": p50, "runs": results})
    table = "\n".join(lines)
    print(table)
    stamp = time.strftime("%Y-%m-%d")
    (out / "ray_overhead.json").write_text(json.dumps({"date": stamp, "command": " ".join(sys.argv), "levels": summary}, indent=1))
    (out / "ray_overhead.md").write_text(f"{stamp}, `python {' '.join(sys.argv)}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
