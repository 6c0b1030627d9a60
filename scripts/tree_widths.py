"""Token trees against chains, width by width, in one run: what each (depth, width) gives in
verifier calls and in speed, with the widths held as asked (the engine otherwise narrows them by
the measured pass costs, `core/trees.py`):

    python scripts/tree_widths.py --draft DIR [--target DIR] [--prompts PROMPTS.jsonl] [--limit 12]
        [--max-new-tokens 128] [--shapes 4x1,4x2,4x3,6x1,6x2,6x3,8x2]

--draft is a draft model or a draft head (`verispec distill --head`). Greedy; every configuration
runs every prompt, one after another (configurations interleaved prompt by prompt, so that a
slower stretch of the machine falls on all of them), and each output is checked against
verifier-only. Quote figures from a quiet machine only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import verispec.core.trees as trees  # noqa: E402
from verispec.assemble import build_engine  # noqa: E402
from verispec.config import SamplingParams, Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(ROOT.parent / "shared/models/ref-code-target"))
    parser.add_argument("--draft", required=True)
    parser.add_argument("--prompts", default=str(ROOT.parent / "shared/prompts/code-completion.jsonl"))
    parser.add_argument("--limit", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--shapes", default="4x1,4x2,4x3,6x1,6x2,6x3,8x2", help="depth x width, comma-separated"
    )
    args = parser.parse_args()
    trees.TREE_SLOWDOWN = float("inf")  # every width as asked
    # No prefix cache: each prompt is run once per shape, and every run must read it (with the
    # cache, verifier-only, run first, read each prompt for the shapes after it).
    engine = build_engine(Settings(target=args.target, draft=args.draft, prefix_cache=False))
    engine.costs()
    prompts = [
        json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines()[: args.limit]
    ]
    shapes = [(0, 1)] + [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    rates = {shape: [] for shape in shapes}
    tokens = {shape: [0, 0] for shape in shapes}  # tokens, verifier calls
    outputs = {shape: [] for shape in shapes}
    for prompt in prompts:
        for depth, width in shapes:
            engine.speculation = engine.speculation.model_copy(update={"tree_width": width})
            started = time.perf_counter()
            out = engine.generate(prompt, params, depth=depth)
            rates[(depth, width)].append(len(out.token_ids) / (time.perf_counter() - started))
            tokens[(depth, width)][0] += len(out.token_ids)
            tokens[(depth, width)][1] += out.stats.rounds
            outputs[(depth, width)].append(out.token_ids)
    base = statistics.median(rates[(0, 1)])
    print(
        f"{args.target} with {args.draft}: {len(prompts)} prompts, {args.max_new_tokens} new tokens, greedy"
    )
    print("| depth | width | tokens per verifier call | tok/s (median) | x verifier-only | identical |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        rate = statistics.median(rates[shape])
        same = sum(a == b for a, b in zip(outputs[shape], outputs[(0, 1)], strict=True))
        print(f"| {shape[0]} | {shape[1]} | {tokens[shape][0] / tokens[shape][1]:.2f} | {rate:.1f} | "
              f"{rate / base:.2f}x | {same}/{len(prompts)} |")  # fmt: skip


if __name__ == "__main__":
    main()
