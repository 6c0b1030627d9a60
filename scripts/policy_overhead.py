"""What the policy gate costs: per token in isolation, and end to end on a streaming server.

    python scripts/policy_overhead.py [--lengths 64,256,1024] [--repeats 5] [--rounds 4] [--requests 6] [--threads N] [--out docs/policy]
    python scripts/policy_overhead.py --skip-e2e          # the micro figures only, in seconds

(a) Micro: real text (the shared prompt set's prompts, or stdlib windows where it is absent) cut into
the demo tokenizer's tokens, cut again into responses of each length, and fed one token at a time
through `PolicySet.gate()`: `feed` per token, `finish` at the end, as the server does per round (a
round brings one token or more, so one token a feed is the most calls). Three policies: the example
rules file, fifty blocking terms, and the example's checker alone. Median over repeats, per token and
per 1,000 characters of output. Length matters: checkers see the whole text after every feed, so
their cost per token grows with the response.

(b) End to end: two `verispec serve` processes with the demo pair, one with `--policy` (the example
file) and one without, answer the same greedy streaming /v1/completions requests in alternating
rounds, one client at a time. Reported: the paired per-round ratios (policy / plain) of tokens/s,
time to first text and p50 latency. The gate holds back the last characters a blocking rule could
still claim (32 for the example), so the first text reaches the client a few tokens later.

On a machine shared with other work, pass `--threads 1`: model threads that spin-wait for a busy
core stall now and then for seconds, and the ratios drown in it.

Writes policy_overhead.json (every figure and the command) and policy_overhead.md (the tables).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import ServerProcess, metric  # noqa: E402
from verispec.models import load_tokenizer  # noqa: E402
from verispec.models.loading import demo_pair  # noqa: E402
from verispec.policy import PolicySet, load_policy, parse_policy  # noqa: E402
from verispec.tools.loadtest import default_prompts, loadtest  # noqa: E402

EXAMPLE = ROOT / "deploy" / "policy" / "rules.example.yaml"

# Fifty blocking terms: ten secret markers and forty made-up code names, none of which the sample text
# holds (a block would end the response early and make the gate look cheaper than it is).
SECRET_MARKERS = (
    "BEGIN RSA PRIVATE KEY", "BEGIN OPENSSH PRIVATE KEY", "BEGIN EC PRIVATE KEY", "BEGIN DSA PRIVATE KEY",
    "BEGIN PGP PRIVATE KEY BLOCK", "aws_secret_access_key", "AKIAIOSFODNN7EXAMPLE", "xoxb-", "glpat-", "sk_live_",
)
CODE_NAME_WORDS = (("amber", "cobalt", "crimson", "silent", "northern", "hollow", "iron", "velvet"),
                   ("falcon", "harbor", "lantern", "meadow", "orchid"))


def fifty_terms() -> PolicySet:
    names = [f"project {a} {b}" for a in CODE_NAME_WORDS[0] for b in CODE_NAME_WORDS[1]]
    return parse_policy({"rules": [{"name": "terms-50", "terms": [*SECRET_MARKERS, *names], "action": "block"}]}, "terms-50")


def example_checker() -> PolicySet:
    """The example file's checker rule alone, as the file writes it (flag, on_error allow)."""
    rule = {"name": "shouting", "checker": "verispec.policy.examples:shouting", "action": "flag", "on_error": "allow"}
    return parse_policy({"rules": [rule]}, "checker")


def policies() -> dict[str, PolicySet]:
    return {"example file": load_policy(EXAMPLE), "50 terms": fifty_terms(), "example checker": example_checker()}


# -- (a) micro: the gate alone ---------------------------------------------------------------------------


def token_chunks(tokenizer, text: str) -> list[str]:
    """`text` cut at its tokens' starts, so the chunks join back to exactly `text`."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    cuts = sorted({0, *(start for start, end in offsets if end > start)} - {len(text)})
    return [text[a:b] for a, b in zip(cuts, [*cuts[1:], len(text)], strict=True)]


def responses(stream: list[str], length: int) -> list[list[str]]:
    """The token stream cut into consecutive responses of `length` tokens (the last, short one dropped)."""
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]


class NullGate:
    """What the loop costs without a gate: the same calls, returning the text unchanged."""

    violation = None
    flags: list = []

    def feed(self, text: str) -> str:
        return text

    def finish(self) -> str:
        return ""


def run_once(make_gate, batch: list[list[str]]) -> tuple[int, int, int]:
    """Feed every response through a fresh gate: (ns, responses blocked, flags)."""
    blocked = flags = 0
    gc.disable()  # a collection landing in one policy's run would be charged to it
    try:
        started = time.perf_counter_ns()
        for chunks in batch:
            gate = make_gate()
            for chunk in chunks:
                gate.feed(chunk)
            gate.finish()
            blocked += gate.violation is not None
            flags += len(gate.flags)
        elapsed = time.perf_counter_ns() - started
    finally:
        gc.enable()
    return elapsed, blocked, flags


@dataclass(frozen=True)
class MicroResult:
    policy: str
    length: int  # tokens per response
    responses: int
    tokens: int
    chars: int
    ns_per_token: float  # median over repeats
    us_per_1k_chars: float
    blocked: int  # responses a blocking rule stopped (their tail was never fed: cheaper)
    flags: int
    repeats_ns_per_token: list[float]


def micro(lengths: list[int], repeats: int) -> tuple[list[MicroResult], dict]:
    tokenizer = load_tokenizer(demo_pair()[0])
    stream = [chunk for prompt in default_prompts() for chunk in token_chunks(tokenizer, prompt.text)]
    gates = {"none (loop only)": NullGate, **{name: policy.gate for name, policy in policies().items()}}
    results = []
    for length in lengths:
        batch = responses(stream, length)
        tokens, chars = sum(map(len, batch)), sum(len(c) for r in batch for c in r)
        for name, make_gate in gates.items():
            runs = [run_once(make_gate, batch) for _ in range(repeats + 1)][1:]  # the first warms caches
            per_token = [ns / tokens for ns, _, _ in runs]
            median = statistics.median(per_token)
            _, blocked, flags = runs[0]
            results.append(MicroResult(name, length, len(batch), tokens, chars, median, median * tokens / chars,
                                       blocked, flags, per_token))
            print(f"micro {length:5d} tokens/response  {name:17s} {median:9.0f} ns/token  "
                  f"{median * tokens / chars:8.1f} µs/1k chars  blocked {blocked}/{len(batch)}", flush=True)
    sample = {"tokens": len(stream), "chars": sum(map(len, stream)), "chars_per_token": sum(map(len, stream)) / len(stream)}
    return results, sample


def micro_table(results: list[MicroResult]) -> str:
    """One row per length and policy. The gate runs on the server's event loop, one thread for every
    request, so 1e9 / (ns per token) is the most tokens per second a server can gate at all."""
    lines = ["| tokens per response | policy | ns per token (median) | µs per 1k chars | tokens/s one core can gate | responses blocked |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.length} | {r.policy} | {r.ns_per_token:,.0f} | {r.us_per_1k_chars:,.1f} | {1e9 / r.ns_per_token:,.0f} "
              f"| {r.blocked}/{r.responses} |" for r in results]
    return "\n".join(lines)


# -- (b) end to end: two servers ------------------------------------------------------------------------


def end_to_end(rounds: int, requests: int, max_tokens: int, threads: int | None) -> dict:
    common = ["--audit-url", "none", "--log-level", "warning"]
    logs = Path(tempfile.mkdtemp(prefix="policy-overhead-"))
    # On a shared machine, model threads that spin-wait for a busy core stall for seconds now and then:
    # fewer threads than cores trade speed for figures that repeat.
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    servers = {"plain": ServerProcess(common, log_dir=logs, env=env),
               "policy": ServerProcess([*common, "--policy", str(EXAMPLE)], log_dir=logs, env=env)}
    prompts = default_prompts()
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for proc in servers.values():
            proc.wait_ready(600)
        for r in range(rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))  # neither always goes first
            for name in order:
                report = asyncio.run(loadtest(servers[name].url, prompts[r * requests:] + prompts, 1, requests, max_tokens,
                                              None, False, 1, warmup=2 if r == 0 else 0))
                s = report["results"][0]
                runs[name].append(s)
                print(f"e2e round {r} {name:6s}: {s['tokens_per_s']:.1f} tok/s, first text p50 {s['ttft_p50_s']:.3f} s, "
                      f"p50 {s['latency_p50_s']:.3f} s, ok {s['ok']}/{s['requests']}", flush=True)
        samples = servers["policy"].metrics()
        findings = {action: metric(samples, "verispec:policy_violations_total", action=action) for action in ("block", "flag")}
    finally:
        for proc in servers.values():
            proc.stop()
    pairs = list(zip(runs["plain"], runs["policy"], strict=True))

    def ratio(key: str) -> float:
        return statistics.median(p[key] / b[key] for b, p in pairs)

    return {
        "rounds": rounds, "requests_per_round": requests, "max_tokens": max_tokens, "concurrency": 1, "threads": threads,
        "policy_file": str(EXAMPLE.relative_to(ROOT)), "policy_findings": findings,
        "median": {name: {key: statistics.median(r[key] for r in results)
                          for key in ("tokens_per_s", "ttft_p50_s", "latency_p50_s")} for name, results in runs.items()},
        "ratio_policy_over_plain": {"tokens_per_s": ratio("tokens_per_s"), "ttft_p50_s": ratio("ttft_p50_s"),
                                    "latency_p50_s": ratio("latency_p50_s")},
        "runs": runs,
    }


def e2e_table(e2e: dict) -> str:
    med, ratio = e2e["median"], e2e["ratio_policy_over_plain"]
    lines = ["| server | tokens/s (median) | first text p50 s | latency p50 s | ok |", "|---|---|---|---|---|"]
    for name in ("plain", "policy"):
        ok = f"{sum(r['ok'] for r in e2e['runs'][name])}/{sum(r['requests'] for r in e2e['runs'][name])}"
        lines.append(f"| {name} | {med[name]['tokens_per_s']:.1f} | {med[name]['ttft_p50_s']:.3f} | {med[name]['latency_p50_s']:.3f} | {ok} |")
    lines.append(f"| policy / plain (median of paired rounds) | {ratio['tokens_per_s']:.3f}x | {ratio['ttft_p50_s']:.3f}x "
                 f"| {ratio['latency_p50_s']:.3f}x | |")
    return "\n".join(lines)


def share(results: list[MicroResult], e2e: dict) -> str:
    """The micro figure against the end-to-end one: the example file's gate per token (at the response
    length nearest max_tokens) as a share of the time the plain server takes per token."""
    rows = [r for r in results if r.policy == "example file"]
    row = min(rows, key=lambda r: abs(r.length - e2e["max_tokens"]))
    token_s = 1 / e2e["median"]["plain"]["tokens_per_s"]
    return (f"The plain server takes {token_s * 1e3:.1f} ms per token here; the example file's gate, {row.ns_per_token / 1e3:.1f} µs "
            f"per token at {row.length}-token responses, is {row.ns_per_token * 1e-9 / token_s:.2%} of that.")


# -- the report -----------------------------------------------------------------------------------------


def write(out: Path, results: list[MicroResult], sample: dict, e2e: dict | None, args: argparse.Namespace) -> None:
    stamp = time.strftime("%Y-%m-%d")
    command = "python " + " ".join(sys.argv)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"date": stamp, "command": command, "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
           "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "micro": {"sample": sample, "results": [vars(r) for r in results]}, "end_to_end": e2e}
    (out / "policy_overhead.json").write_text(json.dumps(doc, indent=1))
    parts = [f"{stamp}, `{command}`", "",
             f"## The gate alone, one token per feed\n\n{sample['tokens']:,} tokens ({sample['chars']:,} characters, "
             f"{sample['chars_per_token']:.2f} per token) of the shared prompts, cut into responses of each length; median of "
             f"{args.repeats} repeats. \"none\" is the loop without a gate.\n", micro_table(results)]
    if e2e is not None:
        parts += ["", f"## End to end: streaming /v1/completions, demo pair, one client\n\n{e2e['rounds']} alternating rounds of "
                      f"{e2e['requests_per_round']} greedy requests of {e2e['max_tokens']} tokens per server, model threads "
                      f"{e2e['threads'] or 'default'}; policy: "
                      f"`{e2e['policy_file']}` (findings: {e2e['policy_findings']}).\n", e2e_table(e2e), "", share(results, e2e)]
    (out / "policy_overhead.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {out / 'policy_overhead.md'} and .json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,256,1024", help="tokens per response, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4, help="end to end: alternating rounds per server")
    parser.add_argument("--requests", type=int, default=6, help="end to end: requests per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="end to end: OMP_NUM_THREADS of the servers (default: theirs)")
    parser.add_argument("--skip-e2e", action="store_true", help="the micro figures only")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "policy")
    args = parser.parse_args()
    results, sample = micro([int(x) for x in args.lengths.split(",")], args.repeats)
    e2e = None if args.skip_e2e else end_to_end(args.rounds, args.requests, args.max_tokens, args.threads)
    if e2e is not None:
        print(e2e_table(e2e))
    write(args.out, results, sample, e2e, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
