"""Streaming text: nothing past a stop string, no partial characters, stops where verifier-only stops."""

import pytest
from transformers import AutoTokenizer

from tests.conftest import SHARED_MODELS, make_engine, random_prompts
from verispec.config import SamplingParams
from verispec.text import TextStream


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def stream_all(tokenizer, ids, stop):
    text = TextStream(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(text.push(token))
        if text.stopped:
            break
    pieces.append(text.flush())
    return pieces, text


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    ids = tokenizer("t1 t2 t3 t4 t5").input_ids
    pieces, text = stream_all(tokenizer, ids, stop=("t3 t4",))
    assert text.stopped
    assert "".join(pieces) == "t1 t2 "
    assert all("t3" not in p for p in pieces)  # the start of the stop string was held back


def test_text_without_stop_matches_decode(tokenizer):
    ids = tokenizer("t9 t8 t7 t6").input_ids
    pieces, text = stream_all(tokenizer, ids, stop=("t5",))
    assert not text.stopped
    assert "".join(pieces) == tokenizer.decode(ids)


@pytest.mark.skipif(not (SHARED_MODELS / "ref-code-target").is_dir(), reason="reference models absent")
def test_multibyte_characters_are_never_split():
    tokenizer = AutoTokenizer.from_pretrained(SHARED_MODELS / "ref-code-target")
    sample = "naïve café — 日本語 😀 done"
    ids = tokenizer(sample).input_ids
    pieces, _ = stream_all(tokenizer, ids, stop=())
    assert "".join(pieces) == sample
    assert not any("\ufffd" in p for p in pieces)


def test_engine_stops_at_stop_string_like_verifier_only(tiny_models):
    engine = make_engine(tiny_models["llama"], tiny_models["llama"])
    checked = 0
    for prompt in random_prompts(6, 64, seed=40):
        full = engine.generate(prompt, SamplingParams(max_new_tokens=30), depth=0)
        words = full.text.split()
        if len(words) < 6:
            continue
        stop = f"{words[4]} {words[5]}"
        expected = full.text[: full.text.index(stop)]
        for depth in (0, 4):
            out = engine.generate(prompt, SamplingParams(max_new_tokens=30, stop=[stop]), depth=depth)
            assert out.finish_reason == "stop"
            assert out.text == expected
            assert stop not in out.text
        checked += 1
    assert checked >= 3
