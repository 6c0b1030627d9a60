"""Values as settings take them: a depth, repeatable text, a comma-separated list, a size in bytes;
and the other names a setting may go by."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic.fields import FieldInfo

Depth = int | Literal["auto"]


class AlsoNamed:
    """A setting's other names, as metadata of its field (`Annotated[int, AlsoNamed("max_tokens")]`).
    Each is as good as the field's own name, as a flag (`--max-tokens`), a `VERISPEC_*` variable and
    a config-file key; flags, --help and the CLI reference list them first, as the names to use (the
    field's own stays for the code, and for those who know it)."""

    def __init__(self, *names: str):
        self.names = names


def also_named(field: FieldInfo) -> tuple[str, ...]:
    """The other names of a settings field (see `AlsoNamed`), or ()."""
    return next((m.names for m in field.metadata if isinstance(m, AlsoNamed)), ())


def strings(value: Any) -> Any:
    """A repeatable text setting as a tuple: a flag's list, a config file's list, or one variable's
    text, which holds one value, or several as a JSON list (`VERISPEC_STOP='["\\n\\n", "END"]'`)."""
    if isinstance(value, str):
        if value.startswith("["):
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                return (value,)
            return tuple(decoded) if isinstance(decoded, list) else (value,)
        return (value,)
    return tuple(value) if isinstance(value, list | tuple) else value


def comma_list(value: Any, allowed: tuple[str, ...] | None = None, what: str = "value") -> tuple[Any, ...]:
    """A list setting: 'a, b' (a flag, a variable, a config file's string), ['a,b', 'c'] (a repeated
    flag) or [2, 4, 'auto'] (a config file's list) -> ('a', 'b', ...) in order, blanks dropped.
    ValueError for a value given twice or, with `allowed`, an unknown one."""
    items = [value] if isinstance(value, str) else list(value)
    values = tuple(
        part.strip() if isinstance(part, str) else part
        for item in items
        for part in (item.split(",") if isinstance(item, str) else [item])
        if not isinstance(part, str) or part.strip()
    )
    if len(set(values)) != len(values):
        raise ValueError(f"give each {what} once")
    unknown = [v for v in values if v not in allowed] if allowed is not None else []
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}; choose among {', '.join(allowed)}")
    return values


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str | int) -> int:
    """'1GiB', '512MiB', '2e9' or 1073741824 -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError("give bytes as a number with an optional unit: 1073741824, 512MiB, 2GiB, 1.5GB")
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ValueError("must be more than 0 bytes")
    return value
