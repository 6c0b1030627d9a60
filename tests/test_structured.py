"""Structured outputs in the engine: the output is what the format allows, and speculation,
jump-forward and batching give exactly the verifier's own constrained output.

The reference pair (a byte-level BPE code model) writes the JSON: tiny word-level models cannot.
The reference for every configuration is verifier-only constrained decoding (depth 0)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.conftest import SHARED_MODELS, make_engine
from verispec.config import ResponseFormat, SamplingParams
from verispec.errors import UserError

pytestmark = pytest.mark.skipif(not (SHARED_MODELS / "ref-code-target").is_dir(), reason="the reference pair is not in ../shared/models")
TARGET, DRAFT = str(SHARED_MODELS / "ref-code-target"), str(SHARED_MODELS / "ref-code-draft-distilled")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
FORMATS = {
    "schema": ResponseFormat(type="json_schema", json_schema={"name": "person", "schema": PERSON, "strict": True}),
    "object": ResponseFormat(type="json_object"),
    "regex": ResponseFormat(type="regex", regex=r"def [a-z_]{1,12}\(x\):\n    return x \+ [0-9]{1,3}\n"),
}
PROMPTS = ["# a record of the current user as JSON\nuser = ", "def handler(event):\n    data = ", "import json\n\nCONFIG = "]


def valid(name: str, text: str) -> bool:
    if name == "regex":
        return re.fullmatch(FORMATS["regex"].regex, text) is not None
    value = json.loads(text)
    if name == "schema":
        jsonschema.validate(value, PERSON)
    return isinstance(value, dict)


@pytest.fixture(scope="module")
def engine():
    return make_engine(TARGET, DRAFT)


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_output_is_what_the_format_allows_and_speculation_changes_no_token(engine, name):
    for prompt in PROMPTS[:2]:
        params = SamplingParams(max_new_tokens=120, response_format=FORMATS[name])
        reference = engine.generate(prompt, params, depth=0)
        assert reference.finish_reason == "stop", reference.text  # the grammar ended it
        assert valid(name, reference.text), reference.text
        for depth in (2, 4, "auto"):
            out = engine.generate(prompt, params, depth=depth)
            assert out.token_ids == reference.token_ids, (name, depth)


def test_forced_tokens_are_taken_in_one_pass(engine):
    """A schema whose keys are fixed forces most of its text: jump-forward verifies them in a few
    passes, where verifier-only needs one pass per token."""
    params = SamplingParams(max_new_tokens=120, response_format=FORMATS["schema"])
    alone = engine.generate(PROMPTS[0], params, depth=0)
    jumped = engine.generate(PROMPTS[0], params, depth="auto", proposer=None)  # no proposer: the grammar's drafts only
    assert jumped.token_ids == alone.token_ids
    assert alone.stats.rounds == len(alone.token_ids)
    assert jumped.stats.rounds < 0.75 * alone.stats.rounds, (jumped.stats.rounds, alone.stats.rounds)


def test_sampled_constrained_output_reproduces_its_seed_at_any_depth(engine):
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=120, response_format=FORMATS["schema"])
    reference = engine.generate(PROMPTS[1], params, depth=0)
    assert valid("schema", reference.text)
    for depth in (3, "auto"):
        assert engine.generate(PROMPTS[1], params, depth=depth).token_ids == reference.token_ids


def test_batched_constrained_and_free_requests_keep_their_outputs(engine):
    free = SamplingParams(max_new_tokens=40)
    jobs = [(p, SamplingParams(max_new_tokens=120, response_format=FORMATS[name])) for p, name in zip(PROMPTS, FORMATS, strict=True)]
    jobs.append((PROMPTS[0], free))
    alone = [engine.generate(p, params, depth=0).token_ids for p, params in jobs]
    handles = [engine.add(str(i), engine.encode(p), params, engine.speculation, engine.proposer) for i, (p, params) in enumerate(jobs)]
    together = {h: [] for h in handles}
    while engine.busy:
        for handle, delta in engine.step():
            together[handle] += delta.token_ids
    assert [together[h] for h in handles] == alone


@pytest.mark.parametrize(
    "fmt, message",
    [
        (ResponseFormat(type="regex", regex="(a"), "regex"),
        (ResponseFormat(type="json_schema", json_schema={"name": "x", "schema": {"type": "nonsense"}}), "schema"),
        (ResponseFormat(type="grammar", grammar="start: undefined_rule"), "grammar"),
    ],
)
def test_a_format_that_does_not_compile_is_a_user_error(engine, fmt, message):
    with pytest.raises(UserError, match=message):
        engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=4, response_format=fmt), depth=0)
