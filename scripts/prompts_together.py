"""Prompts arriving together: the chunked-prefill allowance for prompts waiting in numbers against
the plain allowance, side by side in one process.

    python scripts/prompts_together.py [--target T] [--proposer none] [--clients 4] [--waves 6]
        [--repeats 3] [--max-tokens 128] [--prompts FILE]

Closed-loop clients that fall into step send their prompts together, every time: each wave here
adds `--clients` prompts of the set at once and steps the engine until all are done. Beside one
stream's one-row rounds, the plain allowance (`--prefill-slowdown` times the rounds' cost) leaves
the other prompts a few rows a pass; the engine's rule (`Engine.chunk_budget`) gives prompts
waiting together (prompts + 1) / streams times it. The two rules take turns, all waves of a rule
in a row, the first rule alternating by repeat, on one engine with the prefix cache off (every
wave reads its prompts). Printed per rule: the median of its repeats' tokens/s, and over all
its requests the first token's p50 and max (from the wave's start) and the streams' gaps between
verified chunks, p50 and p99.

Defaults: the reference target in ../shared/models, verifier-only, the shared code prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from verispec.assemble import build_engine
from verispec.config.engine import SamplingParams
from verispec.config.loading import load_settings
from verispec.core.engine import Engine

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def plain(engine: Engine):
    """The allowance before: as for a lone prompt, however many wait."""
    return lambda round_rows, rounds, prompts: Engine.chunk_budget(engine, round_rows, rounds, min(prompts, 1))


def waves(engine: Engine, prompts: list[str], clients: int, count: int, params: SamplingParams) -> dict:
    ttft, gaps, tokens = [], [], 0
    started = time.perf_counter()
    for wave in range(count):
        sent = time.perf_counter()
        batch = prompts[(wave * clients) % len(prompts) :][:clients]
        requests = [engine.add(f"w{wave}-{i}", engine.encode(p), params, engine.speculation, engine.proposer) for i, p in enumerate(batch)]
        last: dict = {}
        while engine.busy:
            for request, delta in engine.step():
                now = time.perf_counter()
                if request in last:
                    gaps.append(now - last[request])
                else:
                    ttft.append(now - sent)
                last[request] = now
                tokens += len(delta.token_ids)
        assert all(r in last for r in requests)
    return {"tok_s": tokens / (time.perf_counter() - started), "ttft": ttft, "gaps": gaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(SHARED / "models" / "ref-code-target"))
    parser.add_argument("--proposer", default="none")
    parser.add_argument("--draft", default=None)
    parser.add_argument("--prompts", default=str(SHARED / "prompts" / "code-completion.jsonl"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--waves", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    flags = {"target": args.target, "proposer": args.proposer, "prefix_cache": False, "max_running": max(8, args.clients)}
    if args.draft:
        flags["draft"] = args.draft
    engine = build_engine(load_settings(flags))
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0)
    for prompt in prompts[-2:]:  # warm up, and measure the pass costs
        engine.generate(prompt, params)
    rules = {"together": engine.chunk_budget, "plain": plain(engine)}
    results: dict[str, list[dict]] = {name: [] for name in rules}
    for repeat in range(args.repeats):
        for name in list(rules)[:: 1 if repeat % 2 == 0 else -1]:
            engine.chunk_budget = rules[name]
            results[name].append(waves(engine, prompts, args.clients, args.waves, params))
            print(f"repeat {repeat + 1}, {name}: {results[name][-1]['tok_s']:.1f} tok/s", flush=True)

    print(f"\n{args.clients} prompts a wave, {args.waves} waves, {args.repeats} repeats; {args.target}, proposer {args.proposer}\n")
    print("| allowance | tok/s (median) | first token p50 / max (ms) | stream gaps p50 / p99 (ms) |")
    print("|---|---:|---:|---:|")
    for name, runs in results.items():
        ttft = [t * 1e3 for r in runs for t in r["ttft"]]
        gaps = [g * 1e3 for r in runs for g in r["gaps"]]
        print(
            f"| {name} | {statistics.median(r['tok_s'] for r in runs):.1f} | {statistics.median(ttft):.0f} / {max(ttft):.0f} "
            f"| {statistics.median(gaps):.1f} / {statistics.quantiles(gaps, n=100)[-1]:.1f} |"
        )


if __name__ == "__main__":
    main()
