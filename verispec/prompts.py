"""Prompt sets: JSONL files with one object per line holding a `prompt` (or `text`) field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from verispec.errors import UserError


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def load_prompts(path: Path, limit: int | None = None) -> list[Prompt]:
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be 1 or more, got {limit}")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text:
            raise UserError(f"{path}:{number}: needs a non-empty string field 'prompt'")
        prompts.append(Prompt(str(record.get("id", f"line-{number}")), text))
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts
