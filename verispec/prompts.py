"""Prompts: sets in JSONL files (one object per line holding a `prompt` or `text` field), and windows
cut from the standard library's sources, which every machine has.

The shared evaluation prompts are cut from standard-library modules whose names start with q, r or
s, so everything that trains on the standard library leaves those out (`stdlib_files`): a model
trained or distilled on it is still evaluated on text it never saw."""

from __future__ import annotations

import json
import random
import sysconfig
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


HELD_OUT_INITIALS = ("q", "r", "s")  # the shared prompts are cut from stdlib modules named so
# Left out of the reference pair's training corpus, or not Python code (site-packages: other
# projects; pydoc_data and encodings: text and codec tables).
STDLIB_SKIPPED = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages",
                  "__pycache__", "pydoc_data", "encodings"}  # fmt: skip


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None, held_out: bool = False) -> list[Path]:
    """The standard library's readable .py files in name order: the training side (default), or
    with `held_out` only the q/r/s modules the shared prompts come from."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in STDLIB_SKIPPED or p.startswith("config-") for p in parts):  # config-*: build scripts
            continue
        if any(p.lower().startswith(HELD_OUT_INITIALS) for p in parts) != held_out:
            continue
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(path)
    return files


def stdlib_windows(
    count: int, seed: int = 0, lines: int = 40, root: Path | None = None, held_out: bool = False
) -> list[Prompt]:
    """`count` windows of `lines` lines from the standard library, none from a held-out module
    (or, with `held_out`, only from those: evaluation text for models trained on the rest)."""
    root = root or stdlib_root()
    candidates: list[tuple[Path, int]] = []
    for path in stdlib_files(root, held_out=held_out):
        length = len(path.read_text(encoding="utf-8").splitlines())
        candidates.extend((path, start) for start in range(0, max(1, length - lines // 2), lines))
    rng = random.Random(seed)
    rng.shuffle(candidates)
    windows = []
    for path, start in candidates:
        text = "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[start : start + lines])
        if len(text.strip()) < 400:  # mostly blank or a short file tail
            continue
        windows.append(Prompt(f"{path.relative_to(root)}:{start + 1}", text))
        if len(windows) == count:
            break
    if len(windows) < count:
        raise UserError(
            f"--stdlib-prompts {count}: the standard library under {root} gives only {len(windows)} windows"
        )
    return windows
