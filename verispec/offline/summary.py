"""What a batch job did: per-request results, their totals, a progress bar and the summary.

The speedup over verifier-only is priced as the server's cost counters price it
(`server/scheduler.py`, `_observe` and `_account`): the job's tokens verifier-only cost one
measured one-token verifier step each (`engine.costs().verify(1)`, as `Service.load` measures it),
plus their prompts' prefill, which both ways pay alike; the actual cost is the engine's busy time
for the same requests (prefill, propose and verify seconds of their `RequestStats`). A pass's
time is shared among its requests, so the figure includes what batching saves: it compares
against decoding one request at a time without a proposer.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Result:
    """One request's answer, and what it adds to the job's figures (0 for refused requests)."""

    name: str  # the request, for messages: its custom_id, or its line number where it names none
    line: str  # the output line, newline included
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    busy_s: float = 0.0  # engine time: prefill + propose + verify
    verifier_only_s: float = 0.0  # the same tokens verifier-only: one-token steps + prefill

    @classmethod
    def from_row(cls, row: dict) -> Result:
        """From a Ray Data row (numpy scalars) back to plain values."""
        kinds = {"str": str, "int": int, "float": float}
        return cls(**{f.name: kinds[f.type](row[f.name]) for f in fields(cls)})


@dataclass
class Tally:
    total: int = 0  # request lines in the input
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # answered by an earlier run
    prompt_tokens: int = 0
    completion_tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    busy_s: float = 0.0
    verifier_only_s: float = 0.0

    def add(self, result: Result) -> None:
        if result.status == 200:
            self.ok += 1
        else:
            self.failed += 1
        for name in ("prompt_tokens", "completion_tokens", "proposed", "accepted", "busy_s", "verifier_only_s"):
            setattr(self, name, getattr(self, name) + getattr(result, name))

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def speedup(self) -> float | None:
        return self.verifier_only_s / self.busy_s if self.busy_s > 0 and self.verifier_only_s > 0 else None

    def summary(self, wall_s: float, load_s: float | None, settings: dict) -> dict:
        """JSON-ready: counts, tokens, rates, and the settings that produced them."""
        return {
            "requests": {"total": self.total, "ok": self.ok, "failed": self.failed, "skipped": self.skipped},
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "load_s": load_s,
            "wall_s": wall_s,
            "tokens_per_s": self.completion_tokens / wall_s if wall_s > 0 else None,
            "engine_busy_s": self.busy_s,
            "verifier_only_s": self.verifier_only_s,
            "speedup_vs_verifier_only": self.speedup,
            "settings": settings,
        }


def render(summary: dict, output: Path) -> str:
    def f(value, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    r = summary["requests"]
    load = "Ray actors' start included" if summary["load_s"] is None else f"after {f(summary['load_s'], 1)}s loading the models"
    return "\n".join([
        f"verispec batch: {r['total']} requests: {r['ok']} ok, {r['failed']} failed, {r['skipped']} skipped (already done)",
        f"  tokens: {summary['prompt_tokens']} prompt, {summary['completion_tokens']} completion; "
        f"acceptance rate {f(summary['acceptance_rate'])} ({summary['accepted']} of {summary['proposed']} drafts)",
        f"  wall {f(summary['wall_s'], 1)}s ({load}): {f(summary['tokens_per_s'], 1)} tokens/s",
        f"  speedup over verifier-only, one request at a time (engine-measured): {f(summary['speedup_vs_verifier_only'])}x",
        f"  output: {output}",
    ])  # fmt: skip


def write_summary(summary: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")


class Progress:
    """A progress bar over the pending requests with tokens/s and the acceptance rate (on a
    terminal only: tqdm turns itself off when stderr is not one)."""

    def __init__(self, pending: int, tally: Tally):
        from tqdm import tqdm

        self.tally = tally
        self.bar = tqdm(total=pending, unit="req", file=sys.stderr, disable=None, dynamic_ncols=True, mininterval=0.5)

    def begin(self) -> None:
        """The models are loaded: the clock (and tokens/s) starts now."""
        self.bar.reset()

    def update(self) -> None:
        bar = self.bar
        if bar.disable:
            return
        elapsed = bar.format_dict["elapsed"]
        rate = self.tally.completion_tokens / elapsed if elapsed > 0 else 0.0
        acceptance = self.tally.acceptance_rate
        bar.set_postfix_str(f"{rate:.0f} tok/s, acceptance {'-' if acceptance is None else f'{acceptance:.2f}'}", refresh=False)
        bar.update(1)

    def close(self) -> None:
        self.bar.close()
