"""What a verify round weighs on the wire: greedy rounds carry drafts only, sampled rounds also the
distribution each draft was drawn from (its support, cut to the client's `support` tokens).

    python scripts/edge_round_bytes.py [--prompts 6] [--max-tokens 64] [--depth 4]

Starts `verispec serve --proposer none` (the built-in demo pair) and runs the edge client with the
demo draft, greedy and sampled, on the shared code-completion prompts; prints bytes per round
(request and answer bodies), acceptance and round trips per request, medians over the prompts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import ServerProcess  # noqa: E402
from verispec.cli import DEMO_PROMPTS  # noqa: E402
from verispec.edge import EdgeClient  # noqa: E402
from verispec.models.loading import demo_pair  # noqa: E402
from verispec.prompts import load_prompts  # noqa: E402

SHARED = ROOT.parent / "shared" / "prompts" / "code-completion.jsonl"
CASES = {
    "greedy": {"temperature": 0.0},
    "sampled, temperature 0.8": {"temperature": 0.8},
    "sampled, temperature 0.8, top_k 8": {"temperature": 0.8, "top_k": 8},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    prompts = [p.text for p in load_prompts(SHARED if SHARED.exists() else DEMO_PROMPTS)][: args.prompts]
    server = ServerProcess(["--proposer", "none", "--audit-url", "none"]).wait_ready()
    try:
        model = "verispec-demo-code"
        print("| case | bytes per round | acceptance | round trips per request |\n|---|---|---|---|")
        for name, sampling in CASES.items():
            client = EdgeClient.with_draft(server.url, demo_pair()[1], model=model, depth=args.depth)
            rounds, accepted, trips = [], [], []
            for seed, prompt in enumerate(prompts):
                client.generate(prompt, max_tokens=args.max_tokens, seed=seed, **sampling)
                rounds.append(client.last.bytes_per_round)
                accepted.append(client.last.acceptance_rate or 0.0)
                trips.append(client.last.round_trips)
            print(f"| {name} | {statistics.median(rounds):.0f} | {statistics.median(accepted):.2f} | {statistics.median(trips):.1f} |")
    finally:
        server.stop_gracefully()
    return 0


if __name__ == "__main__":
    sys.exit(main())
