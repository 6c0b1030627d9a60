"""Drafts from the text's own repeats (`--repeat-match`, `core/repeats.py`) side by side, in one
run: each proposer with repeats off and at each match length asked, against verifier-only.

    python scripts/repeat_match.py [--target DIR] [--draft DIR] [--prompts PROMPTS.jsonl] [--limit 32]
        [--max-new-tokens 128] [--depth 4] [--matches 0,4,6,8] [--proposers draft,ngram]

--draft is a draft model or a draft head (`verispec distill --head`); "draft" in --proposers is
whichever it is. Greedy; every configuration runs every prompt, configurations interleaved prompt
by prompt (a slower stretch of the machine falls on all of them), and each output is checked
against verifier-only. Quote figures from a quiet machine only.
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

from verispec.assemble import build_engine  # noqa: E402
from verispec.config import SamplingParams, Settings  # noqa: E402
from verispec.proposers.ngram import NgramProposer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(ROOT.parent / "shared/models/ref-code-target"))
    parser.add_argument("--draft", default=None, help="a draft model or a draft head")
    parser.add_argument("--prompts", default=str(ROOT.parent / "shared/prompts/code-completion.jsonl"))
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--depth", default="4", help="the proposers' depth: an integer or auto")
    parser.add_argument(
        "--matches", default="0,4,6,8", help="--repeat-match values, comma-separated (0 = off)"
    )
    parser.add_argument("--proposers", default="draft,ngram", help="draft (--draft's model or head), ngram")
    args = parser.parse_args()
    depth = args.depth if args.depth == "auto" else int(args.depth)
    # No prefix cache: each prompt is run once per configuration, and every run must read it.
    engine = build_engine(Settings(target=args.target, draft=args.draft, prefix_cache=False))
    ngram = NgramProposer(engine.speculation.ngram_max, engine.speculation.ngram_min)
    proposers = {"draft": engine.proposer, "ngram": ngram}
    names = [name for name in args.proposers.split(",") if name != "draft" or args.draft]
    engine.prepare([proposers[name] for name in names])
    prompts = [
        json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines()[: args.limit]
    ]
    matches = [int(m) for m in args.matches.split(",")]
    configs = [("none", 0)] + [(name, m) for name in names for m in matches]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    rates = {c: [] for c in configs}
    counts = {c: [0, 0, 0] for c in configs}  # tokens, verifier calls, repeat rounds
    outputs = {c: [] for c in configs}
    for name, _ in configs:  # warm every proposer's caches and kernels before anything is timed
        engine.generate(
            prompts[0],
            SamplingParams(max_new_tokens=8),
            depth=0 if name == "none" else depth,
            proposer=proposers.get(name),
        )
    for prompt in prompts:
        for name, match in configs:
            engine.speculation = engine.speculation.model_copy(update={"repeat_match": match})
            proposer = None if name == "none" else proposers[name]
            started = time.perf_counter()
            out = engine.generate(prompt, params, depth=0 if name == "none" else depth, proposer=proposer)
            rates[(name, match)].append(len(out.token_ids) / (time.perf_counter() - started))
            for i, n in enumerate((len(out.token_ids), out.stats.rounds, out.stats.repeat_rounds)):
                counts[(name, match)][i] += n
            outputs[(name, match)].append(out.token_ids)
    base = statistics.median(rates[("none", 0)])
    drafter = engine.proposer.name if args.draft else "-"
    print(
        f"{args.target}, draft {drafter}: {len(prompts)} prompts, {args.max_new_tokens} new tokens, greedy, depth {args.depth}"
    )
    print(
        "| proposer | --repeat-match | tok/s (median) | x verifier-only | tokens per verifier call | repeat rounds | identical |"
    )
    print("|---|---|---|---|---|---|---|")
    for config in configs:
        rate, (tokens, calls, repeats) = statistics.median(rates[config]), counts[config]
        same = sum(a == b for a, b in zip(outputs[config], outputs[("none", 0)], strict=True))
        name = {"none": "verifier only", "draft": drafter}.get(config[0], config[0])
        print(f"| {name} | {config[1] if config[0] != 'none' else '-'} | {rate:.1f} | {rate / base:.2f}x | "
              f"{tokens / calls:.2f} | {repeats / calls:.0%} | {same}/{len(prompts)} |")  # fmt: skip


if __name__ == "__main__":
    main()
