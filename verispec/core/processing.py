"""A request's logits as its controls change them, position by position: a token floor
(`min_tokens`), `logit_bias`, and the repetition, frequency and presence penalties.

Penalties depend on the tokens before a position, so in a verify pass each row is processed with
the drafts before it as if they were already output: row j of a round continues the verified
tokens and drafts[:j]. A row's processed logits are therefore the same bits whether the verifier
scores it alone (depth 0) or behind any drafts, and the acceptance rule stays exact.

Order, as vLLM applies them: the floor's ban of stop tokens, then the bias, then the repetition
penalty (over prompt and output, as Hugging Face defines it), then the frequency and presence
penalties (over the output only, as OpenAI defines them). Temperature, top-k, top-p and min-p
come after, in `sampling.warp`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verispec.config import SamplingParams


class Processing:
    """One request's processing state: how often each token occurs in its output so far, and which
    tokens its prompt and output hold."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int], stop_ids: frozenset[int], vocab_size: int, device):
        self.params = params
        self.vocab_size = vocab_size
        self.device = device
        self.bias = None
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
            self.bias = torch.zeros(vocab_size, dtype=torch.float32).index_put_((ids,), values, accumulate=True).to(device)
        self.floor_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)  # in the output
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # in the prompt or the output
        if params.repetition_penalty != 1.0:
            self.seen[torch.tensor(list(prompt), dtype=torch.long, device=device)] = True

    def observe(self, tokens: Sequence[int]) -> None:
        """Tokens the request emitted (verified output)."""
        if not tokens:
            return
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        self.counts.index_put_((ids,), torch.ones(len(ids), device=self.device), accumulate=True)
        self.seen[ids] = True

    def apply(self, logits: torch.Tensor, drafts: Sequence[int], generated: int) -> torch.Tensor:
        """(n, V) logits of a round's rows (row j after drafts[:j]; n <= len(drafts) + 1) ->
        processed float32 logits. `generated`: output tokens before row 0."""
        params = self.params
        out = logits.float().clone()
        rows = out.shape[0]
        if params.min_tokens and generated < params.min_tokens and len(self.floor_ids):
            early = min(rows, params.min_tokens - generated)  # rows whose token would come too soon to stop
            out[:early, self.floor_ids] = float("-inf")
        if self.bias is not None:
            out += self.bias
        if params.repetition_penalty == 1.0 and not params.frequency_penalty and not params.presence_penalty:
            return out
        counts = self.counts.expand(rows, -1).clone()
        for j, token in enumerate(drafts[: rows - 1]):
            counts[j + 1 :, token] += 1.0  # row j sees drafts[:j] as output
        if params.repetition_penalty != 1.0:
            seen = self.seen | (counts > 0)
            penalty = params.repetition_penalty
            out = torch.where(seen, torch.where(out > 0, out / penalty, out * penalty), out)
        if params.frequency_penalty:
            out -= params.frequency_penalty * counts
        if params.presence_penalty:
            out -= params.presence_penalty * (counts > 0).float()
        return out


def check_token_ids(params: SamplingParams, vocab_size: int) -> tuple[str, str] | None:
    """What is wrong with the token ids a request names (bias, stop ids), for the user, as (the
    field, the message); None if nothing."""
    for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
        outside = [t for t in ids if not 0 <= t < vocab_size]
        if outside:
            return name, f"{name} names token id {outside[0]}, outside this model's vocabulary of {vocab_size} tokens (ids 0 to {vocab_size - 1})"
    return None
