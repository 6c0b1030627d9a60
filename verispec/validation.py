"""Validation errors in the user's terms, one per field: shared by the server's 400s and the CLI.

Pydantic reports a union's failure once per branch, with the branch's type in the location
(`prompt.str`, `prompt.list[int].0`, `depth.literal['auto']`). A user sent one value and wants one
answer: the forms the field takes, or, when the value has the shape of only one form (a list,
where a string or a list of content parts is expected), what is wrong inside that form.

Branch tags are told from field names by their spelling: pydantic writes them as type names
(`str`, `int`, `list[...]`, `literal[...]`, `function-after[...]`, `constrained-int`, a model's
class name), while our fields and flags are snake_case. Only a dict key spelled like a type name
could be mistaken for one; the message would then be vaguer, never wrong about which field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

Location = tuple[str | int, ...]

# What users call the forms of our union fields, where the types alone say less ("token ids").
KNOWN_FORMS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "depth": "an integer (0 or more) or 'auto'",
    "content": "a string or a list of content parts",
}

_SCALARS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "none": "null",
}
_PLURALS = {"str": "strings", "int": "integers", "float": "numbers", "bool": "booleans", "none": "nulls"}
_TYPE_MESSAGES = {
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer, not a number with a fraction",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "missing": "is required",
}
# Failures that say "the value is not of this form at all", as opposed to "right form, bad content".
_WRONG_FORM = {
    "literal_error",
    "enum",
    "none_required",
    "is_instance_of",
    "int_parsing",
    "float_parsing",
    "bool_parsing",
}
_BRACKETED = re.compile(r"[a-z][a-z-]*\[.*\]")
_HYPHENATED = re.compile(r"[a-z]+(?:-[a-z]+)+")


@dataclass(frozen=True)
class Problem:
    """One bad field: where (names and list indices, no type tags), what is wrong, what was sent."""

    location: Location
    message: str  # reads after the field's name: "must be ...", "is required", "holds ..."
    input: Any = None

    def path(self) -> str:
        """`messages[0].content`: the field as a JSON client names it."""
        text = ""
        for part in self.location:
            text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
        return text


def problems(errors: Sequence[ErrorDetails] | ValidationError) -> list[Problem]:
    """The errors of one validation, one `Problem` per field, in the order pydantic found them."""
    if isinstance(errors, ValidationError):
        errors = errors.errors()
    return _problems([(tuple(error["loc"]), error) for error in errors])


def _problems(errors: list[tuple[Location, ErrorDetails]]) -> list[Problem]:
    order: list[Problem | Location] = []  # a Problem, or the location of a union field told later
    unions: dict[Location, dict[str, list[tuple[Location, ErrorDetails]]]] = {}
    for location, error in errors:
        split = _split_at_tag(location)
        if split is None:
            # A validator that inspects a whole object names the spot inside it in its context's
            # `at`: the client's own keys, added after the tags are gone, since any may look like one.
            inside = tuple((error.get("ctx") or {}).get("at", ()))
            order.append(Problem(location + inside, _message(error), error.get("input")))
            continue
        field, tag, rest = split
        if field not in unions:
            order.append(field)
        unions.setdefault(field, {}).setdefault(tag, []).append((field + rest, error))
    found: list[Problem] = []
    for entry in order:
        if isinstance(entry, Problem):
            found.append(entry)
            continue
        branches = unions[entry]
        fitting = [tag for tag, errs in branches.items() if any(_fits(loc, err, entry) for loc, err in errs)]
        if len(fitting) == 1:  # the value has this form's shape: say what is wrong inside it
            found.extend(_problems(branches[fitting[0]]))
        else:
            sent = next(iter(branches.values()))[0][1].get("input")
            found.append(Problem(entry, f"must be {forms(entry, list(branches))}", sent))
    return found


def forms(location: Location, tags: list[str]) -> str:
    """'a string, a list of strings or null': the forms a union field takes, in words."""
    names = [part for part in location if isinstance(part, str)]
    if names and names[-1] in KNOWN_FORMS:
        return KNOWN_FORMS[names[-1]]
    return _join([_describe(tag) for tag in tags])


def _split_at_tag(location: Location) -> tuple[Location, str, Location] | None:
    for index, part in enumerate(location):
        if index > 0 and isinstance(part, str) and _is_tag(part):
            return location[:index], part, location[index + 1 :]
    return None


def _is_tag(part: str) -> bool:
    return (
        part in _SCALARS
        or part[:1].isupper()
        or bool(_BRACKETED.fullmatch(part) or _HYPHENATED.fullmatch(part))
    )


def _fits(location: Location, error: ErrorDetails, field: Location) -> bool:
    """Whether this branch's error lies inside the value (right form, bad content)."""
    if location != field:
        return True
    return not (error["type"].endswith("_type") or error["type"] in _WRONG_FORM)


def _describe(tag: str, plural: bool = False) -> str:
    """`list[int]` -> 'a list of integers'; `literal['auto','off']` -> "'auto' or 'off'"."""
    head, _, inner = tag.partition("[")
    arguments = _arguments(inner.removesuffix("]"))
    if head in _SCALARS:
        return _PLURALS[head] if plural else _SCALARS[head]
    if head == "literal":
        return _join(arguments)
    if head in ("list", "tuple", "set", "frozenset") and arguments:
        return ("lists of " if plural else "a list of ") + _describe(arguments[0], plural=True)
    if head.startswith("function-") and arguments:  # function-after[check(), str]: the type is last
        return _describe(arguments[-1], plural)
    if head.startswith("constrained-"):
        return _describe(head.removeprefix("constrained-"), plural)
    return "objects" if plural else "an object"  # dict[...] or a model's class name


def _arguments(inner: str) -> list[str]:
    """'list[int], str' -> ['list[int]', 'str']: split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(inner):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(inner[start:index].strip())
            start = index + 1
    tail = inner[start:].strip()
    return [*parts, tail] if tail else parts


def _join(words: list[str]) -> str:
    unique = list(dict.fromkeys(words))
    return unique[0] if len(unique) == 1 else ", ".join(unique[:-1]) + " or " + unique[-1]


def _message(error: ErrorDetails) -> str:
    """Pydantic's message as a phrase after the field's name; our validators' reasons as they are."""
    if error["type"] in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[error["type"]]
    message = error["msg"].removeprefix("Value error, ").replace(" after validation", "")
    return re.sub(r"^(?:Input|String|List|Dictionary|Tuple|Value) should ", "must ", message)
