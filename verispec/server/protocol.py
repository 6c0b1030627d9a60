"""The OpenAI API's request and response shapes, and our extensions.

Requests are validated here (types and ranges); what needs the model (prompt length, the chat
template, the model name) is checked in `app.py`. Unknown fields are ignored, as OpenAI's newer
clients send fields older servers do not know; fields we know but cannot honour (n > 1,
logprobs, penalties, logit_bias, echo, suffix, best_of) are refused with a clear 400, since
ignoring them would silently change what the client asked for.

Extensions (send them with the openai client's `extra_body`):
- `top_k`: keep the k most likely tokens (0 = off);
- `depth`: speculation depth for this request, an integer (0 = verifier only) or "auto";
- `speculation_stats`: add a `speculation_stats` object to the response (the final chunk when
  streaming);
- `task`: a tag (e.g. "code", "chat") the per-request proposer choice can keep its figures by;
- `proposer`: run this request on the named proposer of the server (one of its `--proposers`,
  its `--proposer`, or `canary`), bypassing the per-request choice and the canary split; such
  pinned requests feed neither's figures (for side-by-side comparisons and debugging).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from verispec.config import Depth, SamplingParams
from verispec.server.errors import bad_request
from verispec.stats import RequestStats


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 = off, as in vLLM
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # extensions
    depth: Depth | None = None
    speculation_stats: bool | None = None
    task: str | None = Field(None, max_length=64)  # a tag the per-request proposer choice may key on
    proposer: str | None = Field(None, max_length=64)  # pin the request to one of the server's proposers

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("depth", mode="before")
    @classmethod
    def _depth(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ValueError("depth must be 0 or more, or 'auto'")
        return value

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise bad_request("only n=1 is supported; send several requests for several completions", param="n")
        if self.presence_penalty or self.frequency_penalty:
            raise bad_request("presence_penalty and frequency_penalty are not supported; leave them at 0", param="presence_penalty")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        """Omitted fields take OpenAI's defaults: temperature 1, top_p 1."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            seed=self.seed,
            max_new_tokens=max_new_tokens,
            stop=tuple(stop),
        )


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise bad_request("echo is not supported", param="echo")
        if self.logprobs is not None:
            raise bad_request("logprobs are not supported", param="logprobs")
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


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"message content of type '{part.type}' is not supported; send text", param="messages")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list[Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise bad_request("logprobs are not supported", param="logprobs")
        if self.tools:
            raise bad_request("tools (function calling) are not supported", param="tools")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def usage(stats: RequestStats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    }


def speculation_stats(stats: RequestStats, proposer: str | None = None) -> dict:
    """The per-response extension: what speculation did for this request, and with which proposer."""
    return {
        "proposer": proposer,
        "proposed": stats.proposed,
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "recovered": stats.recovered,
        "bonus": stats.bonus,
        "verifier_calls": stats.verifier_calls,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_length": stats.mean_accepted,
        "tokens_per_verifier_call": stats.tokens_per_verifier_call,
        "proposer_failures": stats.proposer_failures + stats.proposer_timeouts,
        "fallback_rounds": stats.fallback_rounds,
    }


class Shape:
    """Builds response bodies of one endpoint: `text_completion` or `chat.completion`."""

    def __init__(self, chat: bool, request_id: str, model: str):
        self.chat, self.id, self.model = chat, request_id, model
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def full(self, text: str, finish_reason: str, stats: RequestStats, with_stats: bool, proposer: str | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])
        body["usage"] = usage(stats)
        if with_stats:
            body["speculation_stats"] = speculation_stats(stats, proposer)
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}])

    def usage_chunk(self, stats: RequestStats) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(stats)
        return body
