"""`verispec check`: is the speculative output the verifier's own, prompt by prompt?

Every prompt is greedy-decoded verifier-only (depth 0) and then at each depth under test, one
after the other, so machine drift hits all configurations alike; with `sampled` (the default) it
is decoded again sampled with a seed of its own (temperature 1), where the coupled acceptance rule
must give the verifier-only sample at every depth. The request's controls (penalties, bias, a
token floor) apply to both. Any difference fails the check and is shown with the verifier's top-2
logit gap at that position: a gap near zero means a near-tie that floating-point noise can flip;
a large gap means a real bug.

Speed: tokens/s is the median over prompts, and a depth's speedup is its tokens/s over
verifier-only's, the two figures printed beside it. Not the median of per-prompt ratios: with few
prompts that is their mean, and one verifier-only run slowed by the machine inflates it.
"""

from __future__ import annotations

import json
import statistics
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from verispec.assemble import build_engine
from verispec.config import Depth, SamplingParams, Settings, SpeculationSettings
from verispec.core.engine import Engine
from verispec.errors import UserError
from verispec.prompts import Prompt, load_prompts
from verispec.stats import RequestStats


@dataclass
class Mismatch:
    prompt_id: str
    position: int  # index into the generated tokens
    verifier_token: int | None  # None: the output ended here
    speculative_token: int | None
    verifier_top2_gap: float | None  # logit gap of the verifier's top two tokens at that position


@dataclass
class DepthResult:
    depth: Depth
    identical: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    tokens_per_s: list[float] = field(default_factory=list)  # per prompt

    @property
    def median_tokens_per_s(self) -> float:
        return statistics.median(self.tokens_per_s)

    def speedup(self, verifier_only: DepthResult) -> float | None:
        """This depth's median tokens/s over verifier-only's: the ratio of the two printed figures."""
        base = verifier_only.median_tokens_per_s
        return self.median_tokens_per_s / base if base else None

    def summary(self, verifier_only: DepthResult) -> dict:
        return {
            "depth": self.depth,
            "identical": self.identical,
            "mismatches": [m.__dict__ for m in self.mismatches],
            "acceptance_rate": self.stats.acceptance_rate,
            "tokens_per_verifier_call": self.stats.tokens_per_verifier_call,
            "median_tokens_per_s": self.median_tokens_per_s,
            "speedup": self.speedup(verifier_only),  # median_tokens_per_s / verifier-only's
            "stats": self.stats.summary(),
        }


def parse_depths(raw: list[Depth | str], flag: str = "--depth") -> list[Depth]:
    depths: list[Depth] = []
    for item in raw:
        try:
            depths.append(SpeculationSettings(depth=item).depth)
        except ValidationError:
            raise UserError(f"{flag}: {item!r} is not a depth; use integers >= 0 or auto, e.g. {flag} 2,4,auto") from None
    return depths


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_gap(engine: Engine, context: list[int]) -> float:
    """Verifier's top-1 minus top-2 logit after `context`, from one fresh prefill."""
    logits = engine.target.session().extend(context, last_only=True)[-1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def run_check(
    settings: Settings,
    prompts_path: Path,
    depths: Sequence[Depth | str] | None = None,
    limit: int | None = None,
    report: Path | None = None,
    sampled: bool = True,
) -> int:
    prompts = load_prompts(prompts_path, limit)
    depths_under_test = parse_depths(list(depths)) if depths else [settings.depth]
    engine = build_engine(settings)
    console = Console(stderr=True)
    if engine.proposer is None:
        console.print("[yellow]proposer is 'none': every depth decodes verifier-only[/]")
    controls = settings.part(SamplingParams).model_dump(exclude={"temperature", "top_k", "top_p", "seed", "stop"})
    modes = {"greedy": SamplingParams(**controls, temperature=0.0)}
    if sampled:
        modes["sampled"] = SamplingParams(**controls, temperature=1.0)

    for depth in [0, *depths_under_test]:  # warm-up, excluded from timing
        engine.generate(prompts[0].text, SamplingParams(max_new_tokens=8), depth=depth)

    baselines = {mode: DepthResult(depth=0) for mode in modes}
    results = {mode: [DepthResult(depth=d) for d in depths_under_test] for mode in modes}
    for prompt in tqdm(prompts, desc="checking", unit="prompt", file=sys.stderr):
        for mode, params in modes.items():
            if not params.greedy:  # a seed of the prompt's own, the same in every run
                params = params.model_copy(update={"seed": zlib.crc32(prompt.id.encode())})
            _check_prompt(engine, prompt, params, baselines[mode], results[mode])

    for mode in modes:
        _print(console, prompts, baselines[mode], results[mode], engine, mode)
    failed = sum(len(r.mismatches) for rows in results.values() for r in rows)
    if failed:
        console.print(f"[red]{failed} mismatching output(s)[/]")
    else:
        console.print(f"[green]all {len(prompts)} prompts identical at every depth checked ({', '.join(modes)})[/]")
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "settings": settings.model_dump(mode="json"),
            "prompts": str(prompts_path),
            "prompt_count": len(prompts),
            "verifier_only": {"median_tokens_per_s": baselines["greedy"].median_tokens_per_s},
            "depths": [r.summary(baselines["greedy"]) for r in results["greedy"]],
        }
        if sampled:
            summary["sampled"] = {
                "verifier_only": {"median_tokens_per_s": baselines["sampled"].median_tokens_per_s},
                "depths": [r.summary(baselines["sampled"]) for r in results["sampled"]],
            }
        report.write_text(json.dumps(summary, indent=2))
    return 1 if failed else 0


def _check_prompt(
    engine: Engine, prompt: Prompt, params: SamplingParams, baseline: DepthResult, results: list[DepthResult]
) -> None:
    reference = engine.generate(prompt.text, params, depth=0)
    baseline.tokens_per_s.append(reference.stats.tokens_per_s or 0.0)
    for result in results:
        candidate = engine.generate(prompt.text, params, depth=result.depth)
        result.stats = result.stats.merge(candidate.stats)
        result.tokens_per_s.append(candidate.stats.tokens_per_s or 0.0)
        position = first_difference(reference.token_ids, candidate.token_ids)
        if position is None:
            result.identical += 1
            continue
        context = engine.encode(prompt.text) + reference.token_ids[:position]
        result.mismatches.append(
            Mismatch(
                prompt_id=prompt.id,
                position=position,
                verifier_token=reference.token_ids[position] if position < len(reference.token_ids) else None,
                speculative_token=candidate.token_ids[position] if position < len(candidate.token_ids) else None,
                verifier_top2_gap=top2_gap(engine, context),
            )
        )


def _print(
    console: Console, prompts: list[Prompt], baseline: DepthResult, results: list[DepthResult], engine: Engine,
    mode: str = "greedy",
) -> None:
    proposer = engine.proposer.name if engine.proposer else "none"
    table = Table(
        title=f"verispec check ({mode}): {len(prompts)} prompts, target {engine.target.name}, proposer {proposer}",
        caption="speedup: tokens/s (median over prompts) over verifier-only's",
    )
    for column in ("depth", "identical", "acceptance", "tokens/verifier call", "tokens/s (median)", "speedup"):
        table.add_column(column, justify="right")
    table.add_row("0 (verifier-only)", "-", "-", "1.00", f"{baseline.median_tokens_per_s:.1f}", "1.00x")
    for r in results:
        acceptance, speedup = r.stats.acceptance_rate, r.speedup(baseline)
        table.add_row(
            str(r.depth),
            f"{r.identical}/{len(prompts)}",
            "-" if acceptance is None else f"{acceptance:.3f}",
            f"{r.stats.tokens_per_verifier_call or 0:.2f}",
            f"{r.median_tokens_per_s:.1f}",
            "-" if speedup is None else f"{speedup:.2f}x",
        )
    Console(width=max(Console().width, 120)).print(table)  # keep the table readable in CI logs
    decode = engine.tokenizer.decode
    for r in results:
        for m in r.mismatches:
            verifier = "end of output" if m.verifier_token is None else f"{decode([m.verifier_token])!r} (id {m.verifier_token})"
            speculative = (
                "end of output" if m.speculative_token is None else f"{decode([m.speculative_token])!r} (id {m.speculative_token})"
            )
            console.print(
                f"[red]MISMATCH[/] ({mode}) prompt {m.prompt_id}, depth {r.depth}: first difference at new token {m.position}: "
                f"verifier-only {verifier}, speculative {speculative}; verifier top-2 logit gap {m.verifier_top2_gap:.2e}"
            )
