"""Function calling without a model: tools written into prompts as each template family writes
them, the grammar of a required call, and calls read back out of text however it is chunked.

The tokenizer is the reference target's (a byte-level BPE code model) with three chat templates
written here in the conventions of the families the server supports: one that knows no tools
(SmolLM2's kind: the tools go into the system message), a Qwen2-style one (`<tool_call>` blocks)
and a Llama-3-style one (a JSON object per call)."""

from __future__ import annotations

import copy
import json

import pytest

from tests.conftest import SHARED_MODELS
from verispec.core.grammar import compiled
from verispec.tool_calls import Function, Reader, Template, constraint, render

pytestmark = pytest.mark.skipif(not (SHARED_MODELS / "ref-code-target").is_dir(), reason="the reference pair is not in ../shared/models")

PLAIN = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)
QWEN_LIKE = (
    "{% if tools %}<|endoftext|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    'Call one as <tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n{% endif %}'
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|endoftext|>assistant\n{% for c in m.tool_calls %}"
    '<tool_call>\n{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}\n'
    "{% elif m.role == 'tool' %}<|endoftext|>user\n<tool_response>\n{{ m.content }}\n</tool_response>\n"
    "{% else %}<|endoftext|>{{ m.role }}\n{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)
LLAMA_LIKE = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}'
    "{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
    "{% if tools %}<|start_header_id|>user<|end_header_id|>\n\nFunctions:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|eot_id|>{% endif %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
WEATHER = Function(
    "get_weather", "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]},
)  # fmt: skip
TIME = Function("get_time", None, {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]})
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 22"},
]  # fmt: skip


@pytest.fixture(scope="module")
def base_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED_MODELS / "ref-code-target")


def templated(tokenizer, template: str):
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def test_each_template_family_is_recognised(base_tokenizer):
    assert Template.of(templated(base_tokenizer, PLAIN)) == Template("hermes", native=False)
    assert Template.of(templated(base_tokenizer, QWEN_LIKE)) == Template("hermes", native=True)
    assert Template.of(templated(base_tokenizer, LLAMA_LIKE)) == Template("llama3", native=True)


def test_a_template_without_tools_gets_them_in_the_system_message_and_calls_in_the_turns(base_tokenizer):
    text = render(templated(base_tokenizer, PLAIN), CONVERSATION, [WEATHER], "auto")
    system = text.split("<|endoftext|>")[1]
    assert system.startswith("system\nBe brief.\n\n# Tools") and '"name": "get_weather"' in system
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "user\n<tool_response>\nsunny, 22\n</tool_response>" in text
    assert text.endswith("<|endoftext|>assistant\n")
    without = render(templated(base_tokenizer, PLAIN), CONVERSATION, [WEATHER], "none")
    assert "# Tools" not in without and "<tool_response>" in without  # the conversation is kept whole


def test_a_template_that_renders_tools_gets_them_and_the_arguments_as_objects(base_tokenizer):
    text = render(templated(base_tokenizer, QWEN_LIKE), CONVERSATION, [WEATHER, TIME], "required")
    assert text.count('{"type": "function"') == 2
    assert '"arguments": {"city": "Paris"}' in text  # not a JSON string inside JSON
    llama = render(templated(base_tokenizer, LLAMA_LIKE), CONVERSATION, [WEATHER], "auto")
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in llama and "Functions:" in llama


def walk(constraint_, tokenizer, text: str) -> bool:
    """Whether the constraint takes `text` token by token and may then end."""
    matcher = constraint_.start()
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        if not matcher.allows(token):
            return False
        matcher.advance([token])
    return matcher.allows(tokenizer.eos_token_id)


@pytest.mark.parametrize("template", [PLAIN, LLAMA_LIKE], ids=["hermes", "llama3"])
def test_a_required_call_follows_the_declared_schemas(base_tokenizer, template):
    tokenizer = templated(base_tokenizer, template)
    llama = template is LLAMA_LIKE
    key = "parameters" if llama else "arguments"

    def call(name, arguments):
        body = json.dumps({"name": name, key: arguments})
        return body if llama else f"<tool_call>\n{body}\n</tool_call>"

    vocab = len(tokenizer)
    required = compiled(constraint(tokenizer, [WEATHER, TIME], "required", parallel=True), tokenizer, vocab)
    joiner = "; " if llama else "\n"
    assert walk(required, tokenizer, call("get_weather", {"city": "Oslo", "unit": "c"}))
    assert walk(required, tokenizer, joiner.join([call("get_weather", {"city": "Oslo"}), call("get_time", {"zone": "UTC"})]))
    assert not walk(required, tokenizer, call("get_weather", {"unit": "c"}))  # a required argument missing
    assert not walk(required, tokenizer, call("get_weather", {"city": "Oslo", "unit": "k"}))  # not in the enum
    assert not walk(required, tokenizer, call("launch", {}))  # not declared
    assert not walk(required, tokenizer, "The weather is fine.")
    named = compiled(constraint(tokenizer, [WEATHER, TIME], "get_time", parallel=False), tokenizer, vocab)
    assert walk(named, tokenizer, call("get_time", {"zone": "UTC"}))
    assert not walk(named, tokenizer, call("get_weather", {"city": "Oslo"}))
    assert not walk(named, tokenizer, joiner.join([call("get_time", {"zone": "UTC"})] * 2))  # one call only
    assert constraint(tokenizer, [WEATHER], "auto", True) is None and constraint(tokenizer, [WEATHER], "none", True) is None


def read(reader: Reader, text: str, size: int) -> tuple[str, list]:
    content, calls = [], []
    for start in range(0, len(text), size):
        piece, new = reader.feed(text[start : start + size])
        content.append(piece)
        calls += new
    rest, new = reader.finish()
    return "".join(content) + rest, calls + new


HERMES_REPLY = (
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


@pytest.mark.parametrize("size", [1, 2, 5, 11, 1000])
def test_calls_are_read_back_however_the_text_arrives(base_tokenizer, size):
    content, calls = read(Reader(templated(base_tokenizer, PLAIN), [WEATHER, TIME]), HERMES_REPLY, size)
    assert content == "Checking.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_what_is_not_a_declared_call_stays_text(base_tokenizer):
    tokenizer = templated(base_tokenizer, PLAIN)
    for text in [
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>',  # not declared
        '<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>',  # arguments not an object
        "a < b and <tool_ca",  # a marker's start, then the end of the reply
        'unfinished <tool_call>\n{"name": "get_weather"',
    ]:
        assert read(Reader(tokenizer, [WEATHER]), text, 3) == (text, []), text
    one, calls = read(Reader(tokenizer, [WEATHER, TIME], parallel=False), HERMES_REPLY, 4)
    assert [c.name for c in calls] == ["get_weather"]


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_llama_style_calls_are_read_back(base_tokenizer, size):
    tokenizer = templated(base_tokenizer, LLAMA_LIKE)
    two = '{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {"zone": "UTC"}}'
    content, calls = read(Reader(tokenizer, [WEATHER, TIME]), two, size)
    assert content == "" and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Rome"}
    assert read(Reader(tokenizer, [WEATHER]), "It is sunny {mostly}.", size) == ("It is sunny {mostly}.", [])
    assert read(Reader(tokenizer, [WEATHER]), '{"name": "nope", "parameters": {}}', size)[1] == []
