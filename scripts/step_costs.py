"""Step costs through the public API only, so it runs on any checkout of verispec (an older one
with `PYTHONPATH=/path/to/it`), for before/after comparisons side by side:

    python scripts/step_costs.py TARGET [DRAFT]

Prints the medians of a decode step and a width-5 verify pass of TARGET at context 400 and, with
DRAFT, of a draft token in a greedy proposal of 4 as the draft proposer makes it (catch-up on the
newly verified token included), and their ratios.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from verispec.config import SamplingParams
from verispec.models import load_model
from verispec.proposers.base import DraftPolicy
from verispec.proposers.draft import DraftModelProposer

CONTEXT, STEPS, WARM_UP = 400, 150, 10


def step_seconds(lm, width: int) -> float:
    session = lm.session()
    session.extend(list(range(1, CONTEXT + 1)))
    tokens, times = list(range(5, 5 + width)), []
    for _ in range(STEPS + WARM_UP):
        start = time.perf_counter()
        session.extend(tokens)
        times.append(time.perf_counter() - start)
        session.rollback(CONTEXT)
    return statistics.median(times[WARM_UP:])


def draft_token_seconds(draft, target_vocab: int, depth: int = 4) -> float:
    session = DraftModelProposer(draft, target_vocab).session()
    policy, prompt, times = DraftPolicy(SamplingParams()), list(range(1, CONTEXT + 1)), []
    for i in range(STEPS + WARM_UP):
        start = time.perf_counter()
        session.propose(prompt + [7 + i % 50], depth, policy)
        times.append(time.perf_counter() - start)
        session.kv.rollback(CONTEXT)
        del session.cached[CONTEXT:]
    return statistics.median(times[WARM_UP:]) / depth


def main() -> None:
    cpu, f32 = torch.device("cpu"), torch.float32
    target = load_model(sys.argv[1], cpu, f32)
    decode, verify = step_seconds(target, 1), step_seconds(target, 5)
    line = f"decode {decode * 1e3:.3f} ms, width-5 verify {verify * 1e3:.3f} ms ({verify / decode:.2f} decode steps)"
    if len(sys.argv) > 2:
        token = draft_token_seconds(load_model(sys.argv[2], cpu, f32, role="draft"), target.vocab_size)
        line += f", draft token {token * 1e3:.3f} ms ({token / decode:.3f} of a decode step)"
    print(line)


if __name__ == "__main__":
    main()
