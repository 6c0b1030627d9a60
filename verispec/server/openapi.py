"""What the OpenAPI schema says each route answers: the success bodies (JSON, or server-sent
events when streaming) and OpenAI's error body with every status a client can meet. The schema at
/openapi.json is what clients and the fuzz tests (Schemathesis) check responses against, so it
lists every status and content type the routes can return, and the shape of every JSON body.

Routes take these through their decorators (`responses=COMPLETION_RESPONSES` and so on). The
models here describe bodies that `protocol.Shape` and the routes (`completions.py`, `verify.py`) build as dicts; the fuzz tests
keep the two in step.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose keys and values came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class SpeculationStats(BaseModel):
    """The `speculation_stats` extension; rates are null where nothing was proposed or no round ran."""

    proposer: str | None
    proposed: int
    accepted: int
    rejected: int
    recovered: int
    bonus: int
    verifier_calls: int
    acceptance_rate: float | None
    mean_accepted_length: float | None
    tokens_per_verifier_call: float | None
    proposer_failures: int
    fallback_rounds: int
    repeat_rounds: int = Field(0, description="rounds drafted from the text's own repeat in place of the proposer")
    mismatch_ms: float = Field(description="time spent on drafts the verifier rejected: their share of proposing and verifying")


# content_filter: the policy gate stopped it; tool_calls: the reply ended with tool calls
FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


class _Envelope(BaseModel):
    """What every completion body and chunk carries; subclasses name the object and its choices."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    speculation_stats: SpeculationStats | None = None


class CompletionLogprobs(BaseModel):
    """`/v1/completions` with `logprobs`: per output token, its text, its log-probability under
    the verifier, the `logprobs` most likely tokens at its position, and where its text starts.
    With `echo`, the prompt's tokens first, the first of them null (nothing scores it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """Chat with `logprobs: true`; `top_logprobs` alternatives per token."""

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason
    speculation_stats: SpeculationStats | None = Field(None, description="each choice's, with n > 1")


class Completion(_Envelope):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class StreamedToolCall(ToolCall):
    index: int = Field(description="the call's place among the choice's calls; each call comes whole, in one chunk")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null where the reply is tool calls only")
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason
    speculation_stats: SpeculationStats | None = Field(None, description="each choice's, with n > 1")


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(_Envelope):
    """One event of a streamed completion. The final choice carries the finish reason (and
    speculation_stats when asked for); with stream_options.include_usage one more chunk follows,
    with no choices and the usage."""

    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[StreamedToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Ready(BaseModel):
    status: Literal["ready"]
    model: str
    breaker: str


class NotReady(BaseModel):
    status: str  # why: not_ready (loading), shutting_down, audit_unavailable
    message: str | None = None  # the same in words, with what the operator can do


_STATUSES = {
    400: "invalid request: the message says what to change",
    401: "missing or invalid API key",
    408: "the request body did not arrive in time",
    413: "the request body is larger than the server accepts",
    429: "rate limit exceeded; retry after Retry-After seconds",
    500: "a server bug; the x-request-id identifies it in the server's log",
    503: "not ready, overloaded, shutting down, or the audit trail is unavailable; retry after Retry-After seconds",
    504: "the request passed the server's deadline",
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in _STATUSES.items()
}


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its nested models written in place: it sits inside the OpenAPI
    document, where the `#/$defs/...` references pydantic writes would point nowhere."""
    schema = model.model_json_schema(mode="serialization")
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def _events(chunk: type[BaseModel]) -> dict[str, Any]:
    """With "stream": true the answer is server-sent events: `data: {chunk}`, an error object
    in-band should the request fail once streaming has begun, and last `data: [DONE]`. Described
    as FastAPI describes its own event streams: OpenAPI 3.2's `itemSchema`, one event each."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_inline(chunk), _inline(ErrorBody)]},
    }
    data = {"anyOf": [{"type": "string", "const": "[DONE]"}, json_data]}
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"}},
    }
    return {"text/event-stream": {"itemSchema": event}}


COMPLETION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": Completion,
        "description": "the completion, or with stream: true its chunks as server-sent events",
        "content": _events(CompletionChunk),
    },
    **ERROR_RESPONSES,
}
CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ChatCompletion,
        "description": "the chat completion, or with stream: true its chunks as server-sent events",
        "content": _events(ChatCompletionChunk),
    },
    **ERROR_RESPONSES,
}
MODELS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ModelList, "description": "the one model this server serves"},
    **ERROR_RESPONSES,
}
class VerifyRound(BaseModel):
    """One round of the verify API: what the verifier made of the client's drafts."""

    object: Literal["verify.round"]
    session_id: str = Field(description="send it with the next round's drafts")
    round: int | None = Field(None, description="rounds so far in this session")
    proposed: int | None = Field(None, description="drafts scored (the client's, within the token budget)")
    accepted: int | None = Field(None, description="the longest prefix of them the verifier kept")
    token_ids: list[int] | None = Field(None, description="what extends the verified context: accepted drafts, then the recovered or bonus token")
    text: str | None = Field(None, description="the verified text these tokens add")
    logprobs: CompletionLogprobs | None = Field(None, description="with the opening's `logprobs`: these tokens', as completions give them")
    position: int = Field(description="verified tokens now, prompt included: the next round's position")
    finish_reason: Literal["stop", "length", "content_filter", "closed"] | None
    usage: Usage | None = None
    speculation_stats: SpeculationStats | None = None
    prompt_token_ids: list[int] | None = Field(None, description="a session opened with a text prompt: its token ids, to draft from")
    depth_hint: int | None = Field(None, description="drafts for the next round that pay best for the verifier, by this session's acceptance")


VERIFY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": VerifyRound, "description": "the round's verdict and verified tokens"},
    **ERROR_RESPONSES,
    404: {"model": ErrorBody, "description": "no such session for this API key"},
    409: {"model": ErrorBody, "description": "a round of this session is in flight, or the position is not the session's"},
    410: {"model": ErrorBody, "description": "the session has ended (finished, closed or expired)"},
}
READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Ready, "description": "ready to serve"},
    503: {
        "model": NotReady,
        "description": "not ready yet, or shutting down; retry after Retry-After seconds",
    },
}
