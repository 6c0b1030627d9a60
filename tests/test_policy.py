"""The policy gate: a blocked match never reaches the client, however the tokens split it; the text
before it does, unchanged; rules files that the gate cannot honour are refused with one clear line."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import pytest
import yaml

from verispec.errors import UserError
from verispec.policy import PolicyGate, PolicySet, Violation, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "policy" / "rules.example.yaml"
KEY_HEADER = "BEGIN RSA " + "PRIVATE KEY"  # in pieces, so that secret scanners do not flag this file


def policy(*rules: dict) -> PolicySet:
    return parse_policy({"rules": list(rules)}, "test policy")


def term(name: str = "secret", *terms: str, action: str = "block", **more) -> dict:
    return {"name": name, "terms": list(terms or [name]), "action": action, **more}


def feed_all(gate: PolicyGate, chunks: list[str], fed: str = "") -> str:
    """Feed the chunks and finish; after every call, what came out is exactly the fed text's prefix."""
    out = ""
    for chunk in chunks:
        fed += chunk
        out += gate.feed(chunk)
        assert out == fed[: gate.released]
        assert gate.violation is not None or gate.held == len(fed) - gate.released
    out += gate.finish()
    assert out == fed[: gate.released]
    return out


# -- pure checker functions the rules below import (`tests.test_policy:...`) -----------------------------


def find_bad(text: str) -> int | None:
    at = text.find("BAD")
    return None if at < 0 else at


def always(text: str) -> bool:
    return True


def explode(text: str) -> int:
    raise RuntimeError(f"checker saw {text!r}")


def explode_on_bang(text: str) -> None:
    if "!" in text:
        raise RuntimeError(f"checker saw {text!r}")


def not_an_offset(text: str) -> str:
    return "nope"


NOT_CALLABLE = 42


# -- blocking across chunks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        ["the sec", "ret is out"],  # split in two
        ["the s", "ecr", "et is out"],  # split in three
        ["the ", "s", "e", "c", "r", "e", "t", " is out"],  # a character at a time
        ["the secret", " is out"],  # whole, at a chunk's end
        ["the secret is out"],  # whole, in one chunk
    ],
)
def test_a_term_split_over_chunks_is_blocked_and_none_of_it_leaves(chunks):
    gate = policy(term("secret")).gate()
    out = ""
    for chunk in chunks:
        out += gate.feed(chunk)
        assert "s" not in out[len("the ") :], "a piece of the term went out"
    out += gate.finish()
    assert out == "the "
    assert gate.violation == Violation("secret", "block", 4, 6)
    assert gate.feed("more") == "" and gate.finish() == ""


def test_a_match_spanning_text_already_held_releases_only_what_precedes_it():
    gate = policy(term("secret")).gate()  # holds back 5 characters
    assert gate.feed("abc sec") == "ab"  # "c sec" held: it could start "secret"
    assert gate.feed("ret and more") == "c "
    assert gate.violation.position == 4 and gate.released == 4


def test_all_but_the_hold_back_is_released_at_once_and_the_rest_at_finish():
    gate = policy(term("secret")).gate()
    assert gate.feed("hello world") == "hello "
    assert gate.feed(" and") == "worl"
    assert gate.finish() == "d and"
    assert gate.violation is None and gate.released == len("hello world and")


def test_a_match_at_the_very_end_is_caught_at_finish():
    gate = policy({"name": "word", "regex": r"secret\b", "action": "block"}).gate()
    assert gate.feed("it is secret") == "it is "  # "secret" may still become "secrets": undecided
    assert gate.violation is None
    assert gate.finish() == ""
    assert gate.violation == Violation("word", "block", 6, 6)


def test_a_boundary_at_a_chunk_end_is_not_taken_for_a_word_end():
    """Whether `secret\\b` blocks must not depend on where the tokens split: "secrets" never matches."""
    for split in range(1, len("top secrets here")):
        text = "top secrets here"
        gate = policy({"name": "word", "regex": r"\bsecret\b", "action": "block"}).gate()
        assert feed_all(gate, [text[:split], text[split:]]) == text, split
        assert gate.violation is None


def test_lookbehind_and_word_boundaries_see_the_real_preceding_text():
    # The search restarts inside the text; a slice would make "bc" look like a word of its own.
    gate = policy({"name": "bc", "regex": r"\bbc\b", "action": "block"}).gate()
    assert feed_all(gate, ["a", "bc", " x"]) == "abc x" and gate.violation is None
    gate = policy({"name": "bc", "regex": r"\bbc\b", "action": "block"}).gate()
    assert feed_all(gate, ["a ", "bc", " x"]) == "a " and gate.violation.position == 2

    rule = {"name": "pw", "regex": r"(?<=password: )\S{4}", "action": "block"}
    gate = policy(rule).gate()
    assert feed_all(gate, ["my password: ", "hu", "nter2 ok"]) == "my password: "
    assert gate.violation == Violation("pw", "block", 13, 4)
    gate = policy(rule).gate()
    assert feed_all(gate, ["my passwords: ", "hunter2"]) == "my passwords: hunter2"


def test_a_lookahead_is_waited_for():
    gate = policy({"name": "la", "regex": r"foo(?=bar)", "action": "block"}).gate()
    assert feed_all(gate, ["xx foo", "ba", "r"]) == "xx "
    gate = policy({"name": "la", "regex": r"foo(?=bar)", "action": "block"}).gate()
    assert feed_all(gate, ["xx foo", "ba", "z"]) == "xx foobaz"


def test_terms_ignore_case_unless_told_not_to():
    gate = policy(term("key", KEY_HEADER)).gate()
    assert feed_all(gate, ["-----begin rsa ", "Private KEY-----"]) == "-----"
    exact = policy(term("key", KEY_HEADER, case_sensitive=True))
    assert feed_all(exact.gate(), ["-----begin rsa private key-----"]) == "-----begin rsa private key-----"
    assert feed_all(exact.gate(), ["-----" + KEY_HEADER]) == "-----"


def test_the_earliest_blocking_match_of_any_rule_wins():
    rules = policy(term("late", "zebra"), {"name": "early", "regex": "[0-9]{3}", "action": "block"})
    gate = rules.gate()
    assert feed_all(gate, ["a zeb", "ra 123"]) == "a "
    assert gate.violation.rule == "late"
    gate = rules.gate()
    assert feed_all(gate, ["a 123 zebra"]) == "a "
    assert gate.violation.rule == "early"


def test_gates_share_nothing():
    rules = policy(term("secret"))
    one, two = rules.gate(), rules.gate()
    one.feed("a secret")
    assert two.feed("harmless text") == "harmless"
    assert one.violation is not None and two.violation is None


def test_feeding_after_finish_is_a_bug():
    gate = policy(term("secret")).gate()
    gate.finish()
    with pytest.raises(RuntimeError):
        gate.feed("more")


# -- flags -------------------------------------------------------------------------------------------------


def test_flag_rules_hold_nothing_back_and_report_each_match_once():
    rules = policy(term("word", "hello", action="flag"))
    assert rules.hold_back == 0 and not rules.needs_hold_back and not rules.blocks
    gate = rules.gate()
    assert gate.feed("say hel") == "say hel"
    assert gate.feed("lo and hello") == "lo and hello"
    assert gate.finish() == ""
    assert gate.flags == [Violation("word", "flag", 4, 5), Violation("word", "flag", 14, 5)]
    assert gate.violation is None


def test_a_flag_is_counted_once_with_its_whole_length_while_it_grows():
    gate = policy({"name": "digits", "regex": r"\d{3,}", "max_length": 20, "action": "flag"}).gate()
    assert feed_all(gate, ["n=12", "34", "5", "6 ok"]) == "n=123456 ok"
    assert gate.flags == [Violation("digits", "flag", 2, 6)]


def test_flags_after_a_block_are_not_reported():
    gate = policy(term("stop", "stop"), term("note", "note", action="flag")).gate()
    assert feed_all(gate, ["a note, stop, note"]) == "a note, "
    assert [f.position for f in gate.flags] == [2]


# -- checkers ----------------------------------------------------------------------------------------------


def checker(target: str, action: str = "block", **more) -> dict:
    return {"name": "check", "checker": f"tests.test_policy:{target}", "action": action, **more}


def test_a_checker_offset_stops_the_text_there():
    rules = policy(checker("find_bad", hold_back=4))
    assert rules.hold_back == 4
    gate = rules.gate()
    assert gate.feed("all good ") == "all g"
    assert gate.feed("then BAD stuff") == "ood then "
    assert gate.violation == Violation("check", "block", 14, 0)


def test_a_checker_finding_released_text_stops_the_rest():
    gate = policy(checker("find_bad")).gate()  # holds nothing back
    assert gate.feed("fine ") == "fine "
    assert gate.feed("BAD") == ""  # nothing more; what went out is gone
    assert gate.violation.position == 5 and gate.feed("x") == ""
    gate = policy(checker("always")).gate()
    assert gate.feed("anything") == "" and gate.violation.position == 0


def test_a_flag_checker_holds_nothing_back():
    rules = policy(checker("find_bad", action="flag", hold_back=10))
    assert rules.hold_back == 0
    gate = rules.gate()
    assert feed_all(gate, ["a BAD", " day"]) == "a BAD day"
    assert gate.flags == [Violation("check", "flag", 2, 0)]


@pytest.mark.parametrize("target", ["explode", "not_an_offset"])
def test_a_failing_checker_fails_closed_by_default_and_never_logs_the_text(target, caplog):
    gate = policy(checker(target)).gate()
    with caplog.at_level(logging.WARNING, logger="verispec.policy"):
        assert gate.feed("private words") == ""
    assert gate.violation == Violation("check", "block", 0, 0)
    assert gate.feed("more") == "" and gate.finish() == ""
    assert "policy checker check" in caplog.text and "private" not in caplog.text


def test_a_failing_checker_blocks_from_the_first_unreleased_character():
    gate = policy(term("other", "zzz"), checker("explode_on_bang")).gate()
    assert gate.feed("private words") == "private wor"  # the term holds back two characters
    assert gate.feed("!") == ""
    assert gate.violation == Violation("check", "block", 11, 0)


def test_a_failing_checker_with_on_error_allow_lets_the_text_through(caplog):
    gate = policy(checker("explode", on_error="allow")).gate()
    with caplog.at_level(logging.WARNING, logger="verispec.policy"):
        assert feed_all(gate, ["private ", "words"]) == "private words"
    assert gate.violation is None and gate.flags == []
    assert "RuntimeError" in caplog.text and "private" not in caplog.text


def test_a_failing_flag_checker_is_flagged_once():
    gate = policy(checker("explode", action="flag")).gate()
    assert feed_all(gate, ["a", "b", "c"]) == "abc"
    assert gate.flags == [Violation("check", "flag", 0, 0)]


# -- normalised text ---------------------------------------------------------------------------------------


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" for c in text)


def every_split(text: str) -> list[list[str]]:
    """The text in two chunks cut at every position, in three around every position, and a character at a time."""
    return [[text[:i], text[i:]] for i in range(1, len(text))] + [[text[: i - 1], text[i - 1 : i + 1], text[i + 1 :]] for i in range(1, len(text))] + [list(text)]


KEY_BODY = "-----\nMIIEowIBAAKCAQEA"
OBFUSCATED_KEYS = [  # (case, the header as the output writes it)
    ("no-break space", KEY_HEADER.replace(" ", "\u00a0")),
    ("zero-width space", KEY_HEADER.replace("PRIVATE", "PRI\u200bVATE")),
    ("soft hyphen", KEY_HEADER.replace("PRIVATE", "PRI\u00adVATE")),
    ("fullwidth letters", fullwidth(KEY_HEADER)),
    ("combining accent", KEY_HEADER.replace("PRIVATE", "PRIVA\u0301TE")),
    ("precomposed accent", KEY_HEADER.replace("PRIVATE", "PRIV\u00c1TE")),
    ("doubled space", KEY_HEADER.replace(" ", "  ")),
    ("line break", KEY_HEADER.replace("RSA ", "RSA\n")),
    ("crlf and a tab", KEY_HEADER.replace("RSA ", "RSA\r\n\t")),
    ("word joiner and bom", KEY_HEADER.replace("RSA", "R\u2060S\ufeffA")),
    ("lower case, ideographic space", KEY_HEADER.lower().replace(" ", "\u3000")),
    ("all at once", fullwidth("BEGIN") + "\u00a0\u00a0RS\u200bA\n PRI\u00adVA\u0301TE\u2003KEY"),
]


@pytest.mark.parametrize("case, header", OBFUSCATED_KEYS, ids=[case for case, _ in OBFUSCATED_KEYS])
def test_an_obfuscated_key_header_is_blocked_however_the_chunks_split_it(case, header):
    """The defect's variants: the original text before the header goes out, nothing of it or after it."""
    rules = policy(term("private-key", KEY_HEADER))
    text = "your key: -----" + header + KEY_BODY
    for chunks in every_split(text):
        gate = rules.gate()
        assert feed_all(gate, chunks) == "your key: -----", (case, chunks)
        assert gate.violation == Violation("private-key", "block", 15, len(header)), (case, chunks)


def test_normalisation_keeps_the_text_it_releases_as_written():
    gate = policy(term("secret")).gate()
    text = "ｆｕｌｌ\u00a0width,\u200b  spaced\n\ntext, cafe\u0301 and a s\u00adecre"
    assert feed_all(gate, list(text)) == text  # as written, exactly: normalised text only decides
    gate = policy(term("secret")).gate()
    assert gate.feed("\u200b\u200bab\u200b\u200bcdef\u200b") == "\u200b\u200ba"  # "b..cdef" could start "secret"


def test_hold_back_counts_normalised_characters_and_holds_what_lies_between():
    gate = policy(term("secret")).gate()  # holds back 5 normalised characters
    assert gate.feed("ok s\u200be\u200bc\u200br\u200be") == "ok "  # "s.e.c.r.e" could start "secret"
    assert gate.feed("\u200bt!") == ""
    assert gate.violation == Violation("secret", "block", 3, 11)


@pytest.mark.parametrize("card", [
    "4111\u00a01111\u00a01111\u00a01111", "4111.1111.1111.1111", "4111  1111\u20091111 1111",
    fullwidth("4111111111111111"), "4111-1111\u200b-1111-1111",
])  # fmt: skip
def test_the_example_card_rule_matches_other_separators(card):
    rules = load_policy(EXAMPLE)
    text = f"pay with {card} today"
    for chunks in every_split(text):
        gate = rules.gate()
        assert feed_all(gate, chunks) == "pay with ", chunks
        assert gate.violation.rule == "card-number"


def test_a_rule_can_turn_normalisation_off():
    written = policy(term("private-key", KEY_HEADER, normalise=False))
    for _, header in OBFUSCATED_KEYS:
        assert feed_all(written.gate(), ["key: ", header, " body"]) == "key: " + header + " body"
    assert feed_all(written.gate(), ["key: ", KEY_HEADER.lower(), " body"]) == "key: "
    exact = policy({"name": "r", "regex": "a  b", "normalise": False, "action": "block"})
    assert feed_all(exact.gate(), ["xa  by"]) == "x"
    assert feed_all(policy({"name": "r", "regex": "a  b", "action": "block"}).gate(), ["xa  by"]) == "xa  by"  # one space, normalised


def test_a_regex_sees_normalised_text_and_its_own_non_ascii_is_normalised_too():
    rules = policy({"name": "r", "regex": "(?i)caf\u00e9\\b", "action": "block"})  # 'é' becomes 'e', as in the text
    for text in ("a cafe!", "a CAFE\u0301!", "a caf\u00e9!", "a ｃａｆｅ!"):
        gate = rules.gate()
        assert feed_all(gate, list(text)) == "a ", text
        assert gate.violation.position == 2


# -- the prompt's tail as context ---------------------------------------------------------------------------


def test_a_term_begun_in_the_prompt_blocks_the_output_from_its_start():
    rules = policy(term("private-key", KEY_HEADER))
    prompt, output = "continue this: -----" + KEY_HEADER[:14], KEY_HEADER[14:] + KEY_BODY
    for chunks in every_split(output):
        gate = rules.gate(context=prompt)
        assert feed_all(gate, chunks) == "", chunks
        assert gate.violation == Violation("private-key", "block", 0, len(KEY_HEADER) - 14)
    assert feed_all(rules.gate(), [output]) == output  # without the prompt, nothing to match


def test_a_prompt_ending_in_a_key_header_lets_none_of_the_body_out():
    """The header is the client's own text; the example's body rule starts in it and runs into the output."""
    rules = load_policy(EXAMPLE)
    for header in (KEY_HEADER, KEY_HEADER.replace(" ", "\u00a0"), fullwidth(KEY_HEADER)):
        prompt = "Finish this file:\n-----" + header + "-----"
        for chunks in every_split("\nMIIEowIBAAKCAQEA\n"):
            gate = rules.gate(context=prompt)
            assert feed_all(gate, chunks) == "", chunks
            assert gate.violation == Violation("private-key-body", "block", 0, 2)


def test_a_match_wholly_inside_the_prompt_is_ignored_and_the_prompt_never_released():
    rules = policy(term("secret"), term("note", "note", action="flag"))
    gate = rules.gate(context="a note: the secret")
    assert feed_all(gate, [" is ", "safe"]) == " is safe"
    assert gate.violation is None and gate.flags == []
    gate = rules.gate(context="the sec")
    assert feed_all(gate, ["re", "t is out"]) == "" and gate.violation == Violation("secret", "block", 0, 3)


def test_the_prompt_tail_is_bounded_and_counted_after_normalisation():
    rules = policy(term("private-key", KEY_HEADER))
    assert rules.context == len(KEY_HEADER) - 1
    for prompt in ("x" * 100_000 + KEY_HEADER[:9], KEY_HEADER[:9] + "\u200b" * 200, KEY_HEADER[:9] + " \n \t " * 30):
        gate = rules.gate(context=prompt)
        assert feed_all(gate, [KEY_HEADER[9:]]) == "" and gate.violation.position == 0
    assert feed_all(rules.gate(context=KEY_HEADER[:9] + "x" * 21), [KEY_HEADER[9:]]) == KEY_HEADER[9:]


def test_a_regex_anchored_at_the_start_sees_no_prompt():
    rules = policy({"name": "r", "regex": "^Sure", "action": "block"}, {"name": "w", "regex": r"\bbc", "action": "block"})
    assert rules.context == 2  # "bc" may start one character before the output, and \b reads one before it; ^Sure needs none
    gate = rules.gate(context="I said: ")
    assert feed_all(gate, ["Su", "re, here"]) == "" and gate.violation.rule == "r"
    assert feed_all(rules.gate(context="I said: Sure"), [" thing"]) == " thing"
    assert feed_all(rules.gate(context="a"), ["bc d"]) == "bc d"  # \b sees the prompt's "a"
    assert feed_all(rules.gate(context="a "), ["bc d"]) == ""


@pytest.mark.parametrize("seed", range(150))
def test_normalised_matching_does_not_depend_on_where_the_chunks_split(seed):
    """Obfuscated text with and without a prompt: cut anywhere, the gate decides as on one chunk."""
    rng = random.Random(5000 + seed)
    junk = ["\u200b", "\u00ad", "\u00a0", "  ", "\n", "\u0301", "\u2060", "Ｓ", "ｅ", "\u00e9", "\u3000"]
    pieces = WORDS + junk + ["s", "e", "c", "r", "t", "o", "k", "n"]
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 50)))
    prompt = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
    rules = policy(term("t", "secret", "token", "to ken"), term("f", "beta", action="flag"),
                   {"name": "r", "regex": r"\bsec\w\b", "action": "block"})  # fmt: skip
    whole = rules.gate(context=prompt)
    expected = feed_all(whole, [text])
    gate = rules.gate(context=prompt)
    assert feed_all(gate, random_chunks(rng, text)) == expected
    assert gate.violation == whole.violation and gate.flags == whole.flags


# -- the policy's shape ------------------------------------------------------------------------------------


def test_hold_back_is_the_longest_blocking_match_less_one():
    rules = policy(term("a", "abc", "abcdefgh"), term("f", "x" * 30, action="flag"))
    assert rules.hold_back == 7 and rules.needs_hold_back and rules.blocks
    assert rules.names == ("a", "f")
    bounded = policy({"name": "card", "regex": r"(?:\d[ -]?){13,16}", "action": "block"})
    assert bounded.hold_back == 31
    given = policy({"name": "tok", "regex": r"sk-\w+", "max_length": 50, "action": "block"})
    assert given.hold_back == 49


def test_the_example_file_loads_and_works():
    rules = load_policy(EXAMPLE)
    assert rules.names == ("private-key", "private-key-body", "card-number", "api-token", "shouting")
    assert rules.blocks and rules.hold_back == 33
    text = "pay with 4111 1111 1111 1111 today"
    gate = rules.gate()
    chunks = [text[i : i + 3] for i in range(0, len(text), 3)]
    assert feed_all(gate, chunks) == "pay with "
    assert gate.violation.rule == "card-number"
    gate = rules.gate()
    shout = "WHY WOULD ANYONE WRITE A WHOLE SENTENCE LIKE THIS"
    assert feed_all(gate, ["well ", shout, " ok"]) == "well " + shout + " ok"
    assert [f.rule for f in gate.flags] == ["shouting"]


# -- rules files that cannot be honoured --------------------------------------------------------------------


def rule(**fields) -> dict:
    return {"name": "r", "action": "block", **fields}


BAD_RULES = [
    ("not a mapping", ["a", "b"], "must hold a mapping with a 'rules' list"),
    ("empty", None, "must hold a mapping"),
    ("unknown top key", {"rules": [rule(terms=["x"])], "rule": []}, "rule: unknown key; the file takes rules"),
    ("unknown rule key", {"rules": [rule(term=["x"])]}, "rules[0].term (r): unknown key; a rule takes name"),
    ("no rules", {"rules": []}, "rules: give at least one rule"),
    ("no rules key", {}, "rules: is required"),
    ("rule not a mapping", {"rules": ["x"]}, "rules[0]: must be an object"),
    ("terms not a list", {"rules": [rule(terms="x")]}, "rules[0].terms (r): must be a list"),
    ("max_length not a number", {"rules": [rule(regex="x+", max_length="long")]}, "rules[0].max_length (r): must be an integer"),
    ("lookbehind not fixed", {"rules": [rule(regex="(?<=a+)b")]}, "regex does not compile: look-behind requires fixed-width"),
    ("rules not a list", {"rules": "x"}, "rules: must be a list"),
    ("no kind", {"rules": [rule()]}, "rules[0] (r): give exactly one of terms, regex or checker"),
    ("two kinds", {"rules": [rule(terms=["x"], regex="y")]}, "(got terms and regex)"),
    ("no action", {"rules": [{"name": "r", "terms": ["x"]}]}, "rules[0].action (r): is required"),
    ("bad action", {"rules": [rule(terms=["x"], action="drop")]}, "rules[0].action (r): must be 'block' or 'flag'"),
    ("bad name", {"rules": [rule(name="has space", terms=["x"])]}, "must be 1 to 64 letters"),
    ("long name", {"rules": [rule(name="n" * 65, terms=["x"])]}, "must be 1 to 64 letters"),
    ("duplicate name", {"rules": [rule(terms=["x"]), rule(terms=["y"])]}, "rules[1].name: 'r' is taken by rules[0]"),
    ("empty terms", {"rules": [rule(terms=[])]}, "rules[0].terms (r): must have at least 1 item"),
    ("empty term", {"rules": [rule(terms=["ok", ""])]}, "rules[0].terms[1] (r): must have at least 1 character"),
    ("bad regex", {"rules": [rule(regex="(unclosed")]}, "rules[0] (r): regex does not compile: missing )"),
    ("unbounded", {"rules": [rule(regex=r"sk-\w+")]}, "no upper length (a *, + or {n,}); give max_length"),
    ("max_length short", {"rules": [rule(regex=r"\d{10}", max_length=5)]}, "max_length 5 is shorter than the regex's longest match (10)"),
    ("max_length zero", {"rules": [rule(regex=r"x+", max_length=0)]}, "rules[0].max_length (r): must be greater than or equal to 1"),
    ("empty match", {"rules": [rule(regex=r"x*", max_length=5)]}, "can match empty text"),
    ("unbounded lookahead", {"rules": [rule(regex=r"x(?=y+)")]}, "a lookahead (?=...) or (?!...) in the regex has no upper length"),
    ("case on regex", {"rules": [rule(regex="x", case_sensitive=True)]}, "case_sensitive applies to terms rules only"),
    ("max_length on terms", {"rules": [rule(terms=["x"], max_length=3)]}, "max_length applies to regex rules only"),
    ("hold_back on terms", {"rules": [rule(terms=["x"], hold_back=3)]}, "hold_back applies to checker rules only"),
    ("negative hold_back", {"rules": [rule(checker="tests.test_policy:find_bad", hold_back=-1)]}, "greater than or equal to 0"),
    ("bad on_error", {"rules": [rule(checker="tests.test_policy:find_bad", on_error="ignore")]}, "must be 'block' or 'allow'"),
    ("checker format", {"rules": [rule(checker="tests.test_policy.find_bad")]}, "must be module:function"),
    ("checker module", {"rules": [rule(checker="no_such_module_here:check")]}, "cannot be imported (ModuleNotFoundError"),
    ("checker name", {"rules": [rule(checker="tests.test_policy:no_such_function")]}, "cannot be imported (AttributeError"),
    ("checker not callable", {"rules": [rule(checker="tests.test_policy:NOT_CALLABLE")]}, "tests.test_policy:NOT_CALLABLE is not callable (int)"),
    ("normalise on a checker", {"rules": [rule(checker="tests.test_policy:find_bad", normalise=False)]}, "normalise applies to terms and regex rules only"),
    ("invisible term", {"rules": [rule(terms=["ok", "\u200b\u00ad"])]}, "rules[0] (r): terms[1] is only invisible characters"),
]


@pytest.mark.parametrize("raw, message", [case[1:] for case in BAD_RULES], ids=[case[0] for case in BAD_RULES])
def test_a_bad_rules_file_is_one_clear_line(tmp_path, raw, message):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as caught:
        load_policy(path)
    text = str(caught.value)
    assert message in text
    assert text.startswith(f"policy file {path}") and "\n" not in text and "; rules" not in text  # one problem, one message


def test_a_missing_or_unparsable_file_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match=r"policy file .*nope\.yaml does not exist"):
        load_policy(tmp_path / "nope.yaml")
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: [unclosed\n")
    with pytest.raises(UserError) as caught:
        load_policy(path)
    assert "is not valid YAML: line 3" in str(caught.value) and "\n" not in str(caught.value)


# -- the property ------------------------------------------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "sec", "ret", "to", "ken", "tok", "pass", "word", "\n", " ", "  ", "-"]


def random_chunks(rng: random.Random, text: str) -> list[str]:
    chunks, at = [], 0
    while at < len(text):
        size = rng.choice([1, 1, 2, 3, 4, 7, 12, 40])
        chunks.append(text[at : at + size])
        at += size
    return chunks


@pytest.mark.parametrize("seed", range(300))
def test_released_text_is_exactly_the_text_before_the_first_match(seed):
    """Random text, sometimes with blocked terms planted (in random case), fed in random chunks: the
    output is the text up to the first match a search of the whole text finds, never a piece more."""
    rng = random.Random(seed)
    terms = ["secret", "token", "password", "xyzzy"]
    words = [rng.choice(WORDS) for _ in range(rng.randint(0, 60))]
    for _ in range(rng.choice([0, 0, 1, 2])):
        planted = "".join(c.upper() if rng.random() < 0.3 else c for c in rng.choice(terms))
        words.insert(rng.randint(0, len(words)), planted)
    text = "".join(words)
    gate = policy(term("t", *terms), term("f", "beta", action="flag")).gate()
    out = ""
    for chunk in random_chunks(rng, text):
        out += gate.feed(chunk)
        assert not re.search("|".join(terms), out, re.IGNORECASE)
    out += gate.finish()
    first = re.search("|".join(terms), text, re.IGNORECASE)
    assert out == (text[: first.start()] if first else text)
    assert gate.violation == (Violation("t", "block", first.start(), len(first.group())) if first else None)
    betas = [m.start() for m in re.finditer("beta", text[: first.start()] if first else text, re.IGNORECASE)]
    assert [f.position for f in gate.flags] == betas


@pytest.mark.parametrize("seed", range(200))
def test_word_bound_and_lookaround_regexes_decide_as_on_the_whole_text(seed):
    """Boundaries, lookbehind and lookahead at chunk edges: the gate blocks where, and only where,
    a search of the whole finished text matches."""
    rng = random.Random(1000 + seed)
    pattern = rng.choice([r"\btoken\b", r"(?<=pass)word", r"sec(?=ret\b)", r"\b\d{3}-\d{2}\b", r"(?<![a-z])ken(?!\d)"])
    pieces = WORDS + ["123-45", "1234-56", "123-456", "7", "ken9"]
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
    gate = policy({"name": "r", "regex": pattern, "action": "block"}).gate()
    out = feed_all(gate, random_chunks(rng, text))
    first = re.search(pattern, text)
    assert out == (text[: first.start()] if first else text), pattern
    assert (gate.violation.position if gate.violation else None) == (first.start() if first else None)
