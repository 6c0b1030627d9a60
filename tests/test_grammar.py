"""Structured-output constraints (verispec.core.grammar) with the reference target's tokenizer."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from verispec.core import grammar
from verispec.core.grammar import compile_constraint
from verispec.errors import UserError

REF_TARGET = Path(__file__).resolve().parents[2] / "shared" / "models" / "ref-code-target"
V = 8192  # the reference target's vocabulary (and its tokenizer's)

pytestmark = pytest.mark.skipif(not REF_TARGET.is_dir(), reason="needs ../shared/models/ref-code-target")

SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "count", "ok"],
    "additionalProperties": False,
}
TREE = {
    "$ref": "#/$defs/node",
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["value", "children"],
            "additionalProperties": False,
        }
    },
}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REF_TARGET)


@pytest.fixture(scope="module")
def eos(tok):
    assert tok.eos_token_id == 0
    return tok.eos_token_id


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def walk(matcher, tokens):
    """Advance token by token, returning the mask seen before each token and after the last."""
    masks = []
    for t in tokens:
        masks.append(matcher.allowed())
        assert masks[-1][t], f"token {t} refused at {len(masks) - 1}"
        matcher.advance([t])
    masks.append(matcher.allowed())
    return masks


def test_any_json_object_walks_a_valid_sample_and_ends_only_at_its_end(tok, eos):
    text = json.dumps({"a": [1, 2.5, None, True], "b": {"c": "d\n\u00e9"}, "e": []})
    tokens = ids(tok, text)
    m = compile_constraint("json_object", None, tok, V).start()
    masks = walk(m, tokens)
    assert all(mask.shape == (V,) and mask.dtype == torch.bool for mask in masks)
    assert [bool(mask[eos]) for mask in masks] == [False] * len(tokens) + [True]
    assert [m.allows(eos)] == [True] and m.done
    m.advance([eos])
    assert m.done and m.allowed().sum() <= 1  # past EOS: nothing more (EOS itself at most)


def test_any_json_object_refuses_non_objects_at_the_start(tok):
    m = compile_constraint("json_object", None, tok, V).start()
    mask = m.allowed()
    for text in ("[", '"', "1", "a", "null", " x"):
        t = ids(tok, text)[0]
        assert not mask[t] and not m.allows(t), text
    (brace,) = ids(tok, "{")
    assert mask[brace] and m.allows(brace)
    # every allowed first token starts an object (after optional whitespace)
    for t in mask.nonzero().flatten().tolist():
        assert tok.decode([t]).lstrip(" \n\r\t").startswith("{") or not tok.decode([t]).strip(), tok.decode(
            [t]
        )


def test_random_walks_under_a_schema_always_give_schema_valid_json(tok, eos):
    """Whatever the model picks among allowed tokens, the output parses and matches the schema."""
    constraint = compile_constraint("json_schema", SMALL_SCHEMA, tok, V)
    rng = random.Random(0)
    for _ in range(15):
        m, out = constraint.start(), []
        for _ in range(400):
            mask = m.allowed()
            if mask[eos]:
                break
            t = rng.choice(mask.nonzero().flatten().tolist())
            m.advance([t])
            out.append(t)
        else:
            pytest.fail("random walk did not reach an end in 400 tokens")
        value = json.loads(tok.decode(out))
        assert set(value) == {"color", "count", "ok"}
        assert value["color"] in ("red", "green", "blue")
        assert isinstance(value["count"], int) and 0 <= value["count"] <= 99
        assert isinstance(value["ok"], bool)


def test_schema_refuses_a_wrong_enum_value_and_an_extra_key(tok):
    constraint = compile_constraint("json_schema", SMALL_SCHEMA, tok, V)
    good = ids(tok, '{"color": "red", "count": 3, "ok": true}')
    m = constraint.start()
    walk(m, good)
    assert m.done
    for bad in ('{"color": "pink"', '{"colour": 1', '{"color": "red", "count": 3, "ok": true, "x": 1}'):
        m = constraint.start()
        tokens = ids(tok, bad)
        with pytest.raises(ValueError, match="not allowed"):
            m.advance(tokens)
        assert torch.equal(m.allowed(), constraint.start().allowed())  # a refused advance takes nothing


def test_masks_for_matches_step_by_step_masks_and_leaves_the_state_alone(tok):
    constraint = compile_constraint("json_schema", SMALL_SCHEMA, tok, V)
    tokens = ids(tok, '{"color": "green", "count": 42, "ok": false}')
    m = constraint.start()
    m.advance(tokens[:3])
    before = m.allowed()
    drafts = tokens[3:8]
    masks, n = m.masks_for(drafts)
    assert masks.shape == (len(drafts) + 1, V) and n == len(drafts)
    assert torch.equal(m.allowed(), before)
    stepper = constraint.start()
    stepper.advance(tokens[:3])
    assert torch.equal(torch.stack(walk(stepper, drafts)), masks)
    # a refused draft stops the count; rows past it are unconstrained
    (bad,) = ids(tok, "[")
    masks, n = m.masks_for([*drafts[:2], bad, *drafts[3:]])
    assert n == 2 and not masks[2, bad] and masks[3:].all()
    assert torch.equal(m.allowed(), before)
    m.advance(tokens[3:])
    assert m.done


def test_rollback_restores_earlier_masks_and_refuses_too_many(tok):
    constraint = compile_constraint("json_schema", TREE, tok, V)
    tokens = ids(tok, '{"value": "root", "children": [{"value": "leaf", "children": []}]}')
    m = constraint.start()
    masks = walk(m, tokens)
    for k in (1, 4, 9):
        m.rollback(k)
        assert torch.equal(m.allowed(), masks[len(tokens) - k]), k
        m.advance(tokens[len(tokens) - k :])
    m.advance([0])  # EOS can be rolled back too
    m.rollback(1)
    assert torch.equal(m.allowed(), masks[-1])
    with pytest.raises(ValueError, match="cannot roll back"):
        m.rollback(len(tokens) + 1)
    m.rollback(len(tokens))
    assert torch.equal(m.allowed(), masks[0])


def test_recursive_ref_schema_accepts_deep_trees_and_refuses_a_wrong_shape(tok):
    constraint = compile_constraint("json_schema", TREE, tok, V)
    node = {"value": "x", "children": []}
    for _ in range(12):
        node = {"value": "y", "children": [node, {"value": "z", "children": []}]}
    m = constraint.start()
    walk(m, ids(tok, json.dumps(node)))
    assert m.done
    with pytest.raises(ValueError):
        constraint.start().advance(ids(tok, '{"value": "x", "children": [1]'))


def test_forced_tokens_spell_a_fixed_key(tok):
    schema = {"type": "object", "properties": {"temperature_celsius": {"type": "integer"}},
              "required": ["temperature_celsius"], "additionalProperties": False}  # fmt: skip
    m = compile_constraint("json_schema", schema, tok, V).start()
    forced = m.forced()
    text = tok.decode(forced)  # JSON is written with fixed separators: the key is forced from the start
    assert len(text) >= len('{"temperature_celsius') and '{"temperature_celsius": '.startswith(text), text
    m.advance(forced)  # forced tokens are allowed, in order
    m.advance(ids(tok, '{"temperature_celsius": 21}')[len(forced) :])
    assert m.done and m.forced() == []
    m2 = compile_constraint("json_schema", SMALL_SCHEMA, tok, V).start()
    m2.advance(ids(tok, '{"color": "'))
    assert m2.forced() == []  # three enum values: nothing forced


def test_regex_and_lark_grammar(tok, eos):
    m = compile_constraint("regex", r"\d{3}-\d{4}", tok, V).start()
    masks = walk(m, ids(tok, "555-1234"))
    assert not any(mask[eos] for mask in masks[:-1]) and masks[-1][eos] and m.done
    assert not compile_constraint("regex", r"\d{3}-\d{4}", tok, V).start().allows(ids(tok, "x")[0])
    lark = 'start: "SELECT " COL (", " COL)* " FROM t"\nCOL: /[a-z]+/\n'
    m = compile_constraint("grammar", lark, tok, V).start()
    walk(m, ids(tok, "SELECT a, bb FROM t"))
    assert m.done
    with pytest.raises(ValueError):
        compile_constraint("grammar", lark, tok, V).start().advance(ids(tok, "DELETE"))


def test_model_vocabulary_wider_than_the_tokenizer_pads_with_false(tok):
    m = compile_constraint("json_object", None, tok, V + 64).start()
    mask = m.allowed()
    assert mask.shape == (V + 64,) and not mask[V:].any() and mask[:V].any()
    assert not m.allows(V + 3) and not m.allows(-1)
    masks, n = m.masks_for([V + 3])
    assert n == 0 and masks.shape == (2, V + 64)


@pytest.mark.parametrize(("regex", "text"), [("ab", "ab"), ("a+", "aaaa"), (r"\d{3}-\d{4}", "555-1234")])
def test_allows_agrees_with_the_mask_about_eos_and_eos_can_be_taken(tok, eos, regex, text):
    """llguidance's validate refuses EOS once a grammar is complete (nothing else possible) although
    its mask allows it; the matcher answers as the mask does."""
    m = compile_constraint("regex", regex, tok, V).start()
    for t in ids(tok, text):
        assert m.allows(eos) == bool(m.allowed()[eos])
        m.advance([t])
    assert m.allows(eos) and m.allowed()[eos]
    masks, n = m.masks_for([eos])
    assert n == 1 and masks[1][eos]  # after EOS: only EOS
    end = m.allowed()
    m.advance([eos, eos])  # a second EOS is allowed too (llguidance does not record it)
    assert m.done
    m.rollback(2)
    assert torch.equal(m.allowed(), end) and m.allows(eos)
    m.rollback(1)
    assert not m.allowed()[eos] or regex == "a+"


def test_several_eos_ids_are_allowed_together_at_the_end(tok):
    m = compile_constraint("regex", "ab", tok, V, eos_ids=[0, 7]).start()
    m.advance(ids(tok, "ab"))
    mask = m.allowed()
    assert mask[0] and mask[7] and mask.sum() == 2


def test_a_requests_stop_tokens_end_the_output_exactly_where_eos_may(tok, eos):
    """A request's other stop tokens (a second end-of-turn id, its stop_token_ids) are ends, as EOS
    is: allowed wherever the output may end, and nowhere else, not even as text the grammar takes."""
    (seven,), (newline,), (five,) = ids(tok, "7"), ids(tok, "\n"), ids(tok, "5")
    m = compile_constraint("regex", "[0-9]+", tok, V).start([seven, newline])
    mask = m.allowed()
    assert mask[five] and not mask[seven] and not mask[newline] and not mask[eos]  # "7" is a digit: here, an end
    assert not m.allows(seven) and m.masks_for([seven])[1] == 0
    with pytest.raises(ValueError, match="not allowed"):
        m.advance([seven])
    m.advance([five])
    mask = m.allowed()
    assert mask[seven] and mask[newline] and mask[eos] and m.allows(newline) and m.allows(seven)
    masks, n = m.masks_for([five, newline])
    assert n == 2 and masks[2][[seven, newline, eos]].all()  # after an end: only ends
    m.advance([newline])
    assert m.done
    m.rollback(1)
    assert torch.equal(m.allowed(), mask)


def test_a_stop_token_the_format_needs_as_text_is_never_forced_nor_allowed(tok):
    """Where the grammar wants a stop token as text, the output cannot end: the matcher forces nothing
    up to it, offers no draft leading to it, and says at that row that the request contradicts itself."""
    (dash,) = ids(tok, "-")
    constraint = compile_constraint("regex", r"[0-9]{3}-[0-9]{4}", tok, V)
    m = constraint.start([dash])
    prefix = ids(tok, "555")
    masks, n = m.masks_for(prefix)
    assert n == len(prefix) - 1 and masks[n + 1 :].all()  # the last digit leads where no token may follow
    m.advance(prefix)
    assert m.forced() == []
    with pytest.raises(UserError, match=r"stop tokens \[13\] as text at output token 2"):
        m.allowed()
    with pytest.raises(UserError, match="stop tokens"):
        m.masks_for([dash])
    plain = constraint.start()
    plain.advance(prefix)
    assert plain.forced() == [dash]  # without the stop token, the grammar forces it


def test_forced_tokens_stop_before_a_stop_token(tok):
    schema = {"type": "object", "properties": {"temperature_celsius": {"type": "integer"}},
              "required": ["temperature_celsius"], "additionalProperties": False}  # fmt: skip
    constraint = compile_constraint("json_schema", schema, tok, V)
    forced = constraint.start().forced()
    assert len(forced) > 3
    assert constraint.start([forced[2]]).forced() == forced[:2]


def test_tokenizer_adaptation_is_cached_per_tokenizer(tok):
    a = compile_constraint("regex", "a+", tok, V)
    b = compile_constraint("regex", "b+", tok, V)
    assert grammar._llg_tokenizer(tok, a.eos_ids) is grammar._llg_tokenizer(tok, b.eos_ids)


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("regex", "(abc", "invalid regex.*unclosed group"),
        ("grammar", "start: foo", "invalid grammar.*foo"),
        ("json_schema", {"type": "strin"}, "invalid json schema.*strin"),
        ("json_schema", {"$ref": "#/nope"}, "invalid json schema.*nope"),
        ("json_schema", [1, 2], "must be a JSON object"),
        ("regex", "", "non-empty string"),
        ("xml", "<a/>", "unknown constraint kind"),
        ("regex", "a" * (64 * 1024 + 1), "limit is 65536"),
    ],
)
def test_invalid_specs_are_user_errors(tok, kind, spec, message):
    with pytest.raises(UserError, match=message):
        compile_constraint(kind, spec, tok, V)


def _deep(n):
    s = {"type": "string"}
    for _ in range(n):
        s = {"type": "object", "properties": {"x": s}, "required": ["x"], "additionalProperties": False}
    return s


def _wide(n):
    props = {f"field_{i}": {"type": "string", "enum": [f"v{i}_{j}" for j in range(10)]} for i in range(n)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_deep(16), "nests deeper than 32"),
        (_deep(100_000), "nests deeper than 32"),  # deeper than Python's recursion limit
        (_wide(2000), "limit is 65536"),
    ],
)
def test_hostile_schemas_are_refused_fast(tok, spec, message):
    start = time.perf_counter()
    with pytest.raises(UserError, match=message):
        compile_constraint("json_schema", spec, tok, V)
    assert time.perf_counter() - start < 2.0


def test_fifteen_levels_of_properties_compile(tok):
    m = compile_constraint("json_schema", _deep(15), tok, V).start()
    m.advance(ids(tok, '{"x": ' * 15 + '"leaf"' + "}" * 15))
    assert m.done


def test_large_schema_under_the_cap_compiles_fast(tok):
    spec = _wide(300)
    assert 30_000 < len(json.dumps(spec)) < 64 * 1024
    start = time.perf_counter()
    m = compile_constraint("json_schema", spec, tok, V).start()
    m.advance(ids(tok, '{"field_0": "v0_3", "field_1": "v1_'))
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("regex", [r"(a|aa){1000}", r"(a{1,1000}){1,1000}b"])
def test_exploding_regex_is_a_user_error_within_seconds(tok, regex):
    """The lexer builds states as tokens arrive; when it runs out of room, compile_constraint or the
    matcher raises UserError, in milliseconds, never hangs."""
    (a,) = ids(tok, "a")
    start = time.perf_counter()
    with pytest.raises(UserError, match="too costly|too many"):
        m = compile_constraint("regex", regex, tok, V).start()
        for _ in range(2000):
            m.allowed()
            m.advance([a])
    assert time.perf_counter() - start < 5.0


def test_an_ambiguous_grammar_is_stopped_within_seconds(tok):
    """`s: s s | "a"` makes Earley parsing cubic: with the library's default limits it runs ~130 s
    before failing; the module's item limits stop it in under a second."""
    (a,) = ids(tok, "a")
    start = time.perf_counter()
    with pytest.raises(UserError, match="too costly"):
        m = compile_constraint("grammar", 'start: s\ns: s s | "a"\n', tok, V).start()
        for _ in range(3000):
            m.allowed()
            m.advance([a])
    assert time.perf_counter() - start < 5.0


def test_long_recursive_outputs_stay_within_the_limits(tok):
    """The item limits leave room for real outputs: 2,000 right-recursive repetitions, JSON 300 deep."""
    m = compile_constraint("grammar", 'start: s\ns: "a," s | "a"\n', tok, V).start()
    m.advance(ids(tok, "a," * 2000 + "a"))
    assert m.allows(0)
    m = compile_constraint("json_object", None, tok, V).start()
    m.advance(ids(tok, '{"a": ' + "[" * 300 + "]" * 300 + "}"))
    assert m.done


@pytest.mark.parametrize("regex", [r"(x+x+)+y", r"(a|b)*a(a|b){200}", r"(\w+\s?)*$"])
def test_backtracking_bombs_are_cheap(tok, regex):
    """Regexes that hang backtracking engines are plain automata here: each mask stays fast."""
    m = compile_constraint("regex", regex, tok, V).start()
    (x,) = ids(tok, "x" if "x" in regex else "a")
    worst = 0.0
    for _ in range(300):
        if not m.allows(x):
            break
        m.advance([x])
        start = time.perf_counter()
        m.allowed()
        worst = max(worst, time.perf_counter() - start)
    assert worst < 0.05
