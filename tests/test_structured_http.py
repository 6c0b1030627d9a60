"""Structured outputs and tool calls over real HTTP: the openai client's own
`chat.completions.parse()`, schemas and regular expressions on completions and chat, tool calls
as the client's types read them, streamed or not, exact under speculation, and hostile formats
and tools answered with a clear 400 in bounded time.

One server of the reference pair (a byte-level BPE code model, which can write JSON), its target
given a ChatML-style chat template in a folder of links to the shared files."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import SHARED_MODELS
from tests.serving import ServerProcess

pytestmark = pytest.mark.skipif(not (SHARED_MODELS / "ref-code-target").is_dir(), reason="the reference pair is not in ../shared/models")
MODEL = "code-chat"
TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)


class Point(BaseModel):
    x: int
    y: int
    label: str


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("structured") / MODEL
    folder.mkdir()
    source = SHARED_MODELS / "ref-code-target"
    for item in source.iterdir():
        if item.name != "tokenizer_config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((source / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    proc = ServerProcess(
        ["--target", str(folder), "--draft", str(SHARED_MODELS / "ref-code-draft-distilled"), "--max-new-tokens", "96"],
        log_dir=tmp_path_factory.mktemp("logs"),
    ).wait_ready()
    yield proc
    proc.stop_gracefully()


def post(server, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)


def test_the_openai_clients_parse_returns_the_pydantic_object(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "A point as JSON"}], response_format=Point, temperature=0,
        max_tokens=96,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Point), message.content
    assert completion.choices[0].finish_reason == "stop"


def test_a_schema_holds_and_speculation_changes_no_token_streamed_or_not(server):
    schema = {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 16}, "ok": {"type": "boolean"}},
        "required": ["id", "name", "ok"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "row", "schema": schema, "strict": True}}
    body = {"prompt": "rows = [\n    ", "max_tokens": 96, "temperature": 0, "response_format": fmt}
    texts = {depth: post(server, {**body, "depth": depth}).json()["choices"][0]["text"] for depth in (0, 3, "auto")}
    assert len(set(texts.values())) == 1, texts
    jsonschema.validate(json.loads(texts[0]), schema)
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": MODEL, **body, "stream": True}, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == texts[0]


def test_a_regex_and_a_seeded_sample_on_chat(server):
    fmt = {"type": "regex", "regex": r"[A-Z][a-z]{2,8} [0-9]{1,3}"}
    body = {"messages": [{"role": "user", "content": "a name and a number"}], "max_tokens": 32, "temperature": 1.0, "seed": 3,
            "response_format": fmt}  # fmt: skip
    texts = {d: post(server, {**body, "depth": d}, "/v1/chat/completions").json()["choices"][0]["message"]["content"] for d in (0, 4)}
    assert len(set(texts.values())) == 1
    assert __import__("re").fullmatch(fmt["regex"], texts[0])


@pytest.mark.parametrize(
    "fmt, message",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {f"k{i}": {"type": "string", "description": "d" * 64} for i in range(1200)}}}}, "larger than 64 KiB"),
        ({"type": "regex", "regex": "(a"}, "invalid regex"),
        ({"type": "json_schema"}, "needs its 'json_schema' field"),
        ({"type": "xml"}, "response_format.type"),
    ],
)
def test_hostile_formats_are_400_within_seconds(server, fmt, message):
    start = time.monotonic()
    response = post(server, {"prompt": "x = ", "max_tokens": 8, "response_format": fmt})
    assert time.monotonic() - start < 10
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] is not None and error["param"].startswith("response_format"), error
    if message:
        assert message in error["message"], error


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "regex", "regex": "((a{1,100}){1,100}){1,100}"},
        {"type": "regex", "regex": "((a|aa)*){1000}"},
        {"type": "grammar", "grammar": 'start: s\ns: s s | "a"'},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}},
    ],
)
def test_formats_that_explode_end_in_bounded_time_never_a_500(server, fmt):
    """Each is refused at compile time (400) or runs within llguidance's fuel limits; whichever the
    engine decides, the answer comes in seconds and is no 5xx."""
    start = time.monotonic()
    response = post(server, {"prompt": "x = ", "max_tokens": 8, "response_format": fmt})
    assert time.monotonic() - start < 20
    assert response.status_code in (200, 400), response.text


def test_a_recursive_schema_is_followed(server):
    """A tree by $ref (recursion the schema means, not a loop): it compiles and holds."""
    node = {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
            "required": ["v", "kids"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "tree", "schema": node}}
    response = post(server, {"prompt": "tree = ", "max_tokens": 96, "temperature": 0, "response_format": fmt})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    if choice["finish_reason"] == "stop":  # a deep tree may run past max_tokens; what came is still a prefix
        jsonschema.validate(json.loads(choice["text"]), node)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False},
}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"], "additionalProperties": False,
}}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


def test_a_required_tool_call_parses_in_the_clients_types_identical_across_depths_and_streams(server):
    calls = {}
    for depth in (0, 3, "auto"):
        completion = client(server).chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, temperature=0,
            max_tokens=96, extra_body={"depth": depth},
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls and choice.message.content is None
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
            jsonschema.validate(json.loads(call.function.arguments), schema)
        calls[depth] = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert len({json.dumps(v) for v in calls.values()}) == 1, calls
    with client(server).chat.completions.stream(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, temperature=0,
        max_tokens=96,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == calls[0]


def test_parallel_calls_arrive_each_whole_with_its_index_streamed_or_not(server):
    """This code model, made to call, calls again and again: each finished call is read, in order;
    the one max_tokens cut short stays text."""
    body = {"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required", "temperature": 0, "max_tokens": 160}
    message = post(server, body, "/v1/chat/completions").json()["choices"][0]["message"]
    whole = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert len(whole) >= 2
    calls, content = [], []
    for chunk in client(server).chat.completions.create(model=MODEL, stream=True, **body):
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for call in delta.tool_calls or ():
            assert call.index == len(calls) and call.id.startswith("call_")
            calls.append((call.function.name, call.function.arguments))
    assert calls == whole
    assert ("".join(content) or None) == message["content"]  # the call max_tokens cut short, as text


def test_a_named_function_is_the_one_call_and_none_means_no_call(server):
    named = client(server).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0, max_tokens=64,
    ).choices[0]
    assert [c.function.name for c in named.message.tool_calls] == ["get_time"]
    json.loads(named.message.tool_calls[0].function.arguments)
    plain = client(server).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=16,
    ).choices[0]
    assert plain.message.tool_calls is None and plain.finish_reason in ("stop", "length")
    one = client(server).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, temperature=0,
        max_tokens=96,
    ).choices[0]
    assert len(one.message.tool_calls) == 1


def test_a_conversation_with_calls_and_their_results_goes_on(server):
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_7", "content": "sunny, 22"},
    ]  # fmt: skip
    response = post(server, {"messages": messages, "tools": [WEATHER], "max_tokens": 8, "temperature": 0}, "/v1/chat/completions")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            f"p{i}": {"type": "string", "description": "d" * 64} for i in range(1200)}}}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "x": {"type": "string", "pattern": "((a|aa)*){1000}"}}}}}], "tool_choice": "required"}, "tools"),
    ],
)
def test_hostile_tools_are_400_within_seconds(server, extra, param):
    start = time.monotonic()
    response = post(server, {"messages": ASK, "max_tokens": 8, **extra}, "/v1/chat/completions")
    assert time.monotonic() - start < 10
    if response.status_code == 200:  # a pattern llguidance can follow within its fuel: bounded, and no 5xx
        assert "pattern" in json.dumps(extra)
        return
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param), error


def test_a_format_that_fails_mid_request_is_a_400_for_its_client_alone(server):
    """A regex that compiles within the limits, then runs out of lexer fuel after a few dozen a's
    (min_tokens keeps the model writing them): its client gets a 400 that says so, while a request
    running beside it in the same passes gets its answer, the same text as alone."""
    good = {"prompt": "def handler(event):\n    data = ", "max_tokens": 96, "temperature": 0, "depth": 0}
    alone = post(server, good).json()["choices"][0]["text"]
    bad = {"prompt": "x = ", "max_tokens": 64, "min_tokens": 64, "depth": 0,
           "response_format": {"type": "regex", "regex": "((a{1,100}){1,100}){1,95}"}}  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        good_response, bad_response = pool.map(lambda body: post(server, body), [good, bad])
    assert bad_response.status_code == 400, bad_response.text
    assert "too costly to follow" in bad_response.json()["error"]["message"]
    assert good_response.status_code == 200, good_response.text
    assert good_response.json()["choices"][0]["text"] == alone
    assert good_response.json()["usage"]["completion_tokens"] > 40  # one pass a token: it outlived the failing one
