"""The OpenAI API's request and response shapes, and our extensions.

Requests are validated here (types and ranges); what needs the model (prompt length, the chat
template, the model name) is checked in `state.py`. Unknown fields are ignored, as OpenAI's newer
clients send fields older servers do not know; fields we know but cannot honour (suffix,
best_of > 1) are refused with a clear 400, since ignoring them would silently change what the
client asked for. Every control is applied per verified position, so each is
exact under speculation (`core/processing.py`).

Types are strict, as OpenAI's are: `true` is not a token count, `"yes"` does not turn streaming
on, `[true, false]` is not a list of token ids (a JSON integer still fills a number field). Every
string in a body must be valid Unicode: JSON's `\\ud800` escape can carry a lone surrogate,
which no tokenizer, log or UTF-8 encoder takes, so it is refused wherever it sits, unknown fields
included. NUL characters are refused in names (model, user, task, proposer, a message's name),
where they are never meant and break C-string consumers, and allowed in text (prompts, messages,
stop sequences): they are valid Unicode, code and data can hold them, and the tokenizer takes them.

Extensions (send them with the openai client's `extra_body`):
- `top_k`: keep the k most likely tokens (0 = off);
- as vLLM names them: `repetition_penalty`, `min_p`, `min_tokens`, `stop_token_ids`, `ignore_eos`;
- `sampled_acceptance`: "coupled" (default: a seed gives the same text at any depth, proposer and
  load) or "rejection" (speculative sampling's rejection rule);
- `depth`: speculation depth for this request, an integer (0 = verifier only) or "auto";
- `speculation_stats`: add a `speculation_stats` object to the response (the final chunk when
  streaming);
- `task`: a tag (e.g. "code", "chat") the per-request proposer choice can keep its figures by;
- `proposer`: run this request on the named proposer of the server (one of its `--proposers`,
  its `--proposer`, or `canary`), bypassing the per-request choice and the canary split; such
  pinned requests feed neither's figures (for side-by-side comparisons and debugging);
- `provisional` (streaming only): also send each round's drafts as soon as the proposer makes
  them, as `event: provisional`, and the verifier's answer as `event: verdict` before the round's
  verified chunk. The plain `data:` chunks stay exactly the verified text.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from verispec.config import Depth, ResponseFormat, SamplingParams
from verispec.core.grammar import compiled
from verispec.core.processing import check_token_ids
from verispec.core.rounds import Delta, TokenLogprob
from verispec.errors import UserError
from verispec.server.errors import bad_request
from verispec.server.logprobs import LogprobFormat
from verispec.stats import RequestStats, speculation_stats, usage
from verispec.tool_calls import Function, Reader, ToolCall, constraint, render

_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_SCHEMA_CHARS = 64 << 10  # a JSON schema, as JSON text
MAX_REGEX_CHARS = 4 << 10
MAX_GRAMMAR_CHARS = 64 << 10
MAX_TOOLS = 128  # as OpenAI
MAX_TOOLS_CHARS = 64 << 10  # every tool's declaration, as JSON text


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character (\\u0000)")
    return value


def _name(max_length: int | None = None) -> Any:
    """A string that names something: no NUL characters (the length is checked first, so a too
    long value gets pydantic's own message about characters)."""
    return Annotated[str, StringConstraints(max_length=max_length), AfterValidator(_no_nul)]


Name = _name()
UserName = _name(256)
Tag = _name(64)


def lone_surrogate(data: Any) -> tuple[tuple[str | int, ...], str] | None:
    """Where in a parsed JSON body a string (or a key) holds a lone surrogate, and that surrogate;
    None when all its text is valid Unicode. A loop, not recursion: bodies can nest deep."""
    pending: list[tuple[tuple[str | int, ...], Any]] = [((), data)]
    while pending:
        location, value = pending.pop()
        if isinstance(value, str):
            found = None if value.isascii() else _SURROGATE.search(value)
            if found:
                return location, found.group()
        elif isinstance(value, dict):
            for key, item in value.items():
                found = _SURROGATE.search(key) if isinstance(key, str) and not key.isascii() else None
                if found:  # named with its surrogates escaped, so the message itself stays valid text
                    return (*location, key.encode("utf-8", "backslashreplace").decode()), found.group()
                pending.append(((*location, key), item))
        elif isinstance(value, list):
            pending.extend(((*location, index), item) for index, item in enumerate(value))
    return None


class _Part(BaseModel):
    """A piece of a request body: strict types, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Part):
    include_usage: bool = False


class JsonSchemaFormat(_Part):
    name: Name = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatBody(_Part):
    """OpenAI's `response_format`; `regex` and `grammar` (Lark syntax) are our extensions."""

    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = Field(None, max_length=MAX_REGEX_CHARS)
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)

    @model_validator(mode="after")
    def _complete(self) -> ResponseFormatBody:
        needs = {"json_schema": "json_schema", "regex": "regex", "grammar": "grammar"}.get(self.type)
        if needs is not None and getattr(self, needs) is None:
            raise ValueError(f"a response_format of type '{self.type}' needs its '{needs}' field")
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            if len(json.dumps(self.json_schema.schema_)) > MAX_SCHEMA_CHARS:
                raise ValueError(f"the JSON schema is larger than {MAX_SCHEMA_CHARS // 1024} KiB")
        return self

    def settings(self) -> ResponseFormat:
        schema = None
        if self.json_schema is not None:
            spec = self.json_schema
            schema = {"name": spec.name, "schema": spec.schema_ or {}, "strict": bool(spec.strict)}
        return ResponseFormat(type=self.type, json_schema=schema, regex=self.regex, grammar=self.grammar)


class _Request(_Part):
    model: Name
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 = off, as in vLLM
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)  # choices; each one a job of its own, the prompt's KV shared by the prefix cache
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: UserName | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    # extensions, named as vLLM names them
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)  # smaller would overflow float32 logits
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    ignore_eos: bool | None = None
    sampled_acceptance: Literal["coupled", "rejection"] | None = None
    response_format: ResponseFormatBody | None = None
    # extensions of our own
    depth: Depth | None = None
    speculation_stats: bool | None = None
    task: Tag | None = None  # a tag the per-request proposer choice may key on
    proposer: Tag | None = None  # pin the request to one of the server's proposers
    provisional: bool | None = None  # stream drafts before their verdict, as named SSE events

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = lone_surrogate(data)
        if found is not None:
            location, surrogate = found
            raise PydanticCustomError(
                "lone_surrogate",
                "holds a lone surrogate ({surrogate}), which is not valid Unicode; send UTF-8 text",
                {"surrogate": ascii(surrogate)[1:-1], "at": location},
            )
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()) or len(key) > 9:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} must lie between -100 and 100")
        return value

    @field_validator("depth", mode="before")
    @classmethod
    def _depth(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ValueError("depth must be 0 or more, or 'auto'")
        return value

    def refuse_unsupported(self) -> None:
        if self.n > 1 and self.provisional:
            raise bad_request("provisional streams carry one choice; send n=1 with provisional", param="n")

    @property
    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives per token the response's logprobs list; None: no logprobs."""
        return None

    def output_format(self) -> ResponseFormat | None:
        return None if self.response_format is None else self.response_format.settings()

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        """Omitted fields take OpenAI's defaults: temperature 1, top_p 1, no penalties."""
        if self.min_tokens is not None and self.min_tokens > max_new_tokens:
            raise bad_request(f"min_tokens ({self.min_tokens}) is more than max_tokens ({max_new_tokens}) allows", param="min_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        given = {
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty, "min_p": self.min_p, "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos, "sampled_acceptance": self.sampled_acceptance,
        }  # fmt: skip
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            seed=self.seed,
            max_new_tokens=max_new_tokens,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            logprobs=self.top_logprobs_wanted,
            response_format=self.output_format(),
            **{k: v for k, v in given.items() if v is not None},
        )


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of a request with `n` > 1: the first is the request as sent; each other draws
    with its own seed (the request's seed + index, so a seeded request reproduces all its choices),
    or unseeded where the request is."""
    if index == 0 or params.seed is None:
        return params
    return params.model_copy(update={"seed": (params.seed + index) % 2**63})


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        params = super().sampling(max_new_tokens)
        if self.echo and self.logprobs is not None:  # the prompt's own, to echo with it
            params = params.model_copy(update={"prompt_logprobs": self.logprobs})
        return params

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise bad_request("suffix (insertion) is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise bad_request("only best_of=1 is supported", param="best_of")

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise bad_request("one prompt per request is supported; send the others as separate requests", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise bad_request("the prompt is empty", param="prompt")
        return prompt


class ContentPart(_Part):
    type: str
    text: str | None = None


FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionCallBody(_Part):
    name: FunctionName
    arguments: str = Field(max_length=MAX_TOOLS_CHARS)


class ToolCallBody(_Part):
    """An assistant's earlier call, sent back in the conversation."""

    id: Name = Field(max_length=64)
    type: Literal["function"] = "function"
    function: FunctionCallBody


class ChatMessage(_Part):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: Name | None = None
    tool_calls: list[ToolCallBody] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: Name | None = Field(None, max_length=64)

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"message content of type '{part.type}' is not supported; send text", param="messages")
            parts.append(part.text)
        return "".join(parts)

    def turn(self) -> dict[str, Any]:
        """As the chat template (and `tool_calls.render`) takes it."""
        turn: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            turn["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        return turn


class FunctionBody(_Part):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the arguments always follow the schema where a call is required


class ToolBody(_Part):
    type: Literal["function"]
    function: FunctionBody


class NamedFunction(_Part):
    name: FunctionName


class ToolChoiceBody(_Part):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolBody] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceBody | None = None
    parallel_tool_calls: bool | None = None
    _tool_format: ResponseFormat | None = PrivateAttr(None)

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[ToolBody] | None) -> list[ToolBody] | None:
        if value:
            names = [tool.function.name for tool in value]
            if len(set(names)) != len(names):
                raise ValueError("two tools have the same function name")
            if len(json.dumps([tool.model_dump(exclude_none=True) for tool in value])) > MAX_TOOLS_CHARS:
                raise ValueError(f"the tools' declarations are larger than {MAX_TOOLS_CHARS // 1024} KiB")
        return value

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise bad_request("tool_choice needs tools to choose from", param="tool_choice")
        choice = self.tool_choice_name
        if choice not in ("none", "auto", "required") and choice not in {f.name for f in self.functions()}:
            raise bad_request(f"tool_choice names function '{choice}', which is not among the tools", param="tool_choice")
        if choice not in ("none", "auto") and self.response_format is not None and self.response_format.type != "text":
            raise bad_request(
                "a required tool call and a response_format cannot both constrain the reply; drop one", param="response_format"
            )

    def functions(self) -> list[Function]:
        return [
            Function(t.function.name, t.function.description, t.function.parameters or {"type": "object", "properties": {}})
            for t in self.tools or ()
        ]

    @property
    def tool_choice_name(self) -> str:
        """"none", "auto", "required" or the function's name; with no tools, "none"."""
        if not self.tools:
            return "none"
        choice = self.tool_choice or "auto"
        return choice if isinstance(choice, str) else choice.function.name

    def constrain_to(self, fmt: ResponseFormat | None) -> None:
        """The format the tool choice requires (calls only), in place of `response_format`."""
        self._tool_format = fmt

    def output_format(self) -> ResponseFormat | None:
        return self._tool_format or super().output_format()

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def chat_prompt_text(
    body: ChatCompletionRequest, tokenizer, vocab_size: int, model: str
) -> tuple[str, Callable[[], Reader] | None]:
    """A chat request's prompt text through the model's template, with its tools where it has them,
    and then a maker of a `Reader` per choice (None: no calls to read). A required or named call
    constrains the reply: its grammar is compiled here (a 400 naming `tools` if it cannot be) and set
    on the body. CPU work: run it off the event loop."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            f"model '{model}' has no chat template, so it cannot take messages; use /v1/completions with a prompt",
            param="messages", code="no_chat_template",
        )  # fmt: skip
    functions, choice = body.functions(), body.tool_choice_name
    try:
        text = render(tokenizer, [m.turn() for m in body.messages], functions, choice)
    except Exception as exc:  # templates raise on conversations they do not support
        raise bad_request(f"the model's chat template refused these messages: {exc}", param="messages") from None
    if choice == "none":
        return text, None
    parallel = body.parallel_tool_calls is not False and choice in ("auto", "required")  # a named function: one call
    fmt = constraint(tokenizer, functions, choice, parallel)
    if fmt is not None:
        try:
            compiled(fmt, tokenizer, vocab_size)
        except UserError as exc:
            raise bad_request(f"the tools' parameter schemas cannot be followed: {exc}", param="tools") from None
        body.constrain_to(fmt)
    return text, functools.partial(Reader, tokenizer, functions, parallel)


def answer(
    text: str, last: Delta, proposer: str | None, logprobs: list[TokenLogprob] | None, reader: Reader | None = None,
    echo: tuple[str, list[TokenLogprob] | None] | None = None,
) -> Answer:
    """A finished choice as the client reads it: its tool calls read out of `text`, the prompt
    before it where the request asked for `echo` (with its logprobs, where asked for)."""
    calls = None
    if reader is not None:
        content, _ = reader.feed(text)
        rest, _ = reader.finish()
        text, calls = content + rest, reader.calls
    if echo is not None:
        text = echo[0] + text
        logprobs = None if echo[1] is None else echo[1] + (logprobs or [])
    reason = "tool_calls" if calls and last.finish_reason == "stop" else last.finish_reason
    return Answer(text, reason, last.stats, proposer, logprobs, calls)


def echoed_logprobs(first_token: int, scored: list[TokenLogprob] | None) -> list[TokenLogprob] | None:
    """An echoed prompt's logprobs: its first token's null, then the engine's (None where not asked for)."""
    return None if scored is None else [TokenLogprob(first_token, None), *scored]


def check_sampling(params: SamplingParams, tokenizer, vocab_size: int) -> None:
    """What the model must say of a request's settings: its token ids in the vocabulary, its
    format compiled (cached, so the engine finds it done; run it off the event loop). A 400 naming
    the field otherwise."""
    problem = check_token_ids(params, vocab_size)
    if problem is not None:
        raise bad_request(problem[1], param=problem[0])
    if params.constrained:
        try:
            compiled(params.response_format, tokenizer, vocab_size)
        except UserError as exc:
            raise bad_request(str(exc), param="response_format") from None


class Shape:
    """Builds response bodies of one endpoint: `text_completion` or `chat.completion`."""

    def __init__(self, chat: bool, request_id: str, model: str, logprobs: LogprobFormat | None = None):
        self.chat, self.id, self.model, self.logprobs = chat, request_id, model, logprobs
        self.created = int(time.time())
        self._formats: dict[int, LogprobFormat] = {}  # each choice's own (completions' text offsets run on per choice)

    def _logprobs(self, entries: list[TokenLogprob] | None, index: int = 0) -> dict | None:
        if self.logprobs is None:
            return None
        if index not in self._formats:
            self._formats[index] = copy.copy(self.logprobs)
        return self._formats[index].render(entries or [])

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def choice(
        self, index: int, text: str, finish_reason: str, logprobs: list[TokenLogprob] | None = None,
        tool_calls: list[ToolCall] | None = None,
    ) -> dict:
        rendered = self._logprobs(logprobs, index)
        if not self.chat:
            return {"index": index, "text": text, "logprobs": rendered, "finish_reason": finish_reason}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message.update(content=text or None, tool_calls=[call.body() for call in tool_calls])
        return {"index": index, "message": message, "logprobs": rendered, "finish_reason": finish_reason}

    def full(
        self, text: str, finish_reason: str, stats: RequestStats, with_stats: bool, proposer: str | None = None,
        logprobs: list[TokenLogprob] | None = None, tool_calls: list[ToolCall] | None = None,
    ) -> dict:
        return self.full_many([Answer(text, finish_reason, stats, proposer, logprobs, tool_calls)], with_stats)

    def full_many(self, answers: list[Answer], with_stats: bool) -> dict:
        """The response of `n` choices: usage counts the prompt once and every choice's tokens;
        speculation statistics are the response's with one choice, each choice's with several."""
        choices = [self.choice(i, a.text, a.finish_reason, a.logprobs, a.tool_calls) for i, a in enumerate(answers)]
        if with_stats and len(answers) > 1:
            for choice, answer in zip(choices, answers, strict=True):
                choice["speculation_stats"] = speculation_stats(answer.stats, answer.proposer)
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        body["usage"] = usage(*(a.stats for a in answers))
        if with_stats and len(answers) == 1:
            body["speculation_stats"] = speculation_stats(answers[0].stats, answers[0].proposer)
        return body

    def chunk(
        self, text: str | None, finish_reason: str | None = None, role: bool = False, logprobs: list[TokenLogprob] | None = None,
        tool_calls: list[tuple[int, ToolCall]] = (), index: int = 0,
    ) -> dict:
        """A streamed chunk of choice `index`; `logprobs` (of the tokens this chunk releases) only
        where asked for; `tool_calls` whole, each with its index among the choice's calls."""
        rendered = None if logprobs is None else self._logprobs(logprobs, index)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [call.body(i) for i, call in tool_calls]
            choice = {"index": index, "delta": delta, "logprobs": rendered, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": index, "text": text or "", "logprobs": rendered, "finish_reason": finish_reason}])

    def usage_chunk(self, *stats: RequestStats) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(*stats)
        return body


@dataclass(frozen=True)
class Answer:
    """One choice of a finished response, as the client reads it."""

    text: str
    finish_reason: str
    stats: RequestStats
    proposer: str | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None


def token_budget(window: int | None, prompt_len: int, requested: int | None, default: int) -> int:
    """max_tokens within the model's context window: `requested`, or `default` where the request
    names none; a prompt that leaves no room, or a budget past the window, is a 400."""
    room = None if window is None else window - prompt_len
    if room is not None and room < 1:
        raise bad_request(
            f"this model's maximum context length is {window} tokens, and the prompt has {prompt_len}; shorten the prompt",
            param="prompt", code="context_length_exceeded",
        )  # fmt: skip
    if requested is None:
        return default if room is None else min(default, room)
    if room is not None and requested > room:
        raise bad_request(
            f"this model's maximum context length is {window} tokens, but you asked for {prompt_len + requested} "
            f"({prompt_len} in the prompt, {requested} to generate); lower max_tokens or shorten the prompt",
            param="max_tokens", code="context_length_exceeded",
        )
    return requested
