"""What `verispec loadtest` prints: the clients' figures as a rich table, and the `--table` mode's
cells, scenarios and summary as markdown."""

from __future__ import annotations

from collections.abc import Callable

from verispec.tools.loadtest.clients import _percentile, _ratio
from verispec.tools.loadtest.scenarios import CHUNKED_STREAMS
from verispec.tools.loadtest.settings import PROPOSERS


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    table = Table(title=f"{report['model']}: {report['concurrency']} concurrent streaming clients, "
                        f"{report['requests_per_configuration']} requests each, max_tokens {report['max_tokens']}")
    for column in ("configuration", "ok", "statuses", "p50 s", "p95 s", "p99 s", "TTFT p50 s", "TTFT p95 s", "tokens/s", "req/s"):
        table.add_column(column, justify="left" if column in ("configuration", "statuses") else "right")
    for r in report["results"]:
        statuses = " ".join(f"{k}x{v}" for k, v in r["status_counts"].items())
        table.add_row(r["name"], str(r["ok"]), statuses, f(r["latency_p50_s"]), f(r["latency_p95_s"]), f(r["latency_p99_s"]),
                      f(r["ttft_p50_s"]), f(r["ttft_p95_s"]), f(r["tokens_per_s"], 1), f(r["requests_per_s"], 2))
    console = Console(width=max(Console().width, 140))
    console.print(table)
    if len(report["results"]) == 2:
        a, b = report["results"]
        if a["tokens_per_s"] and b["tokens_per_s"]:
            console.print(f"{a['name']} / {b['name']}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                            f"p50 latency {b['latency_p50_s'] / a['latency_p50_s']:.2f}x lower" if a["latency_p50_s"] else "")
    if report.get("provisional"):
        console.print(provisional_table(report["results"], f))


def provisional_table(results: list[dict], f: Callable):
    """Time to first token, provisional (the first draft, unverified) beside verified, per configuration."""
    from rich.table import Table

    table = Table(title="time to first token: provisional (first draft token, unverified) vs verified; "
                        "ratio = provisional / verified, below 1 = drafts come first")
    columns = ("configuration", "streams with drafts", "provisional p50 s", "provisional p90 s",
               "verified p50 s", "verified p90 s", "ratio p50", "ratio p90")
    for column in columns:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for r in results:
        table.add_row(r["name"], f"{r['provisional_streams']}/{r['ok']}", f(r["provisional_p50_s"]), f(r["provisional_p90_s"]),
                      f(r["ttft_p50_s"]), f(r["ttft_p90_s"]),
                      _num(r["provisional_over_ttft_p50"], suffix="x"), _num(r["provisional_over_ttft_p90"], suffix="x"))
    return table


def reference_scheduler(schedulers: list[str]) -> str:
    """The scheduler whose verifier-only figures the speculation columns divide by."""
    return "batched" if "batched" in schedulers else schedulers[0]


def table_rows(cells: list[dict]) -> list[dict]:
    """One row per (concurrency, proposer, scheduler): the median of its runs' figures (one run
    without --repeats), with its ratio columns: tok/s over the interleaved scheduler's (same
    concurrency, proposer and run) and over the reference scheduler's verifier-only (same
    concurrency and run), each the median of the runs' ratios, so that a run's drift divides out."""
    schedulers = list(dict.fromkeys(c["scheduler"] for c in cells))
    ref = reference_scheduler(schedulers) if schedulers else "batched"
    rate = {(c["concurrency"], c["proposer"], c["scheduler"], c.get("repeat", 0)): c["summary"]["tokens_per_s"] for c in cells}
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["concurrency"], c["proposer"], c["scheduler"]), []).append(c)
    rows = [_row(key, runs, rate, ref) for key, runs in groups.items()]
    rows.sort(key=lambda r: (r["concurrency"], PROPOSERS.index(r["proposer"]) if r["proposer"] in PROPOSERS else 9,
                             r["proposer"], r["scheduler"]))
    return rows


def _row(key: tuple, runs: list[dict], rate: dict, ref: str) -> dict:
    concurrency, proposer, scheduler = key

    def median(field: str) -> float | None:
        return _median([r["summary"][field] for r in runs])

    def over(other: tuple) -> float | None:  # the median of the runs' ratios to `other`'s same run
        return _median([_ratio(r["summary"]["tokens_per_s"], rate.get((*other, r.get("repeat", 0)))) for r in runs])

    return {
        "concurrency": concurrency, "proposer": proposer, "scheduler": scheduler,
        "tokens_per_s": median("tokens_per_s"), "runs": [r["summary"]["tokens_per_s"] for r in runs],
        "x_interleaved": over((concurrency, proposer, "interleaved")),
        "x_verifier_only": over((concurrency, "none", ref)),
        "latency_p50_s": median("latency_p50_s"), "latency_p99_s": median("latency_p99_s"),
        "ttft_p50_s": median("ttft_p50_s"), "itl_p50_s": median("itl_p50_s"), "itl_p99_s": median("itl_p99_s"),
        "ok": sum(r["summary"]["ok"] for r in runs), "requests": sum(r["summary"]["requests"] for r in runs),
    }


def _median(values: list[float | None]) -> float | None:
    """The median of the values the runs gave (None where a run gave none)."""
    return _percentile([v for v in values if v is not None], 50)


def _num(value: float | None, digits: int = 2, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{suffix}"


def render_table(cells: list[dict]) -> str:
    """The cells as a markdown table; with --repeats, a column of each row's runs."""
    schedulers = list(dict.fromkeys(c["scheduler"] for c in cells))
    ref = reference_scheduler(schedulers) if schedulers else "batched"
    rows = table_rows(cells)
    repeated = any(len(r["runs"]) > 1 for r in rows)
    head = ["concurrency", "proposer", "scheduler", "tok/s" + (" (median)" if repeated else ""),
            *(["tok/s of each run"] if repeated else []), "x interleaved", f"x {ref} verifier-only",
            "latency p50/p99 (s)", "TTFT p50 (ms)", "ITL p50/p99 (ms)", "ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i not in (1, 2) else "---" for i in range(len(head))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["concurrency"]), r["proposer"], r["scheduler"], _num(r["tokens_per_s"], 1),
            *([", ".join(_num(x, 1) for x in r["runs"])] if repeated else []),
            _num(r["x_interleaved"], suffix="x"), _num(r["x_verifier_only"], suffix="x"),
            f"{_num(r['latency_p50_s'])} / {_num(r['latency_p99_s'])}", _num(r["ttft_p50_s"], 0, 1000),
            f"{_num(r['itl_p50_s'], 1, 1000)} / {_num(r['itl_p99_s'], 1, 1000)}", f"{r['ok']}/{r['requests']}",
        ]) + " |")
    return "\n".join(lines)


def summary_lines(report: dict) -> list[str]:
    rows = {(r["concurrency"], r["proposer"], r["scheduler"]): r for r in table_rows(report["cells"])}
    schedulers = list(dict.fromkeys(s for _, _, s in rows))
    levels = list(dict.fromkeys(c for c, _, _ in rows))
    proposers = list(dict.fromkeys(p for _, p, _ in rows))
    lines = []
    c4 = rows[(4, "none", "batched")]["x_interleaved"] if (4, "none", "batched") in rows else None
    lines.append("- verifier-only, concurrency 4, batched / interleaved tok/s: "
                 + (f"{c4:.2f}x" if c4 is not None else "n/a (needs level 4, proposer none and both schedulers)"))
    if schedulers:
        ref = reference_scheduler(schedulers)
        parts = []
        for c in levels:
            ratios = [f"{p} {_num(rows[(c, p, ref)]['x_verifier_only'] if (c, p, ref) in rows else None, suffix='x')}"
                      for p in proposers if p != "none"]
            if ratios:
                parts.append(f"c{c}: " + ", ".join(ratios))
        lines.append(f"- speculation / verifier-only tok/s, {ref} scheduler: " + ("; ".join(parts) or "n/a (no proposer but none)"))
    for s in report.get("scenarios", {}).get("prefix", []):
        cached = s["median_cached_tokens_b"]
        lines.append(f"- prefix, {s['scheduler']}: median TTFT A / TTFT B {_num(s['median_ttft_ratio'], suffix='x')}"
                     + (f", B's cached_tokens {cached:g}" if cached is not None else ", cached_tokens not reported"))
    for s in report.get("scenarios", {}).get("chunked", []):
        lines.append(f"- chunked, {s['scheduler']}: running streams' ITL p99 while the long prompt waits for its first "
                     f"token / median ITL {_num(s['window_p99_over_median'], suffix='x')} (target: at most 3x on batched); "
                     f"whole streams p99/median {_num(s['stream_p99_over_median'], suffix='x')}")
    return lines


def render_report(report: dict) -> str:
    c = report["config"]
    out = [f"## verispec loadtest --table: {report['model']}",
           "", f"Greedy streaming completions, max_tokens {c['max_tokens']}, requests per cell "
               f"{c['requests'] or 'max(8, 4 x concurrency)'}, schedulers run back to back per cell, order alternating.",
           "", render_table(report["cells"])]
    prefix = report.get("scenarios", {}).get("prefix")
    if prefix:
        out += ["", "### prefix: A = prefix + tail A, then B = same prefix + tail B", "",
                "| scheduler | prompt tokens (A) | TTFT A (ms) | TTFT B (ms) | TTFT A / B | cached tokens (B) |", "|---|---:|---:|---:|---:|---:|"]
        for s in prefix:
            for r in s["rounds"]:
                out.append(f"| {s['scheduler']} | {r['prompt_tokens_a'] if r['prompt_tokens_a'] is not None else '-'} | "
                           f"{_num(r['ttft_a_s'], 0, 1000)} | {_num(r['ttft_b_s'], 0, 1000)} | {_num(r['ttft_ratio'], suffix='x')} | "
                           f"{r['cached_tokens_b'] if r['cached_tokens_b'] is not None else '-'} |")
    chunked = report.get("scenarios", {}).get("chunked")
    if chunked:
        out += ["", f"### chunked: a long prompt arrives among {CHUNKED_STREAMS} running verifier-only streams", "",
                "| scheduler | long prompt tokens | its TTFT (ms) | window ITL median / p99 (ms) | stream ITL median / p99 (ms) "
                "| window p99 / median | stream p99 / median |", "|---|---:|---:|---:|---:|---:|---:|"]
        for s in chunked:
            out.append(f"| {s['scheduler']} | {s['long_prompt_tokens'] if s['long_prompt_tokens'] is not None else '-'} | "
                       f"{_num(s['long_ttft_s'], 0, 1000)} | "
                       f"{_num(s['window_itl_median_s'], 1, 1000)} / {_num(s['window_itl_p99_s'], 1, 1000)} | "
                       f"{_num(s['itl_median_s'], 1, 1000)} / {_num(s['itl_p99_s'], 1, 1000)} | "
                       f"{_num(s['window_p99_over_median'], suffix='x')} | {_num(s['stream_p99_over_median'], suffix='x')} |")
    out += ["", "### summary", "", *summary_lines(report)]
    return "\n".join(out) + "\n"
