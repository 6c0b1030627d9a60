"""Training text: the standard library's sources (on every machine) and user-given files.

The shared evaluation prompts are cut from standard-library modules whose names start with q, r or
s, so everything here that reads the standard library leaves those out: a model trained or
distilled on it is still evaluated on text it never saw."""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path

from verispec.errors import UserError
from verispec.prompts import load_prompts

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


def text_documents(sources: tuple[str, ...], flag: str = "--data") -> list[str]:
    """Texts of JSONL files ('text' or 'prompt' fields), folders of .py files, single files, globs."""
    documents = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(path.rglob("*.py"))
        elif path.is_file():
            files = [path]
        else:
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"{flag} {source}: no such file, folder or matching files")
        for file in files:
            if file.suffix == ".jsonl":
                documents.extend(p.text for p in load_prompts(file))
            else:
                try:
                    documents.append(file.read_text(encoding="utf-8"))
                except UnicodeDecodeError:
                    raise UserError(f"{flag} {file}: not UTF-8 text") from None
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise UserError(f"{flag} {' '.join(sources)}: all documents are empty")
    return documents
