"""Mixed workload: per-request proposer choice against each fixed proposer, on the same requests.

Three tasks over the first 16 shared prompts: greedy completion ("code-greedy"), sampled at
temperature 1 ("code-sampled"), and greedy copying ("copy": the prompt followed by its own first
half, so that the continuation repeats text already in the context, where prompt lookup shines). Each configuration gets its own server, one
after the other; a first pass lets the bandit learn, the second pass is measured.

    python scripts/mixed_workload.py DRAFT_FOLDER
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from verispec.prompts import load_prompts

PROMPTS = load_prompts(Path(__file__).resolve().parents[2] / "shared" / "prompts" / "code-completion.jsonl", limit=16)
CONFIGS = {
    "draft": ["--proposer", "draft"],
    "ngram": ["--proposer", "ngram"],
    "none": ["--proposer", "none"],
    "per-request (by task)": ["--proposers", "draft,ngram,none", "--route-key", "task"],
}


def workload() -> list[dict]:
    out = []
    for i, p in enumerate(PROMPTS):
        out.append({"prompt": p.text, "max_tokens": 64, "temperature": 0, "task": "code-greedy"})
        out.append({"prompt": p.text, "max_tokens": 64, "temperature": 1.0, "seed": i, "task": "code-sampled"})
        copy = p.text + "\n\n" + p.text[: len(p.text) // 2]
        out.append({"prompt": copy, "max_tokens": 64, "temperature": 0, "task": "copy"})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokens_per_s(draft: str, flags: list[str]) -> tuple[dict, list[str]]:
    port = free_port()
    command = ["verispec", "serve", "--port", str(port), "--draft", draft, "--audit-url", "none", *flags]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        rates = {}
        for phase in ("learn", "measure"):
            tokens, started = 0, time.perf_counter()
            for body in workload():
                response = httpx.post(url + "/v1/completions", json={"model": "ref-code-target", **body}, timeout=120)
                tokens += response.json()["usage"]["completion_tokens"]
            rates[phase] = tokens / (time.perf_counter() - started)
        choices = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith("verispec:proposer_requests_total")]
    finally:
        server.terminate()
        server.wait()
    return rates, choices


def main() -> None:
    results = {}
    for name, flags in CONFIGS.items():
        rates, choices = tokens_per_s(sys.argv[1], flags)
        results[name] = rates["measure"]
        print(name, {k: round(v, 1) for k, v in rates.items()}, *(choices if "--proposers" in flags else []), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
