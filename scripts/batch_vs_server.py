"""`verispec batch` against the same prompts through `verispec serve` at the same concurrency,
side by side on one machine (rounds alternate between the two).

    python scripts/batch_vs_server.py [--requests 64] [--concurrency 8] [--max-tokens 64] [--rounds 2]

The batch job keeps --concurrency requests in its batched core (its --max-running); the server
runs with the same --max-running and gets --concurrency streaming clients (verispec loadtest). Both
decode greedily with the server's defaults (the built-in demo pair, proposer auto). The batch
job's tokens/s counts from its first request (its model load excluded, as the server's is). The
prefix cache is off on both sides (see below).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
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
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scale-out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batch-vs-server-"))
    prompts = default_prompts()[: args.requests]
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "any", "prompt": p.text, "max_tokens": args.max_tokens, "temperature": 0}}
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    batch_input = work / "input.jsonl"
    batch_input.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # No prefix cache on either side: the server would otherwise keep every prompt's KV from the
    # previous round, while each batch job starts cold, and prefill is most of this workload's work.
    server = ServerProcess(["--audit-url", "none", "--log-level", "warning", "--max-running", str(args.concurrency),
                            "--no-prefix-cache"], log_dir=work)
    rates: dict[str, list[float]] = {"batch": [], "server": []}
    try:
        server.wait_ready(600)
        asyncio.run(loadtest(server.url, prompts, args.concurrency, args.concurrency, args.max_tokens, None, False, 1, warmup=0))
        for r in range(args.rounds):
            output, summary = work / f"out{r}.jsonl", work / f"summary{r}.json"
            command = [sys.executable, "-m", "verispec.cli", "batch", str(batch_input), "--output", str(output),
                       "--summary", str(summary), "--max-running", str(args.concurrency), "--no-prefix-cache"]  # fmt: skip
            subprocess.run(command, check=True, capture_output=True, timeout=1800)
            done = json.loads(summary.read_text())
            rates["batch"].append(done["tokens_per_s"])
            report = asyncio.run(loadtest(server.url, prompts, args.concurrency, len(prompts), args.max_tokens, None, False, 1, warmup=0))
            rates["server"].append(report["results"][0]["tokens_per_s"])
            print(f"round {r}: batch {rates['batch'][-1]:.1f} tok/s ({done['completion_tokens']} tokens), "
                  f"server {rates['server'][-1]:.1f} tok/s ({report['results'][0]['generated_tokens']} tokens)", flush=True)
    finally:
        server.stop()
    batch, served = statistics.median(rates["batch"]), statistics.median(rates["server"])
    table = (f"| path | tokens/s (median of {args.rounds}) |\n|---|---|\n| verispec batch, {args.concurrency} in the core | {batch:.1f} "
             f"({batch / served:.2f}x) |\n| verispec serve, {args.concurrency} streaming clients | {served:.1f} |")
    print(table)
    stamp = time.strftime("%Y-%m-%d")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_vs_server.json").write_text(json.dumps({"date": stamp, "command": " ".join(sys.argv), "rates": rates}, indent=1))
    (args.out / "batch_vs_server.md").write_text(f"{stamp}, `python {' '.join(sys.argv)}`, {len(prompts)} prompts, max_tokens {args.max_tokens}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
