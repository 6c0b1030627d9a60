"""Log-probabilities in OpenAI's response shapes.

The engine gives each output token's log-probability under the verifier (`TokenLogprob`: after
the request's bias and penalties, before temperature), identical at any depth. Here they become
what clients read: `/v1/completions` lists `tokens`, `token_logprobs`, `top_logprobs` (a map per
token) and `text_offset`; chat lists `content` entries of `token`, `logprob`, `bytes` and
`top_logprobs`. A token's text is its own bytes (`text.TokenBytes`). A token the request's
controls ban (a token floor's stop tokens) has log-probability -inf, which JSON cannot carry:
it reads -9999.0, as in OpenAI's answers. With `echo`, completions list the prompt's tokens
first, the first of them with null log-probability (nothing comes before it to score it).
"""

from __future__ import annotations

import math

from transformers import PreTrainedTokenizerBase

from verispec.core.rounds import TokenLogprob
from verispec.text import token_bytes

BANNED = -9999.0


def _finite(logprob: float | None) -> float | None:
    """JSON-safe; None stays None (an echoed prompt's first token, which nothing scores)."""
    return logprob if logprob is None or math.isfinite(logprob) else BANNED


class LogprobFormat:
    """Renders one response's logprobs, chunk by chunk (completions' text offsets run on)."""

    def __init__(self, chat: bool, tokenizer: PreTrainedTokenizerBase, offset: int = 0):
        self.chat, self.vocab = chat, token_bytes(tokenizer)
        self.offset = offset  # characters before the next token, for completions' text_offset

    def render(self, entries: list[TokenLogprob]) -> dict:
        return self._chat(entries) if self.chat else self._completion(entries)

    def _chat(self, entries: list[TokenLogprob]) -> dict:
        def item(token: int, logprob: float) -> dict:
            return {"token": self.vocab.text(token), "logprob": _finite(logprob), "bytes": list(self.vocab.of(token))}

        content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}

    def _completion(self, entries: list[TokenLogprob]) -> dict:
        tokens = [self.vocab.text(e.token) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [None if e.logprob is None else {self.vocab.text(t): _finite(lp) for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }
