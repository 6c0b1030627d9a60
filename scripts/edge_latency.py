"""When an edge proposer pays: the edge client (draft at the client, verify API at the server)
against server-side drafting and the verifier alone, on loopback with an added network round trip.

    python scripts/edge_latency.py [--rtt-ms 0,10,50] [--prompts 8] [--rounds 3] [--max-tokens 64]
                                   [--edge-depths auto,server,4] [--out docs/edge]

One server (the built-in demo pair, `--proposers none,draft`) serves every configuration; per
added RTT they run side by side on the same prompts, greedy, their order rotating over rounds:

- `edge <depth>`: `EdgeClient` drafting with the demo draft in this process; one round trip a round;
- `server-draft`: a streaming `/v1/completions` pinned to `"proposer": "draft"`; one round trip;
- `verifier-only`: the same pinned to `"proposer": "none"`; one round trip.

The latency is injected in-process (`DelayTransport`), so every configuration pays it the same way.
The server's busy counters (/metrics) are read around each configuration's batch, to show the
compute an edge proposer takes off the server. All configurations must produce the same text per
prompt (greedy exactness); the script says which differ and exits 1 if any do.

Client and server share this machine's CPUs, though never at once: the client drafts while the
server waits for its round, and waits while the server verifies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import ServerProcess, metric  # noqa: E402
from verispec.cli import DEMO_PROMPTS  # noqa: E402
from verispec.edge import EdgeClient  # noqa: E402
from verispec.models.loading import demo_pair  # noqa: E402
from verispec.prompts import Prompt, load_prompts  # noqa: E402
from verispec.tools.loadtest import DEFAULT_PROMPTS  # noqa: E402

BUSY = {  # server counters read around each batch: name in the summary -> metric
    "verifier_s": "verispec:verifier_busy_seconds_total",
    "proposer_s": "verispec:proposer_busy_seconds_total",
    "tokens": "verispec:generation_tokens_total",
}
CONFIGS = {"server-draft": "draft", "verifier-only": "none"}  # the completions configurations -> their pinned proposer


class DelayTransport(httpx.BaseTransport):
    """Loopback with a network in between: rtt/2 before a request leaves, rtt/2 after its response
    has arrived, so each HTTP request costs one added round trip. The response body is read in full
    before the second half, so a stream's chunks all arrive at its end: right for the total latency
    measured here, not for time to first token. Counts requests and body bytes, for every client
    alike."""

    def __init__(self, rtt_s: float = 0.0):
        self.inner = httpx.HTTPTransport()
        self.rtt_s = rtt_s
        self.requests = self.bytes = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        time.sleep(self.rtt_s / 2)
        response = self.inner.handle_request(request)
        try:
            raw = b"".join(response.stream)  # as sent: any content-encoding is left to the client
        finally:
            response.close()
        time.sleep(self.rtt_s / 2)
        self.requests += 1
        self.bytes += len(body) + len(raw)
        return httpx.Response(response.status_code, headers=response.headers, content=raw, extensions=response.extensions)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Run:
    """One request: what came back and what it cost."""

    prompt: str
    text: str
    tokens: int
    wall_s: float
    round_trips: int
    bytes: int
    proposed: int = 0
    accepted: int = 0
    draft_s: float = 0.0  # drafting at the client (edge only)


@dataclass
class Batch:
    """One configuration's pass over the prompts at one RTT, with the server's busy time around it."""

    runs: list[Run] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)


# -- the three ways to get a completion ----------------------------------------------------------------


def complete(http: httpx.Client, model: str, prompt: str, max_tokens: int, proposer: str) -> tuple[str, int, int, int]:
    """A streaming completion pinned to `proposer`: (text, tokens, proposed, accepted)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "proposer": proposer, "speculation_stats": True, "stream_options": {"include_usage": True}}  # fmt: skip
    text, tokens, stats = [], 0, {}
    with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{proposer}: {response.status_code} {response.read().decode()[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"{proposer}: {chunk['error']}")
            text += [c["text"] for c in chunk.get("choices", []) if c.get("text")]
            stats = chunk.get("speculation_stats") or stats
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return "".join(text), tokens, stats.get("proposed", 0), stats.get("accepted", 0)


def run_one(config: str, prompt: Prompt, args, http: httpx.Client, transport: DelayTransport, model: str,
            edges: dict[str, EdgeClient]) -> Run:  # fmt: skip
    requests, sent = transport.requests, transport.bytes
    started = time.perf_counter()
    if config in edges:
        edge = edges[config]
        text = edge.generate(prompt.text, max_tokens=args.max_tokens)
        wall = time.perf_counter() - started
        s = edge.last
        tokens, proposed, accepted, draft_s = len(s.token_ids), s.proposed, s.accepted, s.propose_s
    else:
        text, tokens, proposed, accepted = complete(http, model, prompt.text, args.max_tokens, CONFIGS[config])
        wall, draft_s = time.perf_counter() - started, 0.0
    return Run(prompt.id, text, tokens, wall, transport.requests - requests, transport.bytes - sent, proposed, accepted, draft_s)


def run_batch(config: str, prompts: list[Prompt], args, server: ServerProcess, http, transport, model, edges) -> Batch:
    before = server.metrics()
    runs = [run_one(config, p, args, http, transport, model, edges) for p in prompts]
    after = server.metrics()
    return Batch(runs, {key: metric(after, name) - metric(before, name) for key, name in BUSY.items()})


# -- summary ------------------------------------------------------------------------------------------


def summarize(batches: list[Batch]) -> dict:
    runs = [r for b in batches for r in b.runs]
    tokens = sum(r.tokens for r in runs)
    proposed, accepted = sum(r.proposed for r in runs), sum(r.accepted for r in runs)
    trips = sum(r.round_trips for r in runs)
    server = {key: sum(b.server[key] for b in batches) for key in BUSY}
    per_token = server["tokens"] or tokens  # the server's count; the client's if the counter is missing
    return {
        "requests": len(runs),
        "tokens_per_s": statistics.median(r.tokens / r.wall_s for r in runs),
        "latency_s": statistics.median(r.wall_s for r in runs),
        "round_trips_per_request": trips / len(runs),
        "acceptance_rate": accepted / proposed if proposed else None,
        "bytes_per_round_trip": sum(r.bytes for r in runs) / trips,
        "server_verifier_ms_per_token": 1e3 * server["verifier_s"] / per_token,
        "server_proposer_ms_per_token": 1e3 * server["proposer_s"] / per_token,
        "client_draft_ms_per_token": 1e3 * sum(r.draft_s for r in runs) / tokens,
        "client_tokens": tokens,
        "server": server,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| RTT ms | configuration | tokens/s (median) | latency s (median) | round trips/request | acceptance | "
        "bytes/round trip | server verifier ms/token | server proposer ms/token | client draft ms/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        acc = "—" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.2f}"
        lines.append(
            f"| {row['rtt_ms']:g} | {row['config']} | {row['tokens_per_s']:.1f} | {row['latency_s']:.3f} | "
            f"{row['round_trips_per_request']:.1f} | {acc} | {row['bytes_per_round_trip']:.0f} | "
            f"{row['server_verifier_ms_per_token']:.2f} | {row['server_proposer_ms_per_token']:.2f} | {row['client_draft_ms_per_token']:.2f} |"
        )
    return "\n".join(lines)


def findings(rows: list[dict], edge_names: list[str]) -> str:
    """What the table shows, in sentences computed from it."""
    by = {(r["rtt_ms"], r["config"]): r for r in rows}
    rtts = sorted({r["rtt_ms"] for r in rows})
    said = []
    for rtt in rtts:
        fastest = max((r for r in rows if r["rtt_ms"] == rtt), key=lambda r: r["tokens_per_s"])
        parts = [f"{name} {by[(rtt, name)]['tokens_per_s'] / by[(rtt, 'server-draft')]['tokens_per_s']:.2f}x" for name in edge_names]
        only = by[(rtt, "verifier-only")]["tokens_per_s"] / by[(rtt, "server-draft")]["tokens_per_s"]
        said.append(f"at {rtt:g} ms the fastest was {fastest['config']} ({fastest['tokens_per_s']:.1f} tokens/s); against "
                    f"server-draft, {', '.join(parts)}, verifier-only {only:.2f}x")  # fmt: skip
    text = "Tokens/s per request: " + "; ".join(said) + "."
    if len(rtts) > 1:
        lo, hi = rtts[0], rtts[-1]

        def change(name: str) -> str:
            a, b = by[(lo, name)], by[(hi, name)]
            slope = (b["latency_s"] - a["latency_s"]) / (hi - lo) * 1e3
            return f"{a['latency_s']:.3f} s at {lo:g} ms to {b['latency_s']:.3f} s at {hi:g} ms ({slope:+.1f} ms per ms of RTT)"

        for name in edge_names:
            text += (f" {name} made {by[(hi, name)]['round_trips_per_request']:.1f} round trips per request (each added ms of "
                     f"RTT should add about that many ms), and its median latency went from {change(name)};")  # fmt: skip
        text += f" server-draft's (one round trip) went from {change('server-draft')}."
    server_draft = [by[(rtt, "server-draft")] for rtt in rtts]
    edge = [by[(rtt, name)] for rtt in rtts for name in edge_names]
    mean = statistics.fmean
    text += (
        f" Server compute per generated token (mean over RTTs): server-draft took "
        f"{mean(r['server_verifier_ms_per_token'] for r in server_draft):.2f} ms of verifier and "
        f"{mean(r['server_proposer_ms_per_token'] for r in server_draft):.2f} ms of proposer time, the edge configurations "
        f"{mean(r['server_verifier_ms_per_token'] for r in edge):.2f} ms of verifier and "
        f"{mean(r['server_proposer_ms_per_token'] for r in edge):.2f} ms of proposer time (their drafting, "
        f"{mean(r['client_draft_ms_per_token'] for r in edge):.2f} ms per token, ran at the client), and verifier-only "
        f"{mean(by[(rtt, 'verifier-only')]['server_verifier_ms_per_token'] for rtt in rtts):.2f} ms of verifier time."
    )
    return text


def mismatches(batches: dict[tuple[float, str], list[Batch]]) -> list[str]:
    """Prompts whose text differs from verifier-only's anywhere (greedy: all must agree)."""
    reference = {r.prompt: r.text for (_, config), bs in batches.items() if config == "verifier-only" for b in bs for r in b.runs}
    found = []
    for (rtt, config), bs in batches.items():
        for b in bs:
            for r in b.runs:
                if r.text != reference[r.prompt]:
                    found.append(f"{r.prompt} at {rtt:g} ms, {config}: {r.text[:60]!r} != {reference[r.prompt][:60]!r}")
    return found


# -- main ---------------------------------------------------------------------------------------------


def prompt_set(count: int) -> list[Prompt]:
    """The shared code-completion prompts beside this checkout, else the demo's own."""
    return load_prompts(DEFAULT_PROMPTS if DEFAULT_PROMPTS.is_file() else DEMO_PROMPTS, limit=count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", default="0,10,50", help="added round-trip times, comma-separated")
    parser.add_argument("--prompts", type=int, default=8, help="the first N prompts of the set")
    parser.add_argument("--rounds", type=int, default=3, help="passes over every (RTT, configuration), order rotating")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--edge-depths", default="auto,server,4", help="edge client depths, comma-separated (auto, server or an integer)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "edge")
    args = parser.parse_args()
    rtts = [float(x) for x in args.rtt_ms.split(",")]
    prompts = prompt_set(args.prompts)
    _, draft = demo_pair()
    logs = Path(tempfile.mkdtemp(prefix="edge-latency-"))
    server = ServerProcess(["--proposers", "none,draft", "--max-new-tokens", str(args.max_tokens), "--audit-url", "none",
                            "--log-level", "warning"], log_dir=logs)  # fmt: skip
    transport = DelayTransport()
    http = httpx.Client(base_url=server.url, transport=transport, timeout=300)
    batches: dict[tuple[float, str], list[Batch]] = {}
    try:
        server.wait_ready(600)
        model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        first = EdgeClient.with_draft(server.url, draft, model=model, http=http, depth=_depth(args.edge_depths.split(",")[0]))
        edges = {f"edge {first.depth}": first}
        for d in args.edge_depths.split(",")[1:]:
            edges[f"edge {d}"] = EdgeClient(server.url, first.proposer, first.tokenizer, model, depth=_depth(d), http=http)
        configs = [*edges, *CONFIGS]
        for config in configs:  # warm-up, not measured: first requests, the client's draft, caches
            run_one(config, prompts[0], args, http, transport, model, edges)
        for r in range(args.rounds):
            for rtt in rtts:
                transport.rtt_s = rtt / 1e3
                for config in configs[r % len(configs):] + configs[: r % len(configs)]:
                    batch = run_batch(config, prompts, args, server, http, transport, model, edges)
                    batches.setdefault((rtt, config), []).append(batch)
                    s = summarize([batch])
                    print(f"round {r} rtt {rtt:g} ms {config:13s}: {s['tokens_per_s']:.1f} tok/s, {s['latency_s']:.3f} s, "
                          f"{s['round_trips_per_request']:.1f} round trips/request", flush=True)  # fmt: skip
    finally:
        http.close()
        server.stop()
    rows = [{"rtt_ms": rtt, "config": config, **summarize(batches[(rtt, config)])} for rtt in rtts for config in configs]
    wrong = mismatches(batches)
    shown = table(rows)
    print(shown)
    verdict = (f"Greedy exactness: all {len(configs)} configurations gave the same text for each of the {len(prompts)} prompts "
               "at every RTT." if not wrong else f"Greedy exactness FAILED: {len(wrong)} outputs differ from verifier-only's.")  # fmt: skip
    print(verdict)
    for line in wrong:
        print("  " + line)
    about = findings(rows, list(edges))
    print(about)
    stamp = time.strftime("%Y-%m-%d")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"date": stamp, "command": " ".join(sys.argv), "prompts": [p.id for p in prompts], "max_tokens": args.max_tokens,
              "rounds": args.rounds, "exact": not wrong, "mismatches": wrong, "results": rows,
              "runs": {f"{rtt:g} ms / {config}": [[asdict(r) for r in b.runs] for b in bs] for (rtt, config), bs in batches.items()}}  # fmt: skip
    (args.out / "edge_latency.json").write_text(json.dumps(record, indent=1))
    (args.out / "edge_latency.md").write_text(
        f"{stamp}, `python {' '.join(sys.argv)}`: {len(prompts)} prompts, greedy, max_tokens {args.max_tokens}, "
        f"{args.rounds} rounds; added RTT injected in the client's transport (one per HTTP request); client and server share "
        f"one machine's CPUs, taking turns.\n\n{shown}\n\n"
        f"{verdict}\n\n## What it shows\n\n{about}\n"
    )
    return 1 if wrong else 0


def _depth(text: str) -> int | str:
    return text if text in ("auto", "server") else int(text)


if __name__ == "__main__":
    sys.exit(main())
