"""The built-in demo pair: shipped in the package, used when no model is named, and exact."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import run_verispec
from tests.serving import ServerProcess
from verispec.errors import UserError
from verispec.models import demo_pair, load_tokenizer
from verispec.models.loading import DEMO, check_compatible

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def parse_header(line):\n    "


def test_the_pair_is_small_and_speculates_together():
    target, draft = demo_pair()
    check_compatible(load_tokenizer(target), load_tokenizer(draft))
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size < 40e6, f"the demo pair takes {size / 1e6:.1f} MB; keep the package small"
    for folder in (target, draft):
        config = json.loads((Path(folder) / "config.json").read_text())
        assert config["model_type"] == "llama"  # the lean backend runs it


def test_generate_with_no_model_arguments_uses_the_demo_pair_and_is_exact():
    speculative = run_verispec("generate", "--max-new-tokens", "48", "--stats", PROMPT)
    assert speculative.returncode == 0, speculative.stderr
    assert "acceptance rate" in speculative.stderr and speculative.stdout.strip()
    plain = run_verispec("generate", "--max-new-tokens", "48", "--depth", "0", PROMPT)
    assert plain.returncode == 0, plain.stderr
    assert speculative.stdout == plain.stdout


def test_serve_with_no_model_arguments(tmp_path):
    server = ServerProcess([], log_dir=tmp_path).wait_ready()
    try:
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "verispec-demo-code"
        body = {"model": "verispec-demo-code", "prompt": PROMPT, "max_tokens": 32, "temperature": 0, "speculation_stats": True}
        reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] > 0 and reply["speculation_stats"]["proposer"] == "draft"
        assert reply["speculation_stats"]["proposed"] > 0
    finally:
        server.stop_gracefully()


def test_a_broken_installation_says_what_to_do(tmp_path, monkeypatch):
    from verispec.models import loading

    monkeypatch.setattr(loading, "DEMO_TARGET", tmp_path / "verispec-demo-code")
    with pytest.raises(UserError, match="reinstall verispec, or pass --target"):
        loading.demo_pair()
