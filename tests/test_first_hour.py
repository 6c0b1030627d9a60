"""A new user's first hour: a fast CLI, a prompt set that ships, visible stats, clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

import verispec
from verispec.audit.store import AuditStore
from verispec.cli import DEMO_PROMPTS
from verispec.prompts import load_prompts

from .conftest import run_verispec

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Runs in a fresh interpreter: the test process itself has long since imported torch.
LIGHT_COMMANDS = """
import contextlib, io, json, sys
from verispec.cli import build_parser, main

build_parser()
with contextlib.redirect_stdout(io.StringIO()):
    for argv in (["--help"], ["audit", "--help"], ["loadtest", "--help"], ["distill", "--help"], ["train", "--help"]):
        try:
            main(argv)
        except SystemExit:
            pass
    codes = [main(["audit", "--audit-url", sys.argv[1]]), main(["audit", "--audit-url", sys.argv[1], "--jsonl"])]
print(json.dumps({"codes": codes, "heavy": sorted({"torch", "transformers"} & set(sys.modules))}))
"""


def test_help_and_audit_import_neither_torch_nor_transformers(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    AuditStore(url).close()  # an empty audit trail
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_COMMANDS, url], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"codes": [0, 0], "heavy": []}


def test_package_names_still_load_on_first_use():
    from verispec.core.engine import Engine
    from verispec.stats import RequestStats

    assert verispec.Engine is Engine
    assert verispec.RequestStats is RequestStats
    assert set(verispec.__all__) <= set(dir(verispec))
    with pytest.raises(AttributeError, match="no_such_name"):
        verispec.no_such_name  # noqa: B018


def test_client_extra_installs_openai_and_the_readme_says_so():
    assert any(req.startswith("openai") for req in PYPROJECT["project"]["optional-dependencies"]["client"])
    readme = (ROOT / "README.md").read_text()
    before_example = readme[: readme.index("```python\nfrom openai import OpenAI")]
    paragraph_before = before_example.rstrip().rsplit("\n\n", 1)[-1]
    assert "pip install -e '.[client]'" in paragraph_before


def test_sample_prompts_parse_and_ship_with_the_package():
    prompts = load_prompts(DEMO_PROMPTS)
    assert 8 <= len(prompts) <= 16
    assert len({p.id for p in prompts}) == len(prompts)
    assert not any(p.id.startswith("line-") for p in prompts)  # every line names its id
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]["verispec"]
    relative = DEMO_PROMPTS.relative_to(ROOT / "verispec").as_posix()
    assert any(fnmatch(relative, pattern) for pattern in package_data)


def test_check_runs_on_the_demo_pair_with_the_sample_prompts(tmp_path):
    report = tmp_path / "check.json"
    result = run_verispec("check", "--limit", "2", "--depth", "2", "--max-new-tokens", "24", "--report", str(report))
    assert result.returncode == 0, result.stderr
    written = json.loads(report.read_text())
    assert written["prompts"] == str(DEMO_PROMPTS)
    assert written["prompt_count"] == 2
    assert written["depths"][0]["identical"] == 2
    assert written["sampled"]["depths"][0]["identical"] == 2  # seeded samples: the verifier-only text at depth 2


def test_check_help_shows_the_prompt_format_and_default():
    result = run_verispec("check", "--help")
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())
    assert '{"id": "fib", "prompt":' in flat
    assert "prompts.jsonl" in flat


@pytest.mark.parametrize("proposer", ["draft", "none"])
def test_generate_stats_name_the_proposer(tiny_models, proposer):
    draft = tiny_models["llama-draft"]
    result = run_verispec(
        "generate", "--target", tiny_models["llama"], "--draft", draft, "--proposer", proposer,
        "--max-new-tokens", "6", "--stats", "t1 t2 t3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = f"draft:{draft}" if proposer == "draft" else "none"
    # A long path folds over lines in the table, so compare without whitespace.
    assert "proposer" + expected in "".join(result.stderr.split()), result.stderr


def test_audit_mismatches_without_json_lines_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    AuditStore(url).close()
    result = run_verispec("audit", "--audit-url", url, "--mismatches")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "verispec: error: --mismatches needs JSON lines: add --jsonl (print them) or --out FILE (write them)"
    ]
    assert run_verispec("audit", "--audit-url", url, "--mismatches", "--jsonl").returncode == 0


def test_help_shows_no_internal_placeholders():
    """A default made at run time (the per-user audit database) printed as 'PydanticUndefined'."""
    result = run_verispec("serve", "--help")
    assert result.returncode == 0 and "Undefined" not in result.stdout
    assert "per-user data folder" in result.stdout
