"""What a careless or hostile client can send, over real HTTP to a real server: never a 500, always
an OpenAI-shaped 400 that names the field in the client's terms.

Bodies are written as raw JSON text, since the interesting ones (lone surrogates, `true` for a
number) are what a well-typed client library would never produce.
"""

from __future__ import annotations

import json
import re
import shutil

import httpx
import pytest
from transformers import AutoTokenizer

from tests.serving import ServerProcess
from verispec.config import load_settings
from verispec.errors import UserError
from verispec.server.errors import APIError

KEY = "sk-hostile-0123456789"
MODEL = "chat-llama"
PROMPT_FORMS = "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids"
# Pydantic's union branch tags, which once leaked into messages: 'prompt.str', 'depth.literal['auto']'.
_TAG = re.compile(r"\.(str|int|float|bool)\b|list\[|literal\[|function-|constrained-")


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    """The tiny llama with a chat template (so /v1/chat/completions works), behind an API key."""
    target = tmp_path_factory.mktemp("hostile") / MODEL
    shutil.copytree(tiny_models["llama"], target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t9{% endif %}"
    tokenizer.save_pretrained(target)
    proc = ServerProcess(
        ["--target", str(target), "--proposer", "ngram", "--max-new-tokens", "4"],
        log_dir=tmp_path_factory.mktemp("logs"), env={"VERISPEC_API_KEYS": KEY},
    ).wait_ready()
    yield proc
    proc.stop_gracefully()


def send(server: ServerProcess, body: str | bytes, path: str = "/v1/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    return httpx.post(server.url + path, content=body, headers=headers, timeout=60)


def refused(response: httpx.Response) -> dict:
    """The OpenAI error object of a 400, after checking the body is plain ASCII JSON."""
    assert response.status_code == 400, response.text
    response.content.decode("ascii")  # escapes only: renders whatever text it quotes
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert not _TAG.search(error["message"]), error["message"]
    return error


def completion(**fields) -> str:
    return json.dumps({"model": MODEL, "max_tokens": 2, **fields})


def chat(*messages: dict, **fields) -> str:
    return json.dumps({"model": MODEL, "max_tokens": 2, "messages": list(messages), **fields})


# -- text that is not valid Unicode ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, path, param",
    [
        (completion(prompt="def f(): \ud800 x"), "/v1/completions", "prompt"),  # once a 500: the tokenizer raised
        (completion(prompt="t1", model="bad\udfff"), "/v1/completions", "model"),  # once a 500: the 400 failed to encode
        (completion(prompt=["t1", "t2 \udc00"]), "/v1/completions", "prompt[1]"),
        (completion(prompt="t1", stop=["\ud83d"]), "/v1/completions", "stop[0]"),
        (completion(prompt="t1", not_a_field={"deep": ["\udfff"]}), "/v1/completions", "not_a_field.deep[0]"),
        (completion(prompt="t1", Extra={"Str": "\udfff"}), "/v1/completions", "Extra.Str"),  # keys spelled like type tags
        (chat({"role": "user", "content": "t1 \ud800"}), "/v1/chat/completions", "messages[0].content"),
        (chat({"role": "user", "content": [{"type": "text", "text": "\udbff"}]}), "/v1/chat/completions", "messages[0].content[0].text"),
    ],
)
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(server, body, path, param):
    assert "\\ud" in body  # the JSON escape itself, as a client would send it
    error = refused(send(server, body, path))
    assert error["param"] == param
    assert error["message"].startswith(f"'{param}' holds a lone surrogate (\\u")
    assert "not valid Unicode" in error["message"]


def test_a_surrogate_pair_is_valid_text(server):
    assert send(server, completion(prompt="t1 \ud83d\ude00")).status_code == 200
    assert send(server, chat({"role": "user", "content": "t1 \ud83d\ude00"}), "/v1/chat/completions").status_code == 200


def test_error_bodies_render_any_text():
    """Messages quote what clients sent; a surrogate in one must not turn the 400 into a 500."""
    response = APIError(400, "unknown model 'bad\udfff'", param="model").response()
    assert json.loads(response.body)["error"]["message"] == "unknown model 'bad\udfff'"


@pytest.mark.parametrize("field", ["model", "user", "task", "proposer"])
def test_nul_is_refused_in_names(server, field):
    fields = {"prompt": "t1", field: f"{MODEL if field == 'model' else 'x'}\u0000"}
    error = refused(send(server, completion(**fields)))
    assert error["param"] == field
    assert error["message"] == f"'{field}' must not contain a NUL character (\\u0000)"


def test_nul_is_kept_in_text(server):
    assert send(server, completion(prompt="t1 \u0000 t2", stop=["\u0000"])).status_code == 200
    assert send(server, chat({"role": "user", "content": "t1\u0000"}), "/v1/chat/completions").status_code == 200


def test_bodies_that_are_not_json_text_are_a_400(server):
    assert refused(send(server, b'{"model": "chat-llama", "prompt": "\xff\xfe"}'))  # not UTF-8
    assert refused(send(server, "[" * 100_000 + "]" * 100_000))  # deeper than the JSON parser goes
    nested = completion(prompt="t1", tools="HERE").replace('"HERE"', "[" * 200 + '"\\udfff"' + "]" * 200)
    assert refused(send(server, nested))["param"] == "tools" + "[0]" * 200  # found however deep it sits


def test_a_vanishing_top_p_keeps_the_most_likely_token(server):
    """Found by the fuzzer: a top_p below float32's smallest number rounded to 0 in the sampler,
    which then dropped every token and sampled from NaNs (a 500)."""
    for path, body in (("/v1/completions", completion(prompt="t1", top_p=5e-324)),
                       ("/v1/chat/completions", chat({"role": "user", "content": "t1"}, top_p=5e-324))):
        response = send(server, body, path)
        assert response.status_code == 200, response.text


# -- strict types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, path, param, message",
    [
        (completion(prompt="t1", max_tokens=True), "/v1/completions", "max_tokens", "'max_tokens' must be an integer"),
        (completion(prompt=[True, False]), "/v1/completions", "prompt", PROMPT_FORMS),
        (completion(prompt="t1", stream="yes"), "/v1/completions", "stream", "'stream' must be true or false"),
        (completion(prompt="t1", temperature="1"), "/v1/completions", "temperature", "'temperature' must be a number"),
        (completion(prompt="t1", seed=1.5), "/v1/completions", "seed", "'seed' must be an integer"),
        (completion(prompt="t1", depth="3"), "/v1/completions", "depth", "'depth' must be an integer (0 or more) or 'auto'"),
        (completion(prompt="t1", stream_options={"include_usage": 1}), "/v1/completions", "stream_options.include_usage",
         "'stream_options.include_usage' must be true or false"),
        (chat({"role": "user", "content": "t1"}, stream=1), "/v1/chat/completions", "stream", "'stream' must be true or false"),
    ],
)
def test_lax_values_are_refused(server, body, path, param, message):
    error = refused(send(server, body, path))
    assert (error["param"], error["message"]) == (param, message)


@pytest.mark.parametrize(
    "body, path",
    [
        (completion(prompt="t1", temperature=1, top_p=1, depth="auto"), "/v1/completions"),  # integers fill numbers
        (completion(prompt=["t1 t2"], depth=2, stop="t3"), "/v1/completions"),
        (completion(prompt=[1, 2, 3], stop=["t3", "t4"], stream=True), "/v1/completions"),
        (completion(prompt=[[1, 2, 3]], stream=True, stream_options={"include_usage": True}), "/v1/completions"),
        (chat({"role": "user", "content": [{"type": "text", "text": "t1"}]}, max_completion_tokens=2), "/v1/chat/completions"),
        (chat({"role": "system", "content": None}, {"role": "user", "content": "t1", "name": "ann"}), "/v1/chat/completions"),
    ],
)
def test_every_valid_form_still_passes(server, body, path):
    response = send(server, body, path)
    assert response.status_code == 200, response.text


# -- messages in the user's terms ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, path, param, message",
    [
        (completion(prompt=5), "/v1/completions", "prompt", PROMPT_FORMS),
        (completion(prompt=["t1", 2]), "/v1/completions", "prompt", PROMPT_FORMS),
        (completion(prompt="t1", depth="x"), "/v1/completions", "depth", "'depth' must be an integer (0 or more) or 'auto'"),
        (completion(prompt="t1", stop=7), "/v1/completions", "stop", "'stop' must be a string or a list of strings"),
        (completion(prompt="t1", stop=["t2", 7]), "/v1/completions", "stop[1]", "'stop[1]' must be a string"),
        (chat({"role": "user", "content": 5}), "/v1/chat/completions", "messages[0].content",
         "'messages[0].content' must be a string or a list of content parts"),
        (chat({"role": "user", "content": [{"type": "text", "text": 5}]}), "/v1/chat/completions",
         "messages[0].content[0].text", "'messages[0].content[0].text' must be a string"),
        (chat({"role": "bot", "content": "t1"}), "/v1/chat/completions", "messages[0].role",
         "'messages[0].role' must be 'system', 'developer', 'user', 'assistant' or 'tool'"),
        ("[1, 2]", "/v1/completions", None, "the body must be an object"),
    ],
)
def test_one_message_per_field_without_pydantic_internals(server, body, path, param, message):
    error = refused(send(server, body, path))
    assert (error["param"], error["message"]) == (param, message)


def test_several_bad_fields_are_each_named_once(server):
    error = refused(send(server, completion(prompt=5, max_tokens=0, depth="x")))
    assert error["message"] == (  # in the order of the model's fields
        f"'max_tokens' must be greater than or equal to 1; 'depth' must be an integer (0 or more) or 'auto'; {PROMPT_FORMS}"
    )
    assert error["param"] == "max_tokens"


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"depth": "x"}, "--depth: must be an integer (0 or more) or 'auto' (got 'x')"),
        ({"depth": "1.5"}, "--depth: must be an integer (0 or more) or 'auto' (got '1.5')"),
        ({"temperature": "-1"}, "--temperature: must be greater than or equal to 0 (got '-1')"),
        ({"proposer": "oracle"}, "--proposer: must be 'auto', 'draft', 'ngram', 'suffix', 'head' or 'none' (got 'oracle')"),
    ],
)
def test_cli_messages_are_in_the_users_terms(flags, message):
    with pytest.raises(UserError) as caught:
        load_settings(flags)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),  # past the 1024 entries OpenAI allows
        ({"logit_bias": {"99999999999999999999": 1.0}}, "logit_bias"),  # no int64 wrap-around
        ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": "1"}}, "logit_bias.5"),
        ({"logit_bias": {"5": float("nan")}}, "logit_bias"),  # Python's JSON reader takes NaN: the range check must
        ({"logit_bias": [5, 1]}, "logit_bias"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids[0]"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 2**70}, "min_tokens"),
        ({"logprobs": True}, "logprobs"),  # completions take a count, not chat's switch
        ({"presence_penalty": float("inf")}, "presence_penalty"),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_hostile_controls_are_400(server, fields, param):
    error = refused(send(server, completion(prompt="t1", max_tokens=2, **fields)))
    assert error["param"] == param, error
