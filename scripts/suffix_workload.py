"""The proposers side by side on a workload that repeats itself, in one run: verifier-only, prompt
lookup, the suffix cache, and where given a draft model (--draft) and a draft head (--head), each
with chains and with token trees (--tree-width):

    python scripts/suffix_workload.py [--target DIR_OR_FILE] [--prompts PROMPTS.jsonl] [--files 8]
        [--max-new-tokens 128] [--cut-lines 4] [--draft DIR] [--head DIR] [--tree-width 3]

Each of --files code windows is a file edited in turn, three requests in a row: the window as it
is, the window with its last --cut-lines lines cut (an edit near the end: the model writes them
again and goes on), and the window as it is once more (a retry, a regeneration). Every proposer
configuration runs the three requests of a file before the next configuration does (the first
configuration rotating from file to file), each with a pool of its own for the suffix cache, so it
has seen only what this workload showed it. Requests 2 and 3 are "warm": an earlier request said
much of what they will. Prints, per configuration, median tokens/s of the first (cold) and of the
warm requests, verifier calls per token, and whether every output equals verifier-only's.
Greedy; the lean backend's CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from verispec.assemble import build_engine
from verispec.config import SamplingParams, SpeculationSettings, load_settings
from verispec.models import load_model
from verispec.models.head import load_head
from verispec.proposers.draft import DraftModelProposer
from verispec.proposers.head import HeadProposer
from verispec.proposers.ngram import NgramProposer
from verispec.proposers.suffix import SuffixProposer

ROOT = Path(__file__).resolve().parents[1]


def edited(prompt: str, cut: int) -> str:
    lines = prompt.split("\n")
    return "\n".join(lines[: max(1, len(lines) - cut)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(ROOT.parent / "shared/models/ref-code-target"))
    parser.add_argument("--prompts", default=str(ROOT.parent / "shared/prompts/code-completion.jsonl"))
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--cut-lines", type=int, default=4)
    parser.add_argument("--draft", help="also a draft model (same tokenizer), depth auto")
    parser.add_argument("--head", help="also a draft head (verispec distill --head), depth auto")
    parser.add_argument("--tree-width", type=int, default=3, help="the draft model's and the head's token trees' width")
    args = parser.parse_args()
    engine = build_engine(load_settings({"target": args.target, "proposer": "none"}))
    speculation = SpeculationSettings()
    models = {}  # loaded once; they keep nothing from one request to the next
    if args.draft:
        lm = load_model(args.draft, engine.target.device, torch.float32, role="draft")
        models["draft model, depth auto"] = DraftModelProposer(lm, target_vocab_size=engine.target.vocab_size)
    if args.head:
        models["draft head, depth auto"] = HeadProposer(load_head(args.head, engine.target))
    windows = [
        json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines()[: args.files]
    ]
    configurations = {  # name: (depth, proposer, tree width)
        "verifier only": lambda: (0, None, 1),
        "n-gram, depth auto": lambda: ("auto", NgramProposer(speculation.ngram_max, speculation.ngram_min), 1),
        "suffix cache, depth auto": lambda: (
            "auto",
            SuffixProposer(speculation.suffix_cache_tokens, speculation.ngram_min),
            1,
        ),
        **{name: lambda proposer=proposer: ("auto", proposer, 1) for name, proposer in models.items()},
        **{
            f"{name.split(',')[0]}, trees of width {args.tree_width}": lambda proposer=proposer: ("auto", proposer, args.tree_width)
            for name, proposer in models.items()
        },
    }
    engine.prepare([proposer for _, proposer, _ in (make() for make in configurations.values()) if proposer])
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    rates = {name: {"cold": [], "warm": []} for name in configurations}
    calls = {name: [0, 0] for name in configurations}
    outputs: dict[str, list[list[int]]] = {name: [] for name in configurations}
    names = list(configurations)
    for index, window in enumerate(windows):
        requests = [window, edited(window, args.cut_lines), window]
        for name in names[index % len(names) :] + names[: index % len(names)]:
            depth, proposer, width = configurations[name]()  # a fresh pool per file and configuration
            engine.speculation = speculation.model_copy(update={"tree_width": width})
            for turn, prompt in enumerate(requests):
                ids = engine.tokenizer.encode(prompt)
                started = time.perf_counter()
                completion = engine.generate(ids, params, depth=depth, proposer=proposer)
                rate = len(completion.token_ids) / (time.perf_counter() - started)
                rates[name]["cold" if turn == 0 else "warm"].append(rate)
                calls[name][0] += completion.stats.rounds
                calls[name][1] += len(completion.token_ids)
                outputs[name].append(completion.token_ids)
    reference = outputs["verifier only"]
    base = {kind: statistics.median(rates["verifier only"][kind]) for kind in ("cold", "warm")}
    print(f"{args.target}: {len(windows)} files x 3 requests, {args.max_new_tokens} new tokens each, greedy")
    print(
        "| configuration | cold tok/s | x verifier-only | warm tok/s | x verifier-only | verifier calls per token | identical |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        cold, warm = (statistics.median(rates[name][kind]) for kind in ("cold", "warm"))
        same = sum(a == b for a, b in zip(outputs[name], reference, strict=True))
        print(f"| {name} | {cold:.1f} | {cold / base['cold']:.2f}x | {warm:.1f} | {warm / base['warm']:.2f}x | "
              f"{calls[name][0] / calls[name][1]:.3f} | {same}/{len(reference)} |")  # fmt: skip


if __name__ == "__main__":
    main()
