"""Human-readable views of statistics (rich tables)."""

from __future__ import annotations

from rich.table import Table
from transformers import PreTrainedTokenizerBase

from verispec.core.rounds import TokenLogprob
from verispec.stats import RequestStats
from verispec.text import token_bytes


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def stats_table(stats: RequestStats, title: str | None = None, proposer: str | None = None) -> Table:
    """One row per figure; `proposer` (its name, or "none" for verifier-only) heads the rows,
    since every other figure means something different for a draft model, n-gram lookup or none."""
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right", overflow="fold")  # a draft's name is its path: wrap it, never cut it
    rows = [("proposer", proposer)] if proposer is not None else []
    rows += [
        ("prompt tokens", str(stats.prompt_tokens)),
        ("generated tokens", str(stats.generated_tokens)),
        ("rounds (verifier calls)", str(stats.rounds)),
        ("proposed", str(stats.proposed)),
        ("accepted", str(stats.accepted)),
        ("rejected", str(stats.rejected)),
        ("recovered", str(stats.recovered)),
        ("bonus", str(stats.bonus)),
        ("verifier-only rounds", str(stats.verifier_only)),
        ("acceptance rate", _fmt(stats.acceptance_rate, 3)),
        ("tokens per verifier call", _fmt(stats.tokens_per_verifier_call)),
        ("mean depth", _fmt(sum(stats.depths) / len(stats.depths) if stats.depths else None)),
        ("acceptance by position", " ".join(f"{a:.2f}" for a in stats.acceptance_by_position) or "-"),
        ("proposer failures / timeouts", f"{stats.proposer_failures} / {stats.proposer_timeouts}"),
        ("time prefill / propose / verify / total", f"{stats.prefill_s:.3f} / {stats.propose_s:.3f} / {stats.verify_s:.3f} / {stats.total_s:.3f} s"),
        ("tokens/s", _fmt(stats.tokens_per_s, 1)),
    ]
    if stats.seed is not None:
        rows.append(("seed", str(stats.seed)))
    for name, value in rows:
        table.add_row(name, value)
    return table


def logprobs_table(
    entries: list[TokenLogprob], tokenizer: PreTrainedTokenizerBase,
    title: str = "logprobs (verifier, after the request's bias and penalties)", first: int = 0,
) -> Table:
    """`generate --logprobs N`: each output token, its log-probability under the verifier, and the
    N most likely tokens at its position (`--prompt-logprobs N`: the prompt's, from position
    `first` = 1)."""
    vocab = token_bytes(tokenizer)
    table = Table(title=title)
    for column in ("#", "token", "logprob", "most likely"):
        table.add_column(column, justify="right" if column in ("#", "logprob") else "left")
    for i, entry in enumerate(entries, start=first):
        top = "  ".join(f"{vocab.text(t)!r} {lp:.3f}" for t, lp in entry.top)
        table.add_row(str(i), repr(vocab.text(entry.token)), f"{entry.logprob:.4f}", top)
    return table
