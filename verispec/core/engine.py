"""The speculative decoding loop: propose, score, accept.

State of one request between rounds: `tokens` holds the prompt and every verified token; the
verifier's KV cache holds all positions but the last, whose logits the next round needs. A round

1. proposes up to k draft tokens (`_propose`; any proposer failure falls back to k = 0),
2. scores `[last] + drafts` with ONE verifier pass, giving k+1 rows of logits (`_score`),
3. accepts the longest valid prefix and adds the recovered or bonus token (`_accept`),
4. rolls the verifier's cache back past the rejected drafts and emits the new tokens.

With k = 0 a round is a plain verifier-only decoding step, so depth 0 is the reference decoding
the speculative output is checked against.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from verispec.config import Depth, SamplingParams, SpeculationSettings
from verispec.core.acceptance import Verdict, accept_greedy, accept_stochastic
from verispec.core.calibrate import measure_step_costs
from verispec.core.depth import AdaptiveDepth, StepCosts, depth_policy
from verispec.core.drift import Inspection, inspect_round
from verispec.core.goodput import LiveCosts, PassCosts
from verispec.core.sampling import request_generator, warp
from verispec.errors import ProposerError, UserError
from verispec.models.backend import CausalLM, KVSession
from verispec.proposers.base import DraftPolicy, Proposal, Proposer, ProposerSession
from verispec.stats import RequestStats
from verispec.text import TextStream

log = logging.getLogger(__name__)


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


@dataclass
class _Request:
    """Mutable state of one request in flight."""

    params: SamplingParams
    tokens: list[int]  # prompt + verified tokens
    prompt_len: int
    verifier: KVSession
    proposer: ProposerSession | None
    draft_policy: DraftPolicy
    text: TextStream
    stats: RequestStats
    consecutive_failures: int = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


class SpeculativeEngine:
    def __init__(
        self,
        target: CausalLM,
        tokenizer: PreTrainedTokenizerBase,
        proposer: Proposer | None,
        speculation: SpeculationSettings | None = None,
        costs: StepCosts | None = None,
    ):
        self.target = target
        self.tokenizer = tokenizer
        self.proposer = proposer
        self.speculation = speculation or SpeculationSettings()
        self.eos_ids = stop_tokens(target, tokenizer)
        self._costs = costs  # given: kept as given (tests and benchmarks pin them)
        self._live: LiveCosts | None = None  # measured here: they follow the rounds run
        self._step: tuple[PassCosts, StepCosts] | None = None  # the live curve last read, as step costs

    def costs(self, live: bool = True) -> StepCosts:
        """Step costs for the adaptive depth policy: measured on first use, then following the
        rounds this engine runs (`goodput.LiveCosts`), so that a measurement taken on a busy
        machine heals within a few requests; with `live` False, the first measurement only."""
        if self._costs is None and self._live is None:
            prior = measure_step_costs(
                self.target, self.proposer, self.speculation.max_depth,
                proposer_budget_s=20 * self.speculation.proposer_timeout_s,  # a few dozen proposals' worth
            )
            self._live = LiveCosts(PassCosts(tuple(range(1, len(prior.verify_s) + 1)), prior.verify_s, prior.draft_s))
        if self._live is None:
            return self._costs
        costs = self._live.current() if live else self._live.prior
        if self._step is None or self._step[0] is not costs:  # its rows are every width, 1 .. max_depth+1
            self._step = (costs, StepCosts(costs.seconds, costs.draft_s))
        return self._step[1]

    # -- public API -------------------------------------------------------------------------

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, depth: Depth | None = None
    ) -> Completion:
        token_ids: list[int] = []
        text = []
        for delta in self.stream(prompt, params, depth):
            token_ids += delta.token_ids
            text.append(delta.text)
        assert delta.finish_reason is not None and delta.stats is not None
        return Completion(token_ids, "".join(text), delta.finish_reason, delta.stats)

    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        depth: Depth | None = None,
        depth_limit: Callable[[], int] | None = None,
        inspect: bool = False,
    ) -> Iterator[Delta]:
        """Yield verified tokens round by round. `depth` overrides the configured depth for this
        request; `depth_limit`, asked before every round, caps it (a server shrinks speculation
        under load); `inspect` adds drift and mismatch figures to each round (see inspect.py).
        Closing the iterator early cancels the request and frees its caches."""
        params = params or SamplingParams()
        speculation = self.speculation
        if depth is not None:
            speculation = SpeculationSettings.model_validate({**speculation.model_dump(), "depth": depth})
        # The step costs are measured once per engine, on first use: not this request's time. A
        # seeded sampled request prices depths with that measurement only, never the live rounds:
        # its random draws follow its depths, so its seed reproduces its output in this process.
        live = params.greedy or params.seed is None
        policy = depth_policy(speculation, self.costs(live) if speculation.depth == "auto" else None)
        started = time.perf_counter()
        request = self._start(self.encode(prompt), params, speculation, inspect)
        while True:
            remaining = params.max_new_tokens - request.generated
            depth = min(policy.depth(), remaining - 1)  # a round emits up to depth + 1 tokens
            if depth_limit is not None:
                depth = max(0, min(depth, depth_limit()))
            stats, before = request.stats, (request.stats.propose_s, request.stats.verify_s, request.stats.fallback_rounds)
            started_ns = time.time_ns()
            proposal = self._propose(request, depth)
            target_logits = self._score(request, proposal)
            verdict = self._accept(request, proposal, target_logits)

            accepted = int(verdict.accepted[0])
            request.verifier.rollback(len(request.tokens) + accepted)
            stats.record_round(depth, len(proposal.tokens), accepted)
            if isinstance(policy, AdaptiveDepth) and self._live is not None and live:
                policy.costs = self.costs()  # as the live rounds have them now
            policy.update(len(proposal.tokens), accepted)
            round_ = Round(
                depth, len(proposal.tokens), accepted,
                propose_s=stats.propose_s - before[0], verify_s=stats.verify_s - before[1],
                proposer_failed=stats.fallback_rounds > before[2],
                started_ns=started_ns, ended_ns=time.time_ns(),
                inspection=self._inspect(request, proposal, target_logits, verdict) if inspect and proposal.tokens else None,
            )
            stats.mismatch_s += round_.mismatch_s
            delta = self._emit(request, proposal.tokens[:accepted] + [int(verdict.next_token[0])], round_)
            if delta.finish_reason:
                request.stats.total_s = time.perf_counter() - started
                yield delta
                return
            yield delta

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise UserError("the prompt is empty; give some text to continue")
        return ids

    # -- the round ----------------------------------------------------------------------------

    def _start(
        self, prompt_ids: list[int], params: SamplingParams, speculation: SpeculationSettings, inspect: bool = False
    ) -> _Request:
        window = self.target.max_positions
        if window is not None and len(prompt_ids) + params.max_new_tokens > window:
            raise UserError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the target's context window of {window} tokens; shorten the prompt or lower max_new_tokens"
            )
        seed = None if params.greedy else (params.seed if params.seed is not None else secrets.randbits(63))
        generator = None if seed is None else request_generator(seed, self.target.device)
        stats = RequestStats(prompt_tokens=len(prompt_ids), seed=seed)
        # A round never holds more than prompt + max_new_tokens - 1 positions (depth is capped by
        # the remaining budget), so the cache can be sized exactly.
        verifier = self.target.session(capacity=len(prompt_ids) + params.max_new_tokens)
        t0 = time.perf_counter()
        if len(prompt_ids) > 1:
            verifier.extend(prompt_ids[:-1], last_only=True)  # the last prompt token opens round one
        stats.prefill_s = time.perf_counter() - t0
        auto = speculation.depth == "auto"
        return _Request(
            params=params,
            tokens=list(prompt_ids),
            prompt_len=len(prompt_ids),
            verifier=verifier,
            proposer=self.proposer.session() if self.proposer else None,
            draft_policy=DraftPolicy(
                sampling=params,
                generator=generator,
                min_confidence=speculation.draft_confidence if auto else 0.0,
                time_budget_s=speculation.proposer_timeout_s,
                want_probs=inspect,
            ),
            text=TextStream(self.tokenizer, params.stop),
            stats=stats,
        )

    def _propose(self, request: _Request, depth: int) -> Proposal:
        """Up to `depth` draft tokens; an empty proposal whenever the proposer cannot help."""
        session = request.proposer
        if session is None or depth <= 0 or request.consecutive_failures >= self.speculation.max_proposer_failures:
            return Proposal.empty()
        t0 = time.perf_counter()
        try:
            proposal = session.propose(request.tokens, depth, request.draft_policy)
            _validate(proposal, depth, self.target.vocab_size)
        except Exception as exc:  # a proposer bug must never cost the request its exact output
            return self._fall_back(request, f"proposer failed: {exc!r}", timeout=False)
        finally:
            elapsed = time.perf_counter() - t0
            request.stats.propose_s += elapsed
        if elapsed > self.speculation.proposer_timeout_s:
            return self._fall_back(request, f"proposal took {elapsed:.3f}s", timeout=True)
        request.consecutive_failures = 0
        if self._live is not None and proposal.tokens:
            self._live.observe_draft(elapsed / len(proposal.tokens))
        return proposal

    def _fall_back(self, request: _Request, why: str, timeout: bool) -> Proposal:
        stats = request.stats
        stats.fallback_rounds += 1
        if timeout:
            stats.proposer_timeouts += 1
        else:
            stats.proposer_failures += 1
            request.proposer.reset()  # its state may be half-updated
        request.consecutive_failures += 1
        log.warning("%s; this round runs verifier-only", why)
        if request.consecutive_failures == self.speculation.max_proposer_failures:
            log.warning("%d proposer failures in a row; the request continues verifier-only", request.consecutive_failures)
        return Proposal.empty()

    def _score(self, request: _Request, proposal: Proposal) -> torch.Tensor:
        """One verifier pass over the last verified token and the drafts: (k+1, V) logits."""
        t0 = time.perf_counter()
        logits = request.verifier.extend([request.tokens[-1], *proposal.tokens])
        elapsed = time.perf_counter() - t0
        request.stats.verify_s += elapsed
        if self._live is not None:
            self._live.observe(1 + len(proposal.tokens), elapsed)
        return logits

    def _accept(self, request: _Request, proposal: Proposal, target_logits: torch.Tensor) -> Verdict:
        return accept(request.params, proposal, target_logits, request.draft_policy.generator)

    def _inspect(self, request: _Request, proposal: Proposal, target_logits: torch.Tensor, verdict: Verdict) -> Inspection:
        return inspect(request.params, proposal, target_logits, verdict, request.generated)

    def _emit(self, request: _Request, new_tokens: list[int], round_: Round) -> Delta:
        return emit(request, new_tokens, round_, self.eos_ids)


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
    _validate(proposal, depth, vocab_size)


def _validate(proposal: Proposal, depth: int, vocab_size: int) -> None:
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
