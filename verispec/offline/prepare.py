"""A request line to what the engine takes, checked as the server checks a request.

The body is validated by the server's own models (`server/protocol.py`) and answered with its own
`Shape`, so a result body has exactly the server's response shape and a bad body the same 400. Two
differences, both because a file is not a conversation with one server: the body's `model` is
accepted unchecked (a file made for OpenAI names e.g. "gpt-4o-mini"; answers name the job's model),
and `stream` is ignored (a result line holds the whole response).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from verispec.config import Depth, SamplingParams
from verispec.offline.jsonl import CHAT, InputLine, ids
from verispec.server.errors import bad_request, invalid_request
from verispec.server.logprobs import LogprobFormat
from verispec.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Shape,
    chat_prompt_text,
    check_sampling,
    choice_params,
    token_budget,
)
from verispec.tool_calls import Reader


@dataclass(frozen=True)
class Context:
    """What checking a request needs to know about the job's engine."""

    tokenizer: PreTrainedTokenizerBase
    window: int | None  # the target's context window; None = unbounded
    vocab_size: int
    max_new_tokens: int  # for requests that send no max_tokens
    model: str  # the name answers carry
    proposer: str  # the job's proposer (draft, ngram, none): the only one a request may pin


@dataclass(frozen=True)
class Prepared:
    line: InputLine
    prompt_ids: list[int]
    params: SamplingParams
    depth: Depth | None  # the request's `depth` extension
    shape: Shape
    with_stats: bool  # the request's `speculation_stats` extension
    n: int = 1  # choices, each a request of the engine's (`choice_params`: seed + index)
    echo: tuple[str, int] | None = None  # the prompt's text and first token, where the request asked for `echo`
    tools: Callable[[], Reader] | None = None  # a tool-call reader per choice, where the request has tools

    def choice(self, index: int) -> SamplingParams:
        return choice_params(self.params, index)


def prepare(line: InputLine, context: Context) -> Prepared:
    """The engine's input for a request line; raises the APIError it is to be answered with."""
    if line.problem is not None:
        raise line.problem
    chat = line.url == CHAT
    try:
        body = (ChatCompletionRequest if chat else CompletionRequest).model_validate(line.body)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None
    body.refuse_unsupported()
    if body.proposer is not None and body.proposer != context.proposer:
        raise bad_request(f"unknown proposer '{body.proposer}'; this job has: {context.proposer}", param="proposer")
    tools = echo = None
    if chat:
        text, tools = chat_prompt_text(body, context.tokenizer, context.vocab_size, context.model)
        prompt_ids, limit = _tokenize(context.tokenizer, text, add_special_tokens=False), body.token_limit
    else:
        prompt_ids, limit = _completion_ids(body, context), body.max_tokens
        if body.echo and prompt_ids:
            prompt = body.single_prompt()
            echo = (prompt if isinstance(prompt, str) else context.tokenizer.decode(prompt_ids), prompt_ids[0])
    if not prompt_ids:
        raise bad_request("the prompt is empty", param="prompt")
    max_new = token_budget(context.window, len(prompt_ids), limit, context.max_new_tokens)
    try:
        params = body.sampling(max_new)
    except ValueError as exc:
        raise bad_request(f"invalid sampling settings: {exc}") from None
    check_sampling(params, context.tokenizer, context.vocab_size)
    _, request_id = ids(line)
    logprobs = None if params.logprobs is None else LogprobFormat(chat, context.tokenizer)
    shape = Shape(chat, ("chatcmpl-" if chat else "cmpl-") + request_id, context.model, logprobs)
    return Prepared(line, prompt_ids, params, body.depth, shape, bool(body.speculation_stats), body.n, echo, tools)


def _completion_ids(body: CompletionRequest, context: Context) -> list[int]:
    prompt = body.single_prompt()
    if isinstance(prompt, str):
        return _tokenize(context.tokenizer, prompt)
    if any(not 0 <= t < context.vocab_size for t in prompt):
        raise bad_request(f"prompt token ids must lie in [0, {context.vocab_size})", param="prompt")
    return list(prompt)


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str, **kwargs) -> list[int]:
    try:
        return tokenizer(text, **kwargs).input_ids
    except Exception:  # whatever the text holds, the request gets a 400, never a crashed job
        raise bad_request("the prompt could not be tokenized; send valid UTF-8 text", param="prompt") from None
