"""What a round is and what it adds to a request: the acceptance rule applied to one request's
drafts (`accept`), the verified tokens appended up to a stop (`emit`), the proposal's checks
(`validate`), and the records a round leaves for whoever watches the engine (`Round`, `Delta`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from verispec.config import SamplingParams
from verispec.core.acceptance import Verdict, accept_greedy, accept_stochastic
from verispec.core.drift import Inspection, inspect_round
from verispec.core.sampling import warp
from verispec.errors import ProposerError
from verispec.models.backend import CausalLM
from verispec.proposers.base import Proposal
from verispec.stats import RequestStats


@dataclass(frozen=True)
class Round:
    """What one round did, for whoever watches the engine live (server metrics, circuit breaker)."""

    depth: int  # drafts asked for
    proposed: int
    accepted: int
    propose_s: float
    verify_s: float
    proposer_failed: bool = False  # the proposer raised, returned junk or ran out of time: verifier-only round
    started_ns: int = 0  # wall clock (time.time_ns), for trace spans
    ended_ns: int = 0
    inspection: Inspection | None = None  # inspected requests only, rounds with drafts only

    @property
    def mismatch_s(self) -> float:
        """What the rejected drafts cost this round: their share of the proposing time (by drafts)
        and of the verifier pass (by rows), the time a round without them would not have spent."""
        rejected = self.proposed - self.accepted
        if rejected <= 0:
            return 0.0
        return self.propose_s * rejected / self.proposed + self.verify_s * rejected / (1 + self.proposed)


@dataclass(frozen=True)
class Delta:
    """What one round adds to a request's output; only verified tokens, ever."""

    token_ids: list[int]
    text: str  # final text these tokens complete (may lag the tokens, see TextStream)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" on the last delta
    stats: RequestStats | None = None  # on the last delta
    round: Round | None = None


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: RequestStats


def accept(params: SamplingParams, proposal: Proposal, target_logits: torch.Tensor, generator: torch.Generator | None) -> Verdict:
    """The acceptance rule for one request's round: (k+1, V) logits of its drafts."""
    drafts = torch.tensor([proposal.tokens], dtype=torch.long, device=target_logits.device)  # (1, k)
    if params.greedy:
        return accept_greedy(drafts, target_logits[None])
    draft_probs = None if proposal.probs is None else proposal.probs.to(target_logits.device)[None]
    return accept_stochastic(drafts, draft_probs, warp(target_logits, params)[None], generator)


def inspect(params: SamplingParams, proposal: Proposal, target_logits: torch.Tensor, verdict: Verdict, generated: int) -> Inspection:
    """Drift and the first mismatch of a round (before its tokens are emitted)."""
    target_probs = torch.softmax(target_logits.float(), dim=-1) if params.greedy else warp(target_logits, params)
    return inspect_round(
        proposal.tokens, proposal.probs, target_probs, int(verdict.accepted[0]), int(verdict.next_token[0]),
        first_position=generated,
    )


def emit(request, new_tokens: list[int], round_: Round | None, eos_ids: frozenset[int]) -> Delta:
    """Append verified tokens to a request (`tokens`, `text`, `params`, `stats`) up to EOS, a stop
    string or the length limit, and say what they add to its output."""
    emitted: list[int] = []
    text = []
    finish = None
    for token in new_tokens:
        request.tokens.append(token)
        emitted.append(token)
        text.append(request.text.push(token))
        if token in eos_ids or request.text.stopped:
            finish = "stop"
        elif len(request.tokens) - request.prompt_len >= request.params.max_new_tokens:
            finish = "length"
        if finish:
            text.append(request.text.flush())
            break
    request.stats.generated_tokens += len(emitted)
    return Delta(emitted, "".join(text), finish, request.stats if finish else None, round_)


def validate(proposal: Proposal, depth: int, vocab_size: int) -> None:
    """Refuse a proposal the acceptance rule cannot take (ProposerError)."""
    n = len(proposal.tokens)
    if n > depth:
        raise ProposerError(f"proposed {n} tokens for depth {depth}")
    if any(not 0 <= t < vocab_size for t in proposal.tokens):
        raise ProposerError("proposed a token id outside the vocabulary")
    if proposal.probs is not None and tuple(proposal.probs.shape) != (n, vocab_size):
        raise ProposerError(f"draft probabilities of shape {tuple(proposal.probs.shape)}, expected {(n, vocab_size)}")


def stop_tokens(target: CausalLM, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return frozenset(eos | target.eos_token_ids)
