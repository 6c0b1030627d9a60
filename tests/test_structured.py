"""Structured outputs in the engine: the output is what the format allows, and speculation,
jump-forward and batching give exactly the verifier's own constrained output.

The reference pair (a byte-level BPE code model) writes the JSON: tiny word-level models cannot.
The reference for every configuration is verifier-only constrained decoding (depth 0)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from tests.conftest import SHARED_MODELS, make_engine
from verispec.config import ResponseFormat, SamplingParams
from verispec.core.engine import _masked
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


NEWLINE = 199  # "\n" in the reference tokenizer: never inside this JSON (no free whitespace, escaped in strings)


@pytest.mark.parametrize("depth", [0, "auto"])
def test_a_format_ends_on_any_of_the_requests_stop_tokens(engine, depth):
    """Not only the tokenizer's EOS ends a constrained output: every stop token of the request does
    (a model's second end-of-turn id, stop_token_ids), where the format is complete. This model
    likes a newline after its JSON better than EOS."""
    params = SamplingParams(max_new_tokens=120, response_format=FORMATS["schema"])
    reference = engine.generate(PROMPTS[0], params, depth=0)
    assert reference.token_ids[-1] == 0 and NEWLINE not in reference.token_ids
    stopped = engine.generate(PROMPTS[0], params.model_copy(update={"stop_token_ids": (NEWLINE,)}), depth=depth)
    assert stopped.token_ids == [*reference.token_ids[:-1], NEWLINE] and stopped.finish_reason == "stop"
    assert valid("schema", stopped.text.rstrip("\n"))


def test_a_dead_row_keeps_only_the_stop_tokens_its_mask_allows():
    """A token floor (min_tokens) that bans the stop tokens where the grammar allows nothing else
    leaves a row without a token: the output ends there on the ends the grammar allows, no other."""
    logits = torch.zeros(3, 6)
    logits[:, [4, 5]] = float("-inf")  # the floor's ban of the stop tokens 4 and 5
    masks = torch.tensor([[1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    out = _masked(logits, masks, frozenset({4, 5}))
    inf = float("-inf")
    assert out.tolist() == [[0, 0, inf, inf, inf, inf], [inf, inf, inf, inf, 0, 0], [inf, inf, inf, inf, 0, inf]]


def hostile(variant: int) -> SamplingParams:
    """A regex that compiles within the limits and then runs out of lexer fuel after a few dozen a's,
    which the token floor keeps the model writing (the only other token it allows is EOS)."""
    regex = f"((a{{1,100}}){{1,100}}){{1,{90 + variant}}}"
    return SamplingParams(max_new_tokens=64, min_tokens=64, response_format=ResponseFormat(type="regex", regex=regex))


def test_a_format_that_fails_mid_request_ends_that_request_alone(engine):
    """The failing request ends with a UserError (a 400 for the server's client) after the tokens it
    had; the other requests of its passes go on, token for token as alone, and no block is lost."""
    jobs = [(PROMPTS[0], SamplingParams(max_new_tokens=120, response_format=FORMATS["schema"]), "auto"), (PROMPTS[1], SamplingParams(max_new_tokens=60), 0)]
    alone = [engine.generate(p, params, depth=0).token_ids for p, params, _ in jobs]
    handles = [engine.add(str(i), engine.encode(p), params, engine.speculation, engine.proposer, depth=d) for i, (p, params, d) in enumerate(jobs)]
    bad = engine.add("bad", engine.encode("x = "), hostile(1), engine.speculation, engine.proposer, depth=0)
    out, errors = {h: [] for h in [*handles, bad]}, {}
    while engine.busy:
        for handle, delta in engine.step():
            if isinstance(delta, UserError):
                errors[handle] = delta
                assert handles[1] in engine.running  # a request of its batch goes on after it
            else:
                out[handle] += delta.token_ids
    assert list(errors) == [bad] and "too costly to follow" in str(errors[bad])
    assert len(out[bad]) > 10  # it failed mid-request, not at its first mask
    assert [out[h] for h in handles] == alone
    pool = engine.runner.pool
    assert pool.free_blocks == pool.num_blocks


@pytest.mark.parametrize("depth", [0, "auto"])
def test_offline_a_format_that_fails_mid_request_raises_a_user_error(engine, depth):
    with pytest.raises(UserError, match="too costly to follow"):
        engine.generate("x = ", hostile(2 if depth == 0 else 3), depth=depth)
    assert engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=8)).finish_reason == "length"  # the engine goes on


def test_a_format_that_failed_is_compiled_afresh_for_its_next_request(engine):
    """Requests of one compiled format share its lexer's states and their budget: a failed one leaves
    the cache, so the next request of that format fails where the first did, not at once."""
    failures = []
    for _ in range(2):
        with pytest.raises(UserError, match="too costly to follow") as failure:
            engine.generate("x = ", hostile(4), depth=0)
        failures.append(str(failure.value))
    assert failures[0] == failures[1] and "at output token 0" not in failures[1]
