"""Prompt logprobs (OpenAI's `echo` with `logprobs` on /v1/completions): each prompt token's
log-probability under the verifier given the tokens before it, scored as the prompt prefills.

Row p of a prefill chunk (the verifier's logits at position p) scores prompt token p + 1. The
prefill reads positions 0..n-2 of an n-token prompt (the last token opens the first round, whose
row 0 scores the first output token), so it scores every prompt position but 0, which has no
context and no logprob. A request's list (`Request.prompt_logprobs`) therefore holds n - 1
entries, entry i - 1 for position i; the engine hands it over on the request's first Delta.

Each chunk's rows become `TokenLogprob`s as soon as its pass returns them: the pass asks for the
logits of those rows only, so no more than one chunk's logits is ever held: `max_pass_tokens`
rows, not (prompt_len, V), except where a backend reads prompts whole (`SessionRunner`).

What the logits are: the verifier's raw ones plus the request's `logit_bias`, log-softmaxed in
float32, as `token_logprobs` scores the output. The other controls describe how the output is
drawn (penalties count output tokens, the token floor holds back its end, temperature and
truncation shape the draw) and have no meaning for text the user wrote.

Exactness: every position must be scored by the request's own passes, so the prefix cache
supplies only positions already scored (`cacheable`): none before the first chunk, all once the
list is complete (a request preempted later recomputes nothing twice). On the kernel step a
position's logits are the same bits however the prompt was chunked and whatever shares the pass,
so the list is the same at any depth, proposer and batch; asking for it only adds rows of
logits to the passes, and changes no output. On torch operators (CUDA) both hold up to the
rounding of batched operators, as the output's own logits do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from verispec.core.rounds import token_logprobs

if TYPE_CHECKING:
    from verispec.core.request import Request


def cacheable(request: Request) -> list[int]:
    """The tokens whose prefix the prefix cache may supply (`BlockTable.reuse_prefix`, which
    leaves the last one to compute): all of them, unless prompt positions remain unscored, whose
    rows must run."""
    scores = request.prompt_logprobs
    if scores is None or len(scores) == request.prompt_len - 1:
        return request.tokens
    return request.tokens[: len(scores) + 1]  # rows 0..len(scores)-1 are scored already


def rows_to_score(request: Request, start: int, n: int) -> int:
    """How many of the last rows of a prefill chunk (positions start..start+n-1) score prompt
    positions not yet scored: the logits that chunk's pass must return."""
    scores = request.prompt_logprobs
    if scores is None:
        return 0
    end = min(start + n, request.prompt_len - 1)  # row p scores position p + 1
    first = max(start, len(scores))
    if first >= end:
        return 0
    assert end == start + n, "unscored prompt rows are always the chunk's last"
    return end - first


def score_rows(request: Request, end: int, logits: torch.Tensor) -> None:
    """Add the TokenLogprobs of the rows just before position `end`: logits (k, V) of positions
    end-k..end-1, scoring prompt tokens end-k+1..end."""
    scores = request.prompt_logprobs
    k = logits.shape[0]
    assert scores is not None and len(scores) == end - k, "prompt rows are scored in order, each once"
    processing = request.processing
    if processing is not None and processing.bias is not None:
        logits = logits.float() + processing.bias
    scores += token_logprobs(logits, request.tokens[end - k + 1 : end + 1], request.params.prompt_logprobs or 0)
