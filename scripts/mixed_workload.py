"""Mixed workload: per-request proposer choice against every fixed proposer, side by side on one server.

One `verispec serve --proposers draft,ngram,none --route-key task` serves every configuration. The
fixed configurations pin each request to one proposer (the `proposer` request extension; pinned
requests do not feed the choice), the per-request configuration leaves the choice to the server's
bandit, keyed by the request's `task`. Configurations take turns, whole workload by whole workload,
in a rotating order, so that machine drift hits all alike; the figure is each configuration's median
tokens/s over the repetitions (tokens generated / wall time of its requests, one client).

Tasks (`--tasks`, default `complete,sample`), over windows of the standard-library modules the
built-in demo pair never trained on (present on every machine):
- `complete`: greedy code completion (where a distilled draft pays);
- `copy`: greedy, the window twice over and then the start of a third copy, so the continuation
  repeats the context (prompt lookup, nearly free to run, guesses long runs);
- `sample`: sampled at a high temperature, where little of any proposal survives and drafting is
  cost without gain (verifier-only should win).

    python scripts/mixed_workload.py [--target T --draft D] [--tasks complete,copy,sample] [--repeats 7] [--out FILE.json]

Defaults: the built-in demo pair.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

from verispec.prompts import stdlib_windows
from verispec.proposers.names import PROPOSER_NAMES, VERIFIER_ONLY

FIXED = (*PROPOSER_NAMES, VERIFIER_ONLY)  # every fixed choice the server offers
PER_REQUEST = "per-request"


TASKS = ("complete", "copy", "sample")


def workload(count: int, max_tokens: int, temperature: float, tasks: list[str]) -> list[dict]:
    requests = []
    for i, window in enumerate(stdlib_windows(count, seed=7, lines=30, held_out=True)):
        text = window.text
        copy = f"{text}\n\n{text}\n\n{text[: len(text) // 3]}"  # twice over, then the start of a third copy
        bodies = {
            "complete": {"prompt": text, "temperature": 0},
            "copy": {"prompt": copy, "temperature": 0},
            "sample": {"prompt": text, "temperature": temperature, "seed": i},
        }
        requests += [{**bodies[task], "max_tokens": max_tokens, "task": task} for task in tasks]
    return requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    models = [*(["--target", args.target] if args.target else []), *(["--draft", args.draft] if args.draft else [])]
    command = ["verispec", "serve", "--port", str(port), *models, "--proposers", "draft,ngram,none", "--route-key", "task",
               "--depth", args.depth, "--audit-url", "none", "--speculation-stats"]  # fmt: skip
    log = open(args.server_log, "w")  # noqa: SIM115 (open for the server's lifetime)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited; see {args.server_log}")
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return server, url, httpx.get(url + "/v1/models").json()["data"][0]["id"]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    sys.exit("the server did not become ready in 300 s")


def run(url: str, model: str, requests: list[dict], config: str) -> dict:
    """One pass of the workload under one configuration: tokens and seconds per task, proposers used."""
    tokens, seconds, used = Counter(), Counter(), defaultdict(Counter)
    for body in requests:
        pin = {} if config == PER_REQUEST else {"proposer": config}
        started = time.perf_counter()
        response = httpx.post(url + "/v1/completions", json={"model": model, **body, **pin}, timeout=300)
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        reply = response.json()
        tokens[body["task"]] += reply["usage"]["completion_tokens"]
        seconds[body["task"]] += elapsed
        used[body["task"]][reply["speculation_stats"]["proposer"]] += 1
    return {"tokens": dict(tokens), "seconds": dict(seconds), "used": {k: dict(v) for k, v in used.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="verifier (default: the built-in demo pair)")
    parser.add_argument("--draft", help="draft model (default: the built-in demo pair's)")
    parser.add_argument("--prompts", type=int, default=12, help="windows per task (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.5, help="of the sample task (default: %(default)s)")
    parser.add_argument("--depth", default="auto")
    parser.add_argument("--tasks", default="complete,sample", help=f"comma-separated, of {', '.join(TASKS)} (default: %(default)s)")
    parser.add_argument("--learn-passes", type=int, default=1, help="unmeasured per-request passes first")
    parser.add_argument("--repeats", type=int, default=7, help="measured passes per configuration")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--server-log", type=Path, default=Path("mixed-workload-server.log"))
    args = parser.parse_args()

    tasks = args.tasks.split(",")
    if not tasks or any(t not in TASKS for t in tasks):
        sys.exit(f"--tasks {args.tasks}: choose among {', '.join(TASKS)}")
    requests = workload(args.prompts, args.max_tokens, args.temperature, tasks)
    server, url, model = start_server(args)
    configs = [*FIXED, PER_REQUEST]
    passes: dict[str, list[dict]] = {c: [] for c in configs}
    try:
        for i in range(args.learn_passes):
            learned = run(url, model, requests, PER_REQUEST)
            print(f"learn pass {i + 1}: choices {learned['used']}", file=sys.stderr, flush=True)
        for rep in range(args.repeats):
            order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
            for config in order:
                result = run(url, model, requests, config)
                passes[config].append(result)
                rate = sum(result["tokens"].values()) / sum(result["seconds"].values())
                print(f"repeat {rep + 1} {config:12s} {rate:7.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait()

    summary = {}
    for config in configs:
        overall = [sum(p["tokens"].values()) / sum(p["seconds"].values()) for p in passes[config]]
        by_task = {t: statistics.median(p["tokens"][t] / p["seconds"][t] for p in passes[config]) for t in tasks}
        used = defaultdict(Counter)
        for p in passes[config]:
            for task, counts in p["used"].items():
                used[task].update(counts)
        summary[config] = {"tokens_per_s": statistics.median(overall), "passes": overall, "by_task": by_task,
                           "proposers_used": {t: dict(c) for t, c in used.items()}}  # fmt: skip

    print(f"\n{'configuration':14s} {'tokens/s':>9s}  " + "  ".join(f"{t:>9s}" for t in tasks))
    for config in configs:
        s = summary[config]
        print(f"{config:14s} {s['tokens_per_s']:9.1f}  " + "  ".join(f"{s['by_task'][t]:9.1f}" for t in tasks))
    print(f"\nper-request choices while measured: {summary[PER_REQUEST]['proposers_used']}")
    best_fixed = max(FIXED, key=lambda c: summary[c]["tokens_per_s"])
    ratio = summary[PER_REQUEST]["tokens_per_s"] / summary[best_fixed]["tokens_per_s"]
    wins = all(summary[PER_REQUEST]["tokens_per_s"] > summary[c]["tokens_per_s"] for c in FIXED)
    print(f"per-request vs the best fixed proposer ({best_fixed}): x{ratio:.3f}; beats every fixed proposer: {wins}")
    paired = sum(  # repetition by repetition: the configurations of one repetition ran back to back
        summary[PER_REQUEST]["passes"][i] > max(summary[c]["passes"][i] for c in FIXED) for i in range(args.repeats)
    )
    print(f"repetitions where per-request beat every fixed proposer: {paired} of {args.repeats}")
    if args.out:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"settings": settings, "results": summary,
                                        "best_fixed": best_fixed, "ratio_vs_best_fixed": ratio, "beats_every_fixed": wins,
                                        "repetitions_won": paired},
                                       indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
