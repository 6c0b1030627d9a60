"""Function calling in a chat: the tools written into the prompt as the model's template writes
them, the call constrained where the client requires one, and the model's text read back into
calls.

Two formats, chosen from the chat template:
- `hermes`: each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, as
  Qwen2/2.5, Hermes and most ChatML-style tool templates write it. Templates that do not know
  tools at all (SmolLM2's) get it too: the tools and the instructions go into the system message
  (`fallback`), the assistant's earlier calls into its turns, tool results into a user turn
  within `<tool_response>` tags, as Qwen2.5's own template does.
- `llama3`: the whole reply is `{"name": ..., "parameters": {...}}` (several joined by `; `), as
  Llama 3.1/3.2's JSON tool template has it; an optional `<|python_tag|>` is read past.

`tool_choice` "required" or a named function constrains the output to calls (a Lark grammar with
each function's parameter schema as `%json`, compiled by the structured-output engine, so calls
are exact under speculation like any constrained output); "auto" leaves the model free and reads
calls back where it wrote them; "none" leaves the tools out of the prompt and reads nothing back.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from verispec.config import ResponseFormat
from verispec.core.grammar import JSON_FORMAT
from verispec.text import chat_text

Format = Literal["hermes", "llama3"]
Choice = Literal["none", "auto", "required"] | str  # a function's name: that function, required
OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def declared(self) -> dict[str, Any]:
        """As OpenAI's `tools` entry, which templates render."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def body(self, index: int | None = None) -> dict[str, Any]:
        """As OpenAI's `tool_calls` entry (with `index` in a stream's delta)."""
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class Template:
    """How a model's chat template takes tools: the call format, and whether it renders tools itself
    (`native`) or we write them into the system message."""

    format: Format
    native: bool

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> Template:
        template = getattr(tokenizer, "chat_template", None) or ""
        if isinstance(template, dict):  # named templates: the tool one where there is one
            template = template.get("tool_use") or template.get("default") or ""
        if OPEN in template:
            return cls("hermes", True)
        if "<|start_header_id|>" in template and "tools" in template:
            return cls("llama3", True)
        return cls("hermes", False)


def _arguments(text: str) -> Any:
    """A call's arguments as templates expect them: the JSON object, or the text where it is not one."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], functions: Sequence[Function], choice: Choice,
) -> str:
    """The conversation as the model's prompt, with the tools it may call (none with `choice` "none").
    Messages are OpenAI's: an assistant turn may hold `tool_calls` (id, function name, arguments as
    JSON text), a `tool` turn answers one by `tool_call_id`."""
    template = Template.of(tokenizer)
    tools = [f.declared() for f in functions] if choice != "none" else []
    if template.native:
        turns = []
        for message in messages:
            turn = dict(message)
            if turn.get("tool_calls"):
                turn["tool_calls"] = [
                    {**call, "function": {**call["function"], "arguments": _arguments(call["function"]["arguments"])}}
                    for call in turn["tool_calls"]
                ]
            turns.append(turn)
        return chat_text(tokenizer, turns, tools=tools or None)
    return chat_text(tokenizer, _hermes_turns(messages, tools))


def _system_text(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(tool) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f'{OPEN}{CLOSE} XML tags:\n{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}'
    )


def _hermes_call(name: str, arguments: str) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': _arguments(arguments)})}\n{CLOSE}"


def _hermes_turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Plain role/content turns for a template that knows nothing of tools."""
    turns: list[dict[str, str]] = []
    if tools:
        if messages and messages[0]["role"] in ("system", "developer"):
            first, messages = messages[0], messages[1:]
            turns.append({"role": "system", "content": f"{first.get('content') or ''}\n\n{_system_text(tools)}"})
        else:
            turns.append({"role": "system", "content": _system_text(tools)})
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if turns and turns[-1]["role"] == "user" and turns[-1]["content"].endswith("</tool_response>"):
                turns[-1]["content"] += "\n" + response  # results of one round of calls: one turn
            else:
                turns.append({"role": "user", "content": response})
            continue
        calls = [_hermes_call(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()]
        turns.append({"role": role, "content": "\n".join(([content] if content else []) + calls)})
    return turns


def constraint(tokenizer: PreTrainedTokenizerBase, functions: Sequence[Function], choice: Choice, parallel: bool) -> ResponseFormat | None:
    """The grammar a reply must follow: calls only, of the named function or any declared one (one,
    or several with `parallel`), each with arguments its parameter schema allows. None for "auto"
    and "none"."""
    if choice in ("auto", "none"):
        return None
    callable_ = [f for f in functions if choice == "required" or f.name == choice]
    fmt = Template.of(tokenizer).format
    key = "parameters" if fmt == "llama3" else "arguments"
    schema = {
        "x-guidance": JSON_FORMAT,
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, key: f.parameters},
                "required": ["name", key],
                "additionalProperties": False,
            }
            for f in callable_
        ],
    }
    body = f"%json {json.dumps(schema)}"
    if fmt == "llama3":
        more = ' ("; " call)*' if parallel else ""
        rules = f"start: call{more}\ncall: {body}\n"
    else:
        more = ' ("\\n" call)*' if parallel else ""
        rules = f'start: call{more}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: {body}\n'
    return ResponseFormat(type="grammar", grammar=rules)


def _call(data: Any, names: frozenset[str], key: str) -> ToolCall | None:
    """A parsed call object, if it names a declared function and has object arguments."""
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get(key, data.get("arguments", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False))


class Reader:
    """Reads calls out of a reply as its text arrives: `feed` gives the text that is surely content
    (sent at once) and the calls completed so far; text that may start a call is held until it is
    one or is not. `finish` gives the rest. A block that does not parse as a call of a declared
    function stays content, as the model wrote it."""

    _LLAMA_LEAD = re.compile(r"\s*(<\|python_tag\|>)?\s*")

    def __init__(self, tokenizer: PreTrainedTokenizerBase, functions: Sequence[Function], parallel: bool = True):
        self.format = Template.of(tokenizer).format
        self.names = frozenset(f.name for f in functions)
        self.parallel = parallel
        self.held = ""
        self.calls: list[ToolCall] = []
        self._content_seen = False  # llama3: a reply that began as text is text

    def _keep(self, calls: list[ToolCall]) -> list[ToolCall]:
        room = None if self.parallel else max(0, 1 - len(self.calls))
        kept = calls if room is None else calls[:room]
        self.calls += kept
        return kept

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.held += text
        if self.format == "llama3":
            if self._content_seen:
                out, self.held = self.held, ""
                return out, []
            lead = self._LLAMA_LEAD.match(self.held)
            rest = self.held[lead.end():]
            if not rest or rest.startswith("{") or "<|python_tag|>".startswith(rest):
                return "", []  # may be calls: held to the end
            self._content_seen = True
            out, self.held = self.held, ""
            return out, []
        content, calls = [], []
        while True:
            start = self.held.find(OPEN)
            if start < 0:
                cut = _partial_suffix(self.held, OPEN)
                if (self.calls or calls) and not self.held[:cut].strip():
                    break  # whitespace after a call: content only if text follows it
                content.append(self.held[:cut])
                self.held = self.held[cut:]
                break
            end = self.held.find(CLOSE, start)
            if end < 0:
                before = self.held[:start]
                content.append("" if (self.calls or calls) and not before.strip() else before)
                self.held = self.held[start:]
                break
            block = self.held[start : end + len(CLOSE)]
            call = _call(_json(block[len(OPEN) : -len(CLOSE)]), self.names, "arguments")
            before = self.held[:start]
            if call is None:
                content.append(before + block)
            else:
                content.append(before if before.strip() else "")  # whitespace between calls is not content
                calls.append(call)
            self.held = self.held[end + len(CLOSE) :]
        return "".join(content), self._keep(calls)

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self.held = self.held, ""
        if self.format == "llama3" and not self._content_seen:
            body = held[self._LLAMA_LEAD.match(held).end():]
            parts = [_json(p) for p in re.split(r";\s*(?=\{)", body.strip())] if body.strip() else []
            calls = [_call(p, self.names, "parameters") for p in parts]
            if parts and all(calls):
                return "", self._keep(calls)
            return held, []
        return (held if held.strip() or not self.calls else ""), []


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """Where the longest end of `text` that could begin `marker` starts (len(text) if none)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return len(text) - size
    return len(text)
