"""What a request must pass before it is queued: a known API key (`keys`, checked by `bearer_auth`)
within its rate limits, the served model's name, a prompt the tokenizer takes (or token ids in
the vocabulary), a token budget within the model's window, and valid sampling settings."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import Request
from transformers import PreTrainedTokenizerBase

from verispec.config import SamplingParams, ServerSettings
from verispec.server.auth import KeyRing
from verispec.server.errors import bad_request, retry_later
from verispec.server.metrics import ServerMetrics
from verispec.server.protocol import check_sampling, token_budget
from verispec.server.shared_limits import limiter_from_settings
from verispec.server.worker import CpuWorker

if TYPE_CHECKING:
    from verispec.server.service import Service

log = logging.getLogger("verispec.server")


class Intake:
    """The checks every generation makes before it is queued, and the keys and rate limits they
    take from."""

    def __init__(
        self,
        server: ServerSettings,
        model_name: str,
        max_new_tokens: int,
        metrics: ServerMetrics,
        worker: CpuWorker,
    ):
        self.model_name = model_name
        self.max_new_tokens = max_new_tokens
        self.worker = worker
        self.keys = KeyRing.from_settings(server)
        self.limiter = limiter_from_settings(server, on_error=lambda: metrics.rate_limit_errors.inc())

    def check_model(self, body) -> None:
        if body.model != self.model_name:
            raise bad_request(
                f"unknown model '{body.model}'; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    async def tokenize(self, tokenizer: PreTrainedTokenizerBase, text: str, **kwargs) -> list[int]:
        try:
            return (await self.worker.run(tokenizer, text, **kwargs)).input_ids
        except Exception as exc:  # whatever the text holds, the client gets a 400, never a 500
            log.warning("tokenizer refused a prompt: %r", exc)
            raise bad_request(
                "the prompt could not be tokenized; send valid UTF-8 text", param="prompt"
            ) from None

    async def prompt(self, service: Service, prompt: str | list[int]) -> tuple[list[int], str]:
        """A prompt as text or token ids -> (token ids, text): tokenized, or checked and decoded."""
        if isinstance(prompt, str):
            return await self.tokenize(service.tokenizer, prompt), prompt
        vocab = service.engine.target.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise bad_request(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return list(prompt), await self.worker.run(service.tokenizer.decode, list(prompt))

    async def admit(
        self,
        request: Request,
        service: Service,
        body,
        prompt_ids: list[int],
        max_tokens: int | None,
        key_id: str,
        choices: int = 1,
    ) -> SamplingParams:
        """The token budget in the model's window, the sampling settings, and the key's rate limits
        (which it takes from: the prompt once, the budget once per choice)."""
        max_new = token_budget(
            service.engine.target.max_positions, len(prompt_ids), max_tokens, self.max_new_tokens
        )
        try:
            params = body.sampling(max_new)
        except ValueError as exc:
            raise bad_request(f"invalid sampling settings: {exc}") from None
        await self.worker.run(check_sampling, params, service.tokenizer, service.engine.target.vocab_size)
        await self.charge(request, key_id, len(prompt_ids) + choices * max_new)
        return params

    async def charge(self, request: Request, key_id: str, tokens: int) -> None:
        """Take one request and `tokens` tokens from the key's rate limits, or answer 429."""
        if not self.limiter.enabled:
            return
        limits = await self.limiter.acheck(key_id, tokens)
        request.state.extra_headers = limits.headers
        if not limits.allowed:
            raise retry_later(
                429, limits.reason, limits.retry_after_s, code="rate_limit_exceeded", headers=limits.headers
            )
