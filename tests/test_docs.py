"""The documentation site builds strictly, its CLI reference is complete, and the README stays a front page."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from verispec.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _subcommands() -> dict:
    import argparse

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def test_site_builds_strictly(site):
    assert (site / "index.html").is_file()


def test_cli_reference_names_every_command_and_serve_flag(site):
    page = (site / "cli" / "index.html").read_text()
    commands = _subcommands()
    assert len(commands) >= 10
    for name in commands:
        assert f'id="verispec-{name}"' in page, name
        assert f"verispec {name}" in page, name
    serve = commands["serve"]
    assert serve.settings_models
    for model, skip in serve.settings_models:
        for field in model.model_fields:
            if field not in skip:
                assert "--" + field.replace("_", "-") in page, (model.__name__, field)
                assert "VERISPEC_" + field.upper() in page, (model.__name__, field)


def test_readme_is_a_front_page():
    assert (ROOT / "README.md").stat().st_size < 16000


def test_readme_relative_links_resolve():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    relative = [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:|#", link)]
    assert relative, "the README links into docs/"
    missing = [link for link in relative if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, missing
