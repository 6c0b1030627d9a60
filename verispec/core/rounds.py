"""What a round is and what it adds to a request: the acceptance rule applied to one request's
drafts (`accept`), the verified tokens appended up to a stop (`emit`), the proposal's checks
(`validate`), and the records a round leaves for whoever watches the engine (`Round`, `Delta`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from verispec.config import SamplingParams
from verispec.core.acceptance import (
    TreeVerdict,
    accept_chosen,
    accept_stochastic,
    accept_tree_chosen,
    accept_tree_stochastic,
    tree_children,
)
from verispec.core.drift import Inspection, inspect_round
from verispec.core.sampling import PositionNoise, warp
from verispec.errors import ProposerError
from verispec.models.backend import CausalLM
from verispec.proposers.base import Proposal
from verispec.stats import RequestStats

MAX_BRANCHES = 64  # a tree's nodes off its chain


@dataclass(frozen=True)
class Round:
    """What one round did, for whoever watches the engine live (server metrics, circuit breaker)."""

    depth: int  # drafts asked for
    proposed: int
    accepted: int
    propose_s: float
    verify_s: float
    proposer_failed: bool = False  # the proposer raised, returned junk or ran out of time: verifier-only round
    repeat: bool = False  # drafted from the text's own repeat in place of the proposer (`repeats.py`)
    started_ns: int = 0  # wall clock (time.time_ns), for trace spans
    ended_ns: int = 0
    inspection: Inspection | None = None  # inspected requests only, rounds with drafts only
    # Of the chain's drafts (the ones a provisional stream showed), how many the verifier kept:
    # `accepted` unless a token tree's path left the chain for a branch. None: `accepted`.
    chain_accepted: int | None = None

    @property
    def kept_drafts(self) -> int:
        """Of the drafts a provisional stream showed (the chain's), how many the verifier kept."""
        return self.accepted if self.chain_accepted is None else self.chain_accepted

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
    logprobs: list[TokenLogprob] | None = None  # one per token, where the request asked for them
    # On a request's first delta, where it asked for them: its prompt's positions 1..n-1 (`prompt_logprobs.py`).
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: RequestStats
    prompt_logprobs: list[TokenLogprob] | None = None  # where asked for, as on its first Delta


def accept(
    params: SamplingParams, proposal: Proposal, target_logits: torch.Tensor, generator: torch.Generator | None,
    noise: PositionNoise | None = None, position: int = 0,
) -> TreeVerdict:
    """The acceptance rule for one request's round: processed logits of its nodes (root first,
    row v scoring the token after node v), the root's row scoring output position `position`.
    Greedy: the argmax; coupled sampling (`noise`): each position's own draw; else speculative
    sampling's rejection rule, drawing from `generator`. A chain's verdict is its accepted
    prefix; a tree's, the path it accepted (`acceptance.accept_tree_*`)."""
    if params.greedy:  # a chain or a tree alike: one argmax, then a walk over lists (torch ops cost more a round)
        chosen = target_logits.argmax(dim=-1).tolist()
        return accept_tree_chosen(tree_children(proposal.parents()), [-1, *proposal.nodes], chosen)
    if proposal.branches:
        return _accept_tree(params, proposal, target_logits, generator, noise, position)
    drafts = torch.tensor([proposal.tokens], dtype=torch.long, device=target_logits.device)  # (1, k)
    target_probs = warp(target_logits, params)
    if noise is not None:
        verdict = accept_chosen(drafts, noise.choose(target_probs, range(position, position + len(target_probs)))[None])
    else:
        draft_probs = None if proposal.probs is None else proposal.probs.to(target_logits.device)[None]
        verdict = accept_stochastic(drafts, draft_probs, target_probs[None], generator)
    return TreeVerdict(list(range(1, int(verdict.accepted[0]) + 1)), int(verdict.next_token[0]))


def _accept_tree(params, proposal, target_logits, generator, noise, position) -> TreeVerdict:
    children, nodes = tree_children(proposal.parents()), [-1, *proposal.nodes]
    target_probs = warp(target_logits, params)
    if noise is not None:  # each node's draw is its output position's (the root's is `position`)
        chosen = noise.choose(target_probs, [position + d for d in proposal.depths()])
        return accept_tree_chosen(children, nodes, chosen.tolist())
    draft_probs = None if proposal.probs is None else proposal.probs.to(target_logits.device)
    return accept_tree_stochastic(children, nodes, draft_probs, len(proposal.tokens), target_probs, generator)


@dataclass(frozen=True)
class TokenLogprob:
    """An output token's log-probability under the verifier (after the request's processing: bias
    and penalties, before temperature and truncation), and the most likely tokens at its position."""

    token: int
    logprob: float | None  # None only for an echoed prompt's first token, which nothing scores
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(target_logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Row i of (n, V) processed logits scored tokens[i]."""
    logprobs = torch.log_softmax(target_logits[: len(tokens)].float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None]).squeeze(-1).tolist()
    alternatives = logprobs.topk(top, dim=-1) if top else None
    out = []
    for i, token in enumerate(tokens):
        best = ()
        if alternatives is not None:
            best = tuple(zip(alternatives.indices[i].tolist(), alternatives.values[i].tolist(), strict=True))
        out.append(TokenLogprob(token, chosen[i], best))
    return out


def inspect(params: SamplingParams, proposal: Proposal, target_logits: torch.Tensor, verdict: TreeVerdict, generated: int) -> Inspection:
    """Drift and the first mismatch of a round (before its tokens are emitted; chains only)."""
    target_probs = torch.softmax(target_logits.float(), dim=-1) if params.greedy else warp(target_logits, params)
    return inspect_round(
        proposal.tokens, proposal.probs, target_probs, len(verdict.path), verdict.next_token, first_position=generated,
    )


def emit(
    request, new_tokens: list[int], round_: Round | None, eos_ids: frozenset[int], logprobs: list[TokenLogprob] | None = None
) -> Delta:
    """Append verified tokens to a request (`tokens`, `text`, `params`, `stats`) up to EOS (or
    another of `eos_ids`), a stop string or the length limit, and say what they add to its output
    (with `logprobs`, one per new token, those of the emitted ones). A request's first delta
    carries its prompt logprobs, where it asked for them."""
    first = len(request.tokens) == request.prompt_len
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
    kept = None if logprobs is None else logprobs[: len(emitted)]
    prompt = request.prompt_logprobs if first else None
    return Delta(emitted, "".join(text), finish, request.stats if finish else None, round_, kept, prompt)


def validate(proposal: Proposal, depth: int, vocab_size: int) -> None:
    """Refuse a proposal the acceptance rule cannot take (ProposerError)."""
    n = len(proposal.tokens)
    if n > depth:
        raise ProposerError(f"proposed {n} tokens for depth {depth}")
    if any(not 0 <= t < vocab_size for t in proposal.nodes):
        raise ProposerError("proposed a token id outside the vocabulary")
    if proposal.probs is not None and tuple(proposal.probs.shape) != (n, vocab_size):
        raise ProposerError(f"draft probabilities of shape {tuple(proposal.probs.shape)}, expected {(n, vocab_size)}")
    if proposal.branches:
        if any(not 0 <= parent < n + 1 + i for i, (parent, _) in enumerate(proposal.branches)):
            raise ProposerError("a branch's parent must be a node before it")
        if max(proposal.depths()) > depth:
            raise ProposerError(f"proposed a tree deeper than depth {depth}")
        if len(proposal.branches) > MAX_BRANCHES:
            raise ProposerError(f"proposed {len(proposal.branches)} branches; at most {MAX_BRANCHES}")


def stop_tokens(target: CausalLM, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return frozenset(eos | target.eos_token_ids)
