"""Coupled (Gumbel-max, seeds that reproduce) against rejection sampling (speculative sampling's
rule) on the same prompts, seeds and proposers, interleaved in one run:

    python scripts/acceptance_rules.py [--target DIR] [--draft DIR] [--prompts N] [--depth K] [--temperature T ...]

For each proposer (the draft model, n-gram lookup) and temperature: acceptance per proposed
token, tokens per verifier call and median tokens/s of each rule, and how many seeded outputs of
each rule equal verifier-only sampling with the same seed (coupled: all of them, by construction;
rejection: only where the random draws happen to agree). Defaults: the reference pair with the
distilled draft, 16 prompts of the shared code-completion set, depth 4, 128 new tokens.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from verispec.assemble import build_engine
from verispec.config import SamplingParams, load_settings
from verispec.prompts import load_prompts
from verispec.proposers.ngram import NgramProposer
from verispec.stats import RequestStats

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(SHARED / "models/ref-code-target"))
    parser.add_argument("--draft", default=str(SHARED / "models/ref-code-draft-distilled"))
    parser.add_argument("--prompts-file", default=str(SHARED / "prompts/code-completion.jsonl"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0, 0.7])
    args = parser.parse_args()

    engine = build_engine(load_settings({"target": args.target, "draft": args.draft, "depth": args.depth}))
    proposers = {"draft model": engine.proposer, "n-gram": NgramProposer(4, 1)}
    prompts = load_prompts(Path(args.prompts_file), args.prompts)

    print(f"target {args.target}, depth {args.depth}, {len(prompts)} prompts, {args.max_new_tokens} new tokens")
    print("| proposer | temperature | rule | acceptance | tokens/verifier call | tokens/s (median) | = verifier-only sample |")
    print("|---|---|---|---|---|---|---|")
    for name, proposer in proposers.items():
        for temperature in args.temperature:
            stats = {rule: RequestStats() for rule in ("coupled", "rejection")}
            speed: dict[str, list[float]] = {rule: [] for rule in stats}
            same = dict.fromkeys(stats, 0)
            for i, prompt in enumerate(prompts):
                params = SamplingParams(temperature=temperature, seed=1000 + i, max_new_tokens=args.max_new_tokens)
                alone = engine.generate(prompt.text, params, depth=0, proposer=proposer).token_ids
                for rule in stats:  # interleaved, so machine drift hits both rules alike
                    ruled = params.model_copy(update={"sampled_acceptance": rule})
                    out = engine.generate(prompt.text, ruled, depth=args.depth, proposer=proposer)
                    stats[rule] = stats[rule].merge(out.stats)
                    speed[rule].append(out.stats.tokens_per_s or 0.0)
                    same[rule] += out.token_ids == alone
            for rule, s in stats.items():
                print(
                    f"| {name} | {temperature} | {rule} | {s.acceptance_rate:.3f} | {s.tokens_per_verifier_call:.2f} | "
                    f"{statistics.median(speed[rule]):.1f} | {same[rule]}/{len(prompts)} |"
                )


if __name__ == "__main__":
    main()
