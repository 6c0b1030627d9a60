"""The policy rules file: what verified text must not contain, and what happens when it does.

A rule is a list of terms, a regular expression or a checker function, with an action: `block`
stops the response before the match reaches the client, `flag` lets it through and counts it.
Terms compile to a regex, so every rule but a checker is a regex whose longest match is known;
that bound is what lets the gate (`gate.py`) stream, holding back only the characters a match
could still need. Terms and regexes match normalised text (NFKC, marks and invisible characters
dropped, whitespace runs one space; see `gate.py`) unless the rule says `normalise: false`; a
rule's terms are normalised the same way, a regex's non-ASCII characters too. The loader refuses
what it cannot bound rather than guess, and reports every problem as one `UserError` line that
names the file, the rule and the field.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from verispec.errors import UserError
from verispec.policy.gate import (
    Action,
    Checker,
    CheckerRule,
    PatternRule,
    PolicySet,
    normalise,
    normalise_pattern,
)
from verispec.validation import problems

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KINDS = ("terms", "regex", "checker")
_ONLY_FOR = {  # the keys only some kinds of rule take
    "case_sensitive": ("terms",), "max_length": ("regex",), "normalise": ("terms", "regex"),
    "hold_back": ("checker",), "on_error": ("checker",),
}


class RuleSpec(BaseModel):
    """One rule as the file writes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    action: Action
    terms: tuple[Annotated[str, Field(min_length=1)], ...] = Field((), min_length=1)
    regex: str = ""
    checker: str = ""  # module:function
    case_sensitive: bool = False
    max_length: int | None = Field(None, ge=1)  # required when the regex's longest match is unbounded
    normalise: bool = True  # match normalised text (gate.py); false: the text exactly as written
    hold_back: int = Field(0, ge=0)  # characters a blocking checker wants to see before they go out
    on_error: Literal["block", "allow"] = "block"  # block: a checker error counts as a finding of this rule

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("must be 1 to 64 letters, digits, '_', '.' or '-' (it becomes a metric label)")
        return value

    @field_validator("checker")
    @classmethod
    def _target(cls, value: str) -> str:
        module, sep, function = value.partition(":")
        if not (sep and module.strip() and function.strip()):
            raise ValueError("must be module:function, as in verispec.policy.examples:shouting")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> RuleSpec:
        given = [kind for kind in _KINDS if kind in self.model_fields_set]
        if len(given) != 1:
            got = f" (got {' and '.join(given)})" if given else ""
            raise ValueError(f"give exactly one of terms, regex or checker{got}")
        for key, kinds in _ONLY_FOR.items():
            if key in self.model_fields_set and given[0] not in kinds:
                raise ValueError(f"{key} applies to {' and '.join(kinds)} rules only; remove it from this {given[0]} rule")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if kind in self.model_fields_set)


class RulesFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: tuple[RuleSpec, ...]


def load_policy(path: str | Path) -> PolicySet:
    """Read, validate and compile a rules file; any problem is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"policy file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UserError(f"policy file {path} is not valid YAML: {where}{getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"policy file {path} cannot be read: {exc}") from None
    return parse_policy(raw, f"policy file {path}")


def parse_policy(raw: Any, source: str = "policy") -> PolicySet:
    """The rules file's content (as YAML loads it) to a PolicySet; `source` starts every error message."""
    if not isinstance(raw, dict):
        raise UserError(f"{source} must hold a mapping with a 'rules' list, as deploy/policy/rules.example.yaml does")
    try:
        specs = RulesFile.model_validate(raw).rules
    except ValidationError as exc:
        raise UserError(f"{source}: {_describe(exc, raw)}") from None
    if not specs:  # no rules would let everything through while the operator thinks a policy is on
        raise UserError(f"{source}: rules: give at least one rule")
    seen: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if spec.name in seen:
            raise UserError(f"{source}: rules[{index}].name: {spec.name!r} is taken by rules[{seen[spec.name]}]; give each rule its own name")
        seen[spec.name] = index
    compiled = [_compile(index, spec, f"{source}: rules[{index}] ({spec.name})") for index, spec in enumerate(specs)]
    return PolicySet(
        tuple(rule for rule in compiled if isinstance(rule, PatternRule)),
        tuple(rule for rule in compiled if isinstance(rule, CheckerRule)),
        source,
    )


def _describe(exc: ValidationError, raw: dict) -> str:
    """One line for all of a validation's errors: where (with the rule's name), then what to do."""
    parts = []
    for error in exc.errors():
        problem = problems([error])[0]
        location, message = problem.path() or "the file", problem.message
        if error["type"] == "extra_forbidden":
            takes = "name, action, terms, regex, checker, " + ", ".join(_ONLY_FOR) if len(error["loc"]) > 1 else "rules"
            message = f"unknown key; {'a rule' if len(error['loc']) > 1 else 'the file'} takes {takes}"
        loc = error["loc"]
        if len(loc) > 1 and loc[0] == "rules" and isinstance(loc[1], int):
            rules = raw.get("rules")
            entry = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                location += f" ({entry['name']})"
        parts.append(f"{location}: {message}")
    return "; ".join(parts)


def _compile(index: int, spec: RuleSpec, where: str) -> PatternRule | CheckerRule:
    if spec.kind == "checker":
        return CheckerRule(index, spec.name, spec.action, _import(spec.checker, where), spec.hold_back, spec.on_error)
    fold = spec.kind == "terms" and spec.normalise and not spec.case_sensitive  # case-folded text, not IGNORECASE
    if spec.kind == "terms":
        terms = spec.terms
        if spec.normalise:
            terms = tuple(normalise(term, fold) for term in terms)
            if "" in terms:
                raise UserError(f"{where}: terms[{terms.index('')}] is only invisible characters; remove it or set normalise: false")
        # Longest first: a term that starts another one must not hide it (the match's length is reported).
        terms = sorted(set(terms), key=len, reverse=True)
        source, flags = "|".join(map(re.escape, terms)), 0 if spec.case_sensitive or spec.normalise else re.IGNORECASE
    else:
        source, flags = normalise_pattern(spec.regex) if spec.normalise else spec.regex, 0
    try:
        pattern = re.compile(source, flags)
    except re.error as exc:
        raise UserError(f"{where}: regex does not compile: {exc}") from None
    shape = _measure(source, flags)
    if shape is None:  # a Python whose parser we cannot read: trust max_length, assume short lookarounds
        if spec.max_length is None:
            raise UserError(f"{where}: give max_length, the longest text a match of this regex spans")
        anchored = "^" in source or "\\A" in source
        return PatternRule(index, spec.name, spec.action, pattern, spec.max_length, 2, spec.normalise, fold, 2, anchored)
    shortest, longest, lookahead, behind, anchored = shape
    if shortest == 0:
        raise UserError(f"{where}: the regex can match empty text; make it match at least one character")
    if lookahead is None:
        raise UserError(f"{where}: a lookahead (?=...) or (?!...) in the regex has no upper length; bound it, as in {{0,20}}")
    if longest is None and spec.max_length is None:
        raise UserError(f"{where}: the regex's matches have no upper length (a *, + or {{n,}}); give max_length, the longest text a match spans")
    if longest is not None and spec.max_length is not None and spec.max_length < longest:
        raise UserError(f"{where}: max_length {spec.max_length} is shorter than the regex's longest match ({longest}); raise it or drop it")
    return PatternRule(index, spec.name, spec.action, pattern, spec.max_length or longest, lookahead, spec.normalise, fold, behind, anchored)


def _import(target: str, where: str) -> Checker:
    module_name, _, attribute = target.partition(":")
    try:
        found: Any = importlib.import_module(module_name.strip())
        for part in attribute.strip().split("."):
            found = getattr(found, part)
    except Exception as exc:  # an import runs arbitrary code: any failure is the operator's to fix
        reason = (str(exc).splitlines() or [""])[0]
        raise UserError(f"{where}: checker {target} cannot be imported ({type(exc).__name__}: {reason}); install its package or fix the name") from None
    if not callable(found):
        raise UserError(f"{where}: checker {target} is not callable ({type(found).__name__}); name a function as module:function")
    return found


# -- how long a regex's match can be, and how far past it the regex reads --------------------------------


def _measure(source: str, flags: int) -> tuple[int, int | None, int | None, int, bool] | None:
    """(shortest, longest or None if unbounded, lookahead or None if unbounded, lookbehind, anchored
    at the start), read from CPython's regex parser (3.11+: `re._parser`); None where that parser is
    missing or has changed shape."""
    try:
        from re import _constants as c
        from re import _parser

        parsed = _parser.parse(source, flags)
        shortest, longest = parsed.getwidth()
        unbounded = int(c.MAXREPEAT)
        anchored = any(op is c.AT and arg in (c.AT_BEGINNING, c.AT_BEGINNING_STRING) for op, arg in _nodes(parsed, _parser))
        behind = _lookbehind(parsed, _parser, c)
        return shortest, (longest if longest < unbounded else None), _lookahead(parsed, _parser, c), behind, anchored
    except Exception:
        return None


def _lookahead(parsed, _parser, c) -> int | None:
    """How far past the end of a match the pattern may read: `$` two characters (it matches before a
    final newline), `\\b`, `\\B` and `\\Z` one, a lookahead its own longest width plus its own lookahead."""
    reach = 0
    for op, argument in _nodes(parsed, _parser):
        if op is c.AT and argument not in (c.AT_BEGINNING, c.AT_BEGINNING_STRING, c.AT_BEGINNING_LINE):
            reach = max(reach, 2 if argument in (c.AT_END, c.AT_END_LINE) else 1)
        elif op in (c.ASSERT, c.ASSERT_NOT) and argument[0] == 1:  # direction 1: ahead, -1: behind
            inner, beyond = argument[1].getwidth()[1], _lookahead(argument[1], _parser, c)
            if inner >= int(c.MAXREPEAT) or beyond is None:
                return None
            reach = max(reach, inner + beyond)
    return reach


def _lookbehind(parsed, _parser, c) -> int:
    """How far before the start of a match the pattern may read: `\\b` and `\\B` one character, a
    lookbehind its width (fixed: Python requires it)."""
    reach = 0
    for op, argument in _nodes(parsed, _parser):
        if op is c.AT and argument in (c.AT_BOUNDARY, c.AT_NON_BOUNDARY):
            reach = max(reach, 1)
        elif op in (c.ASSERT, c.ASSERT_NOT) and argument[0] == -1:
            reach = max(reach, argument[1].getwidth()[1] + _lookbehind(argument[1], _parser, c))
    return reach


def _nodes(parsed, _parser):
    """Every (op, argument) of a parsed pattern, nested groups, branches and repeats included."""
    for op, argument in parsed:
        yield op, argument
        for part in argument if isinstance(argument, tuple | list) else (argument,):
            for sub in part if isinstance(part, list) else (part,):
                if isinstance(sub, _parser.SubPattern):
                    yield from _nodes(sub, _parser)
