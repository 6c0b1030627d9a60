"""Exactness on the shared reference pair (a trained code model and its draft)."""

import pytest

from tests.conftest import SHARED_MODELS, SHARED_PROMPTS, make_engine
from verispec.config import SamplingParams, load_settings
from verispec.prompts import load_prompts
from verispec.tools.check import run_check

pytestmark = pytest.mark.skipif(
    not (SHARED_MODELS / "ref-code-target").is_dir() or not SHARED_PROMPTS.is_file(),
    reason="reference pair or prompts absent (../shared)",
)
TARGET, DRAFT = str(SHARED_MODELS / "ref-code-target"), str(SHARED_MODELS / "ref-code-draft")


@pytest.mark.parametrize("proposer, depths", [("draft", [3, "auto"]), ("ngram", [4])])
def test_speculative_equals_verifier_only_on_a_sample(proposer, depths):
    engine = make_engine(TARGET, DRAFT, proposer=proposer)
    params = SamplingParams(max_new_tokens=48)
    accepted = 0
    for prompt in load_prompts(SHARED_PROMPTS, limit=5):
        reference = engine.generate(prompt.text, params, depth=0)
        for depth in depths:
            out = engine.generate(prompt.text, params, depth=depth)
            assert out.token_ids == reference.token_ids, (prompt.id, depth)
            assert out.text == reference.text
            accepted += out.stats.accepted
    assert accepted > 0


def test_sampling_on_the_reference_pair_is_reproducible():
    engine = make_engine(TARGET, DRAFT)
    prompt = load_prompts(SHARED_PROMPTS, limit=1)[0].text
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=11, max_new_tokens=32)
    first = engine.generate(prompt, params, depth="auto")
    assert engine.generate(prompt, params, depth="auto").token_ids == first.token_ids
    assert first.stats.proposed > 0


@pytest.mark.slow
def test_check_all_shared_prompts():
    """The issue's acceptance run: 64/64 identical at fixed and adaptive depth (several minutes)."""
    settings = load_settings({"target": TARGET, "draft": DRAFT, "max_new_tokens": 128})
    assert run_check(settings, SHARED_PROMPTS, depths=["3", "auto"]) == 0
