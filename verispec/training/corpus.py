"""Training text: the standard library's sources (on every machine, see `verispec.prompts`) and
user-given files."""

from __future__ import annotations

import glob
from pathlib import Path

from verispec.errors import UserError
from verispec.prompts import load_prompts, stdlib_files, stdlib_root  # noqa: F401 (re-exported)


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
