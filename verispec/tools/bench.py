"""`verispec bench`: verispec against itself and against transformers, on one set of prompts.

Every configuration greedy-decodes the same token ids with the same models: verispec
verifier-only (the reference), verispec with the draft model (or draft head) at each depth under
test, with a second draft head (`--head`) at the same depths, verispec with the n-gram proposer, and transformers' own `generate()` (plain, assisted by the draft model,
prompt lookup). One warm-up call each is excluded; then, prompt by prompt, all configurations run
back to back with the starting one rotated, so machine drift and order effects hit all alike.
Every configuration is timed the same way, by wall clock around the call.

Derived figures. Times are taken per run, one (prompt, repeat), and reduced by their median over
the runs, so that one run slowed by the machine (a process descheduled on a shared core) moves no
figure; counts are summed over the runs. Every printed ratio is the ratio of the figures printed
beside it, never a statistic of per-run ratios:

    tokens/s              median of generated tokens / wall-clock seconds of the call
    speedup               tokens/s of the configuration / tokens/s of verispec verifier-only
    decode_tokens_per_s   median of generated tokens / (stats.total_s - stats.prefill_s): without the
                          prompt's prefill, which is the same for every configuration and which the
                          bound does not model; verispec only
    decode_speedup        decode_tokens_per_s of the configuration / that of verispec verifier-only
    acceptance_rate       accepted / proposed
    mean_accepted_tokens  generated tokens / verifier calls (accepted drafts + the verifier's token)
    a                     accepted / (accepted + recovered): the chance a draft position is accepted,
                          given the round got that far (each recovered token ends one rejection)
    E                     1 + sum over positions i >= 1 of P(a round proposed >= i drafts) * a**i:
                          tokens per round if acceptances were independent with rate a (Leviathan
                          et al. 2023: (1 - a**(k+1)) / (1 - a) when every round proposes k). The
                          proposal lengths are the observed ones (stats.proposed_by_position), so
                          an n-gram proposer that finds no match, or depth auto, is priced as it ran
    c                     median of (propose_s + verify_s) / rounds / the same median of verifier-only:
                          the cost of one round in verifier-only decoding steps
    bound_speedup         E / c: the decoding speedup this acceptance and round cost allow
    fraction_of_bound     decode_speedup / bound_speedup: what is lost to per-round overhead
                          (sampling, bookkeeping, detokenization) and to the gap between the
                          geometric model and the real acceptance pattern
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markdown import Markdown
from tqdm import tqdm

import verispec
from verispec.assemble import build_engine, resolve_models
from verispec.config import Depth, ModelSettings, SamplingParams, Settings
from verispec.core.engine import Engine
from verispec.errors import UserError
from verispec.models import resolve_device, resolve_dtype
from verispec.models.head import is_head, load_head
from verispec.prompts import load_prompts
from verispec.proposers import HeadProposer, NgramProposer
from verispec.proposers.base import Proposer
from verispec.proposers.names import PROPOSER_NAMES
from verispec.stats import RequestStats
from verispec.tools import check
from verispec.tools.settings import BenchOptions

DEFAULT_DEPTHS: tuple[Depth, ...] = BenchOptions.model_fields["depths"].default  # 1,2,4,6,8,auto
WARMUP_TOKENS = 8
VERIFIER_ONLY = "verispec verifier-only"


@dataclass(frozen=True)
class Run:
    token_ids: list[int]  # generated tokens only, EOS included when reached
    stats: RequestStats | None  # None for transformers peers


@dataclass
class Configuration:
    name: str
    engine: str  # "verispec" or "transformers"
    proposer: str  # "none" or a proposer's name (verispec/proposers/names.py)
    depth: Depth | None  # None where a fixed depth does not apply (transformers, assisted)
    run: Callable[[list[int], int], Run]  # (prompt ids, max new tokens) -> run
    rates: list[float] = field(default_factory=list)  # tokens/s per (prompt, repeat)
    outputs: dict[int, list[list[int]]] = field(default_factory=dict)  # prompt index -> ids per repeat
    runs: list[RequestStats] = field(default_factory=list)  # per (prompt, repeat); verispec only

    @property
    def stats(self) -> RequestStats | None:
        """Counts and times summed over all runs."""
        return functools.reduce(RequestStats.merge, self.runs) if self.runs else None


@dataclass
class Result:
    """One row of results.json; the first nine fields are the stable part of its shape."""

    name: str
    engine: str
    proposer: str
    depth: Depth | None
    tokens_per_s: float
    speedup_vs_verifier_only: float | None
    acceptance_rate: float | None
    mean_accepted_tokens: float | None
    identical_to_verifier_only: bool
    identical_count: int
    speedup_vs_peers: dict[str, float | None]
    acceptance_by_position: list[float]
    mean_depth: float | None
    seconds_per_token: dict[str, float] | None  # prefill, propose, verify, overhead (summed times)
    bound_speedup: float | None
    decode_tokens_per_s: float | None
    decode_speedup: float | None  # decode_tokens_per_s / verifier-only's
    fraction_of_bound: float | None
    repeat_share: float | None = None  # rounds drafted from the text's own repeat (`core/repeats.py`) over all


def parse_depths(raw: Sequence[Depth | str]) -> list[Depth]:
    """Depths to bench with the draft model, deduplicated; 0 is verifier-only, always run."""
    return [depth for depth in dict.fromkeys(check.parse_depths(list(raw), flag="--depths")) if depth != 0]


def verispec_configurations(
    engine: Engine, settings: Settings, depths: list[Depth], has_draft: bool, head: str | None = None
) -> list[Configuration]:
    def run_with(proposer: Proposer | None, depth: Depth) -> Callable[[list[int], int], Run]:
        def run(ids: list[int], n: int) -> Run:
            completion = engine.generate(ids, SamplingParams(max_new_tokens=n), depth=depth, proposer=proposer)
            return Run(completion.token_ids, completion.stats)

        return run

    # The same engine for every configuration: only the proposer differs.
    ngram = NgramProposer(settings.ngram_max, settings.ngram_min)
    extra = HeadProposer(load_head(head, engine.target)) if head else None
    engine.prepare([engine.proposer, ngram, extra])
    configs = [Configuration(VERIFIER_ONLY, "verispec", "none", 0, run_with(engine.proposer, 0))]
    if has_draft:
        kind = "head" if getattr(engine.proposer, "head_model", None) is not None else "draft"  # --draft may name a head
        configs += [Configuration(f"verispec {kind} depth={d}", "verispec", kind, d, run_with(engine.proposer, d)) for d in depths]
    if extra is not None:
        configs += [Configuration(f"verispec head depth={d}", "verispec", "head", d, run_with(extra, d)) for d in depths]
    configs += [Configuration(f"verispec ngram depth={d}", "verispec", "ngram", d, run_with(ngram, d)) for d in (4, "auto")]
    return configs


def peer_configurations(models: ModelSettings, tokenizer, device: torch.device, dtype: torch.dtype) -> list[Configuration]:
    """transformers' generate() on the same checkpoints, loaded on their own: the engine's backend
    may not be transformers at all."""
    from transformers import AutoModelForCausalLM

    def load(path: str):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    target = load(models.target)

    def run_with(**extra) -> Callable[[list[int], int], Run]:
        def run(ids: list[int], n: int) -> Run:
            input_ids = torch.tensor([ids], device=device)
            out = target.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=n,
                pad_token_id=tokenizer.eos_token_id, **extra,
            )
            return Run(out[0, len(ids):].tolist(), None)

        return run

    configs = [Configuration("transformers", "transformers", "none", None, run_with())]
    if models.draft and not is_head(models.draft):  # transformers has no use for a draft head
        configs.append(Configuration("transformers assisted", "transformers", "draft", None, run_with(assistant_model=load(models.draft))))
    configs.append(Configuration("transformers prompt-lookup", "transformers", "ngram", 5, run_with(prompt_lookup_num_tokens=5)))
    return configs


def _timed(config: Configuration, ids: list[int], n: int, cuda: bool) -> tuple[Run, float]:
    if cuda:
        torch.cuda.synchronize()  # kernels still queued from the previous call are not ours
    t0 = time.perf_counter()
    run = config.run(ids, n)
    if cuda:
        torch.cuda.synchronize()
    return run, time.perf_counter() - t0


def measure(configs: list[Configuration], prompts: list[list[int]], n: int, repeats: int, cuda: bool) -> None:
    for config in configs:  # warm-up (and the depth-auto cost calibration), not timed
        config.run(prompts[0], WARMUP_TOKENS)
    progress = tqdm(total=repeats * len(prompts) * len(configs), desc="bench", unit="run", file=sys.stderr)
    for repeat in range(repeats):
        for index, ids in enumerate(prompts):
            start = (repeat * len(prompts) + index) % len(configs)  # rotate so order effects cancel
            for config in configs[start:] + configs[:start]:
                run, seconds = _timed(config, ids, n, cuda)
                config.rates.append(len(run.token_ids) / seconds)
                config.outputs.setdefault(index, []).append(run.token_ids)
                if run.stats is not None:
                    config.runs.append(run.stats)
                progress.update()
    progress.close()


def analytic_bound(stats: RequestStats, cost: float | None) -> float | None:
    """E / c from the module docstring: `stats` summed over the runs, `cost` from round_cost."""
    if not stats.rounds or not cost:
        return None
    judged = stats.accepted + stats.recovered
    a = stats.accepted / judged if judged else 0.0
    expected = 1.0 + sum(count / stats.rounds * a ** (i + 1) for i, count in enumerate(stats.proposed_by_position))
    return expected / cost


def round_cost(runs: list[RequestStats], baseline_runs: list[RequestStats]) -> float | None:
    """c from the module docstring: median seconds per round over verifier-only's median."""
    return _ratio(_median(_round_s(s) for s in runs), _median(_round_s(s) for s in baseline_runs))


def _round_s(stats: RequestStats) -> float | None:
    return (stats.propose_s + stats.verify_s) / stats.rounds if stats.rounds else None


def _decode_rate(stats: RequestStats) -> float | None:
    """Generated tokens per second of decoding: the request's time less its prompt's prefill."""
    decode_s = stats.total_s - stats.prefill_s
    return stats.generated_tokens / decode_s if decode_s > 0 else None


def _median(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(configs: list[Configuration]) -> list[Result]:
    """One Result per configuration. Each ratio is computed here from the very figures the Result
    holds (and the table prints): never from per-run ratios, never from other statistics."""
    baseline = configs[0]
    base_rate = statistics.median(baseline.rates)
    base_decode = _median(_decode_rate(s) for s in baseline.runs)
    reference = {i: runs[0] for i, runs in baseline.outputs.items()}
    peers = [c for c in configs if c.engine == "transformers"]
    results = []
    for config in configs:
        rate = statistics.median(config.rates)
        identical = sum(all(ids == reference[i] for ids in runs) for i, runs in config.outputs.items())
        stats = config.stats
        decode = _median(_decode_rate(s) for s in config.runs)
        decode_speedup = _ratio(decode, base_decode)
        bound = analytic_bound(stats, round_cost(config.runs, baseline.runs)) if stats else None
        results.append(
            Result(
                name=config.name, engine=config.engine, proposer=config.proposer, depth=config.depth,
                tokens_per_s=rate, speedup_vs_verifier_only=_ratio(rate, base_rate),
                acceptance_rate=stats.acceptance_rate if stats else None,
                mean_accepted_tokens=stats.tokens_per_verifier_call if stats else None,
                identical_to_verifier_only=identical == len(reference), identical_count=identical,
                speedup_vs_peers={p.name: _ratio(rate, statistics.median(p.rates)) for p in peers},
                acceptance_by_position=stats.acceptance_by_position if stats else [],
                mean_depth=statistics.fmean(stats.depths) if stats and stats.depths else None,
                seconds_per_token=_time_split(stats) if stats else None,
                bound_speedup=bound, decode_tokens_per_s=decode, decode_speedup=decode_speedup,
                fraction_of_bound=_ratio(decode_speedup, bound),
                repeat_share=stats.repeat_rounds / stats.rounds if stats and stats.rounds else None,
            )
        )
    return results


def _time_split(stats: RequestStats) -> dict[str, float]:
    per_token = 1 / max(stats.generated_tokens, 1)
    overhead = stats.total_s - stats.prefill_s - stats.propose_s - stats.verify_s  # sampling, bookkeeping, text
    parts = {"prefill": stats.prefill_s, "propose": stats.propose_s, "verify": stats.verify_s, "overhead": overhead}
    return {name: seconds * per_token for name, seconds in parts.items()}


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def table_rows(results: list[Result], prompt_count: int) -> tuple[list[str], list[list[str]]]:
    header = [
        "configuration", "depth", "tokens/s", "speedup", "acceptance", "tokens/verifier call", "decode tokens/s",
        "decode speedup", "bound", "of bound", "repeat rounds", "identical",
    ]
    rows = [
        [
            r.name, "-" if r.depth is None else str(r.depth), f"{r.tokens_per_s:.1f}", _fmt(r.speedup_vs_verifier_only, ".2f", "x"),
            _fmt(r.acceptance_rate, ".3f"), _fmt(r.mean_accepted_tokens, ".2f"), _fmt(r.decode_tokens_per_s, ".1f"),
            _fmt(r.decode_speedup, ".2f", "x"), _fmt(r.bound_speedup, ".2f", "x"),
            _fmt(r.fraction_of_bound, ".0%"), _fmt(r.repeat_share, ".0%"), f"{r.identical_count}/{prompt_count}",
        ]
        for r in results
    ]
    return header, rows


def verdict(results: list[Result], prompt_count: int) -> str:
    differing = [r.name for r in results if not r.identical_to_verifier_only]
    if not differing:
        return f"Exactness: all {len(results)} configurations produced token-identical output on all {prompt_count} prompts."
    return f"Exactness: output differs from verispec verifier-only for: {', '.join(differing)}."


def markdown(results: list[Result], prompt_count: int, command: str) -> str:
    header, rows = table_rows(results, prompt_count)
    lines = [
        "# verispec bench", "", f"Command: `{command}`", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        "", "tokens/s: median over runs (one prompt, one repeat each), prompt prefill included; speedup: tokens/s "
        "over verispec verifier-only's. Decode tokens/s: the same median without the prefill; decode speedup: "
        "decode tokens/s over verifier-only's. Bound: the decode speedup the measured acceptance and round cost "
        "allow (see verispec/tools/bench.py); of bound: decode speedup / bound. Repeat rounds: the rounds "
        "drafted from the text's own repeat in place of the proposer (--repeat-match).",
        "", verdict(results, prompt_count), "",
    ]
    return "\n".join(lines)


def plot(path: Path, results: list[Result]) -> None:
    # The Agg canvas directly, not pyplot: no global backend state in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for i, proposer in enumerate(PROPOSER_NAMES):
        color = f"C{i}"
        mine = [r for r in results if r.engine == "verispec" and r.proposer == proposer]
        fixed = sorted((r.depth, r.speedup_vs_verifier_only) for r in mine if r.depth != "auto")
        if fixed:
            ax.plot(*zip(*fixed, strict=True), marker="o", color=color, label=f"verispec {proposer}")
        for r in mine:
            if r.depth == "auto":  # drawn where its depth settled on average
                ax.plot([r.mean_depth or 0], [r.speedup_vs_verifier_only], marker="*", markersize=15, color=color,
                        linestyle="none", label=f"verispec {proposer} auto (at its mean depth)")
    ax.axhline(1.0, color="gray", linestyle=":", label=VERIFIER_ONLY)
    peers = [r for r in results if r.engine == "transformers"]
    for i, r in enumerate(peers):
        ax.axhline(r.speedup_vs_verifier_only or 0, color=f"C{i + len(PROPOSER_NAMES)}", linestyle="--", label=r.name)
    ax.set_xlabel("depth (draft tokens per round)")
    ax.set_ylabel("speedup over verispec verifier-only")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never hides a point
    ax.grid(alpha=0.3)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def machine(engine: Engine, device: torch.device) -> dict:
    draft_lm = getattr(engine.proposer, "lm", None)
    return {
        "platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "target_backend": engine.target.backend,
        "draft_backend": draft_lm.backend if draft_lm is not None else None,
    }


def versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "verispec": verispec.__version__}


def run_bench(
    settings: Settings,
    prompts_path: Path,
    depths: Sequence[Depth | str] = DEFAULT_DEPTHS,
    repeats: int = 1,
    limit: int | None = None,
    out: Path = Path("bench-out"),
    peers: bool = True,
    command: str = "(called from Python)",
    head: str | None = None,
) -> int:
    """Bench every configuration; write results.json, results.md and speedup_vs_depth.png to `out`."""
    draft_depths = parse_depths(depths)
    if repeats < 1:
        raise UserError(f"--repeats must be 1 or more, got {repeats}")
    prompts = load_prompts(prompts_path, limit)
    console = Console(stderr=True)
    models = resolve_models(settings.part(ModelSettings))
    device, dtype = resolve_device(models.device), resolve_dtype(models.dtype)
    # Without the prefix cache: every configuration reads each prompt itself, as a lone request would.
    engine = build_engine(settings.model_copy(update={"prefix_cache": False}))
    notes = []
    if models.draft is None:
        notes.append(f"no draft model (proposer {models.proposer}): draft configurations and transformers assisted skipped")
    if head and not is_head(head):
        raise UserError(f"--head {head} is not a draft head's folder; make one with verispec distill --head")
    configs = verispec_configurations(engine, settings, draft_depths, has_draft=models.draft is not None, head=head)
    if peers:
        configs += peer_configurations(models, engine.tokenizer, device, dtype)
    for note in notes:
        console.print(f"[yellow]{note}[/]")

    prompt_ids = [engine.encode(p.text) for p in prompts]  # one tokenization: every configuration reads the same ids
    measure(configs, prompt_ids, settings.max_new_tokens, repeats, cuda=device.type == "cuda")
    results = summarize(configs)

    out.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {
            **settings.model_dump(mode="json"), "resolved_target": models.target, "resolved_draft": models.draft,
            "prompts": str(prompts_path), "prompt_count": len(prompts), "max_new_tokens": settings.max_new_tokens,
            "repeats": repeats, "depths": draft_depths, "peers": peers, "command": command, "head": head,
        },
        "versions": versions(),
        "machine": machine(engine, device),
        "notes": notes,
        "all_identical": all(r.identical_to_verifier_only for r in results),
        "results": [asdict(r) for r in results],
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(results, len(prompts), command)
    (out / "results.md").write_text(text)
    plot(out / "speedup_vs_depth.png", results)
    Console(width=max(Console().width, 160)).print(Markdown(text))  # wide: keep the table readable in CI logs
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'speedup_vs_depth.png'}")
    return 0

