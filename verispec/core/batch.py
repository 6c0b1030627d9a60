"""The batched speculative step: every running request advances one round in ONE verifier pass.

A step

1. plans the pass (`planner.py`): which requests run a round and at what depth, which prompts
   get a chunk of prefill, under the pass's row budget and the KV cache's blocks;
2. proposes drafts for every round: a draft model for all its requests in one draft pass per
   position, the n-gram lookup per request, both on this thread; any other proposer off this
   thread within the time budget (`proposing.py`), so that one that hangs holds no pass;
3. scores every round's rows, the last verified token and the drafts, and every prompt chunk in
   one pass of the runner (`runner.py`);
4. accepts per request (`acceptance.py`: its own depth, its own generator) and emits the
   accepted, recovered and bonus tokens.

Each request's state is what `engine.py` keeps for a single sequence, with a block table
(`kv_cache.py`) in place of a private cache: its KV holds every verified position but the last,
whose logits the next round needs. A pass's time is shared among its requests in proportion to
their rows, so per-request statistics, cost and the bandit's busy time stay right.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from verispec.config import BatchSettings, Depth, SamplingParams, SpeculationSettings
from verispec.core.draft_batch import DraftBatch
from verispec.core.engine import Delta, Round, accept, emit, inspect, validate
from verispec.core.goodput import Acceptance, LiveCosts, PassCosts, choose_depths, measure_pass_costs
from verispec.core.kv_cache import BlockTable
from verispec.core.planner import Plan, plan_pass
from verispec.core.proposing import Busy, Proposing, TimedOut
from verispec.core.runner import ModelRunner, Segment, batchable
from verispec.core.sampling import request_generator
from verispec.errors import UserError
from verispec.proposers.base import DraftPolicy, Proposal, Proposer

if TYPE_CHECKING:
    from verispec.proposers.remote import RemoteDrafts
from verispec.stats import RequestStats
from verispec.text import TextStream

log = logging.getLogger(__name__)


@dataclass(eq=False)
class BatchRequest:
    """One request in the batched engine."""

    id: str
    params: SamplingParams
    tokens: list[int]  # prompt + verified tokens
    prompt_len: int
    speculation: SpeculationSettings
    proposer: Proposer | None
    draft_policy: DraftPolicy
    text: TextStream
    stats: RequestStats
    table: BlockTable
    depth_limit: Callable[[], int] | None = None
    inspect: bool = False
    remote: RemoteDrafts | None = None  # an edge client's drafts (the verify API) in place of a proposer
    draft_ahead: bool = False  # draft the first round while the prompt prefills (provisional streams)
    early: Proposal | None = None  # those drafts, until the first round scores them
    acceptance: Acceptance = field(default_factory=Acceptance)
    session: object = None  # the proposer's per-request state (a session, or a DraftState)
    consecutive_failures: int = 0
    preemptions: int = 0
    arrived: float = field(default_factory=time.perf_counter)
    order: int = 0  # admission order: the newest is preempted first

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prefilling(self) -> bool:
        return self.table.computed < len(self.tokens) - 1

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - self.generated

    @property
    def parked(self) -> bool:
        """Waiting for its edge client's drafts: it takes no rows and no running slot, and keeps its
        blocks only while nobody else needs them (preempted, it waits for its drafts to come back)."""
        return self.remote is not None and self.remote.parked


class BatchEngine:
    """Owns the verifier's runner and cache, the waiting and running requests, and the step."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        batch: BatchSettings,
        max_running: int = 8,
    ):
        self.runner = runner
        self.target = runner.lm
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.batch = batch
        self.max_running = max_running
        self.waiting: list[BatchRequest] = []  # admission order; preempted requests go first
        self.running: list[BatchRequest] = []
        self.proposing = Proposing()
        self._drafts: dict[int, DraftBatch] = {}  # per draft proposer (by id)
        self._costs: PassCosts | None = None  # set from outside: kept as set (tests pin them)
        self._live: LiveCosts | None = None  # measured here: they follow the passes run
        self._admitted = 0
        self.preemptions = 0
        # Called with each pass's drafts before the verifier scores them (provisional streaming).
        self.on_proposed: Callable[[dict[BatchRequest, Proposal]], None] | None = None

    # -- requests in and out ---------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        speculation: SpeculationSettings,
        proposer: Proposer | None,
        depth: Depth | None = None,
        depth_limit: Callable[[], int] | None = None,
        inspect: bool = False,
        remote: RemoteDrafts | None = None,
        draft_ahead: bool = False,
    ) -> BatchRequest:
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise UserError("the prompt is empty; give some text to continue")
        window = self.target.max_positions
        if window is not None and len(prompt_ids) + params.max_new_tokens > window:
            raise UserError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the target's context window of {window} tokens; shorten the prompt or lower max_new_tokens"
            )
        if depth is not None:
            speculation = SpeculationSettings.model_validate({**speculation.model_dump(), "depth": depth})
        seed = None if params.greedy else (params.seed if params.seed is not None else secrets.randbits(63))
        auto = speculation.depth == "auto"
        request = BatchRequest(
            id=request_id,
            params=params,
            tokens=prompt_ids,
            prompt_len=len(prompt_ids),
            speculation=speculation,
            proposer=proposer,
            draft_policy=DraftPolicy(
                sampling=params,
                generator=None if seed is None else request_generator(seed, self.target.device),
                min_confidence=speculation.draft_confidence if auto else 0.0,
                time_budget_s=speculation.proposer_timeout_s,
                want_probs=inspect,
            ),
            text=TextStream(self.tokenizer, params.stop),
            stats=RequestStats(prompt_tokens=len(prompt_ids), seed=seed),
            table=BlockTable(self.runner.pool),
            depth_limit=depth_limit,
            inspect=inspect,
            remote=remote,
            draft_ahead=draft_ahead,
        )
        self.waiting.append(request)
        return request

    def abort(self, request: BatchRequest) -> None:
        """Drop a request (cancelled, past its deadline, finished): its blocks are free at once."""
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    @property
    def busy(self) -> int:
        return len(self.running) + len(self.waiting)

    @property
    def active(self) -> int:
        """Running requests that hold a slot: all but the parked ones."""
        return sum(not r.parked for r in self.running)

    def costs(self, live: bool = True) -> PassCosts:
        """Verifier pass cost by rows and the draft pass's (for --depth auto and prompt chunks):
        measured on first use, then following the passes this engine runs (`goodput.LiveCosts`),
        so that a measurement taken on a busy machine heals within a few requests. With `live`
        False: the start-up measurement only (a seeded sampled request's, so that its seed
        reproduces its output in this process)."""
        if self._costs is None and self._live is None:
            max_rows = max(self.batch.max_pass_tokens, self.max_running * 9)
            draft_s = 0.0
            for batch in self._drafts.values():
                draft_s = max(draft_s, measure_pass_costs(batch.runner, 1).seconds[0])
            prior = measure_pass_costs(self.runner, max_rows, draft_s)
            log.info(
                "pass costs: %s ms by rows %s, draft pass %.2f ms (measured at start; live passes refine them)",
                [round(s * 1e3, 2) for s in prior.seconds], list(prior.rows), draft_s * 1e3,
            )
            self._live = LiveCosts(prior)
        if self._live is None:
            return self._costs
        return self._live.current() if live else self._live.prior

    def chunk_budget(self, round_rows: int) -> int:
        """Prompt rows this pass may take beside `round_rows` rows of rounds."""
        room = max(self.batch.max_pass_tokens - round_rows, 1)
        if round_rows == 0:
            return room
        costs = self.costs()
        limit = self.batch.prefill_slowdown * costs.verify(round_rows)
        rows = 1
        while rows < room and costs.verify(round_rows + rows + 1) <= limit:
            rows += 1
        return rows

    def draft_batch(self, proposer: Proposer) -> DraftBatch | None:
        """The batched drafter of a proposer that offers a draft model the runner can batch."""
        lm = getattr(proposer, "draft_model", None)
        if lm is None or batchable(lm) is not None:
            return None
        batch = self._drafts.get(id(proposer))
        if batch is None:
            # As many positions as the verifier's cache holds, in the draft's (smaller) blocks.
            positions = self.runner.pool.num_blocks * self.runner.pool.block_size
            per_position = 2 * len(lm.layers) * lm.kv_heads * lm.head_dim * 4
            memory = max(positions * per_position, (lm.max_positions + 64) * per_position)
            batch = DraftBatch(lm, self.target.vocab_size, memory, self.runner.pool.block_size)
            self._drafts[id(proposer)] = batch
        return batch

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[tuple[BatchRequest, Delta]]:
        """One pass: a round for every running request past its prompt, prompt chunks for the rest."""
        plan = plan_pass(self)
        if not plan.rounds and not plan.chunks:
            return []
        started_ns = time.time_ns()
        self._draft_ahead(plan)
        announced = {r for r in plan.rounds if r.early is not None}  # shown while the prompt prefilled
        proposals, propose_s = self._propose(plan)
        if self.on_proposed is not None:
            self.on_proposed({r: p for r, p in proposals.items() if p.tokens and r not in announced})
        segments = [Segment([r.tokens[-1], *proposals[r].tokens], r.table.computed, r.table) for r in plan.rounds]
        segments += [Segment(r.tokens[r.table.computed : r.table.computed + n], r.table.computed, r.table, logits=0) for r, n in plan.chunks]
        t0 = time.perf_counter()
        logits = self.runner.forward(segments)
        pass_s = time.perf_counter() - t0
        rows = sum(len(s.tokens) for s in segments)
        if self._live is not None:
            self._live.observe(rows, pass_s)

        deltas = []
        for request, n in plan.chunks:
            request.table.verified(request.table.computed + n, request.tokens)
            request.stats.prefill_s += pass_s * n / rows
        ended_ns = time.time_ns()
        for request, target_logits in zip(plan.rounds, logits, strict=False):
            proposal = proposals[request]
            verdict = accept(request.params, proposal, target_logits, request.draft_policy.generator)
            accepted = int(verdict.accepted[0])
            request.table.verified(request.table.computed + 1 + accepted, request.tokens + proposal.tokens[:accepted])
            stats = request.stats
            share = pass_s * (1 + len(proposal.tokens)) / rows
            stats.verify_s += share
            stats.record_round(plan.depths[request], len(proposal.tokens), accepted)
            request.acceptance.update(len(proposal.tokens), accepted)
            if request.remote is not None:
                request.remote.hint = self.remote_hint(request)
            round_ = Round(
                plan.depths[request], len(proposal.tokens), accepted,
                propose_s=propose_s.get(request, 0.0), verify_s=share,
                proposer_failed=request in self._failed,
                started_ns=started_ns, ended_ns=ended_ns,
                inspection=inspect(request.params, proposal, target_logits, verdict, request.generated)
                if request.inspect and proposal.tokens else None,
            )  # fmt: skip
            stats.mismatch_s += round_.mismatch_s
            delta = emit(request, proposal.tokens[:accepted] + [int(verdict.next_token[0])], round_, self.eos_ids)
            if delta.finish_reason:
                stats.total_s = time.perf_counter() - request.arrived
                self.abort(request)
            deltas.append((request, delta))
        return deltas

    def _draft_ahead(self, plan: Plan) -> None:
        """Draft the first round of the requests that want it while their prompts prefill, so that
        the drafts reach their clients before the verifier has read the whole prompt. The first
        round scores these drafts: the context they continue does not change during prefill, and
        no other random draw of the request comes between, so the output is what it would be."""
        ahead = [r for r, _ in plan.chunks if r.draft_ahead and r.early is None and r.proposer is not None]
        if not ahead:
            return
        early = Plan(rounds=ahead, depths=self.choose_depths(ahead))
        proposals, _ = self._propose(early)
        for request in ahead:
            request.early = proposals[request]
        if self.on_proposed is not None:
            self.on_proposed({r: p for r, p in proposals.items() if p.tokens})

    def _propose(self, plan: Plan) -> tuple[dict[BatchRequest, Proposal], dict[BatchRequest, float]]:
        """Drafts for every round with a depth; an empty proposal wherever the proposer cannot help."""
        self._failed: set[BatchRequest] = set()
        proposals = {r: Proposal.empty() for r in plan.rounds}
        calls, inline, members = {}, {}, {}
        drafted = set()
        for request in plan.rounds:
            if request.early is not None:  # drafted while its prompt prefilled
                proposals[request] = request.early.cut(plan.depths[request])
                request.early = None
                drafted.add(request)
        drafting = [r for r in plan.rounds if plan.depths[r] > 0 and r.proposer is not None and r not in drafted]
        for request in drafting:
            batch = self.draft_batch(request.proposer)
            if batch is not None:
                if request.session is None:
                    request.session = batch.state()
                members.setdefault(batch, []).append(request)
            else:  # a call per request (a stateless proposer's session is shared)
                if request.session is None:
                    request.session = request.proposer.session()
                call = lambda r=request: r.session.propose(r.tokens, plan.depths[r], r.draft_policy)  # noqa: E731
                (inline if getattr(request.proposer, "inline", False) else calls)[request] = call
                members[request] = [request]
        for request in plan.rounds:
            if request.remote is not None:
                proposals[request] = self._remote_drafts(request, plan.depths[request])
        budget = min((r.speculation.proposer_timeout_s for r in drafting), default=0.0)
        started = time.perf_counter()
        results = self.proposing.start(calls)
        # The draft model drafts on this thread: it is verispec's own pass (its time budget is
        # checked between draft positions), and its kernels' OpenMP team must stay this thread's;
        # a second team on another thread makes every later pass fight it for the cores.
        for key, call in inline.items():  # n-gram lookups: microseconds of our own code
            try:
                results[key] = call()
            except Exception as exc:  # noqa: BLE001
                results[key] = exc
        for batch, requests in members.items():
            if isinstance(batch, DraftBatch):
                items = [(r.session, r.tokens, plan.depths[r], r.draft_policy) for r in requests]
                t0 = time.perf_counter()
                try:
                    results[batch] = batch.propose(items)
                except Exception as exc:  # noqa: BLE001 (every request of the batch falls back)
                    results[batch] = exc
                else:  # as many draft passes as the longest proposal has tokens (its first pass catches up)
                    if self._live is not None:
                        passes = max((len(p.tokens) for p in results[batch]), default=0)
                        self._live.observe_draft((time.perf_counter() - t0) / max(passes, 1))
        results |= self.proposing.collect(max(0.0, budget - (time.perf_counter() - started)))
        waited = time.perf_counter() - started
        propose_s = {}
        for key, requests in members.items():
            result = results[key]
            outcomes = result if isinstance(result, list) else [result] * len(requests)
            for request, outcome in zip(requests, outcomes, strict=True):
                propose_s[request] = waited / len(drafting)
                request.stats.propose_s += propose_s[request]
                if isinstance(outcome, Busy):
                    request.stats.fallback_rounds += 1
                    self._failed.add(request)
                    continue
                if isinstance(outcome, Proposal):
                    try:
                        validate(outcome, plan.depths[request], self.target.vocab_size)
                    except Exception as exc:  # noqa: BLE001 (a proposer bug costs a round, never the output)
                        outcome = exc
                if isinstance(outcome, Proposal):
                    proposals[request] = outcome
                    request.consecutive_failures = 0
                else:
                    self._fall_back(request, outcome)
        return proposals, propose_s

    def _remote_drafts(self, request: BatchRequest, depth: int) -> Proposal:
        """The edge client's drafts for this round (the handler checked them; a bad one costs the
        round its drafts, never the output)."""
        proposal = request.remote.take(depth)
        try:
            validate(proposal, depth, self.target.vocab_size)
        except Exception as exc:  # noqa: BLE001
            log.warning("request %s: the client's drafts were refused: %s; this round runs verifier-only", request.id, exc)
            request.stats.fallback_rounds += 1
            self._failed.add(request)
            return Proposal.empty()
        return proposal

    def _fall_back(self, request: BatchRequest, error: BaseException) -> None:
        stats = request.stats
        stats.fallback_rounds += 1
        self._failed.add(request)
        if isinstance(error, TimedOut):
            stats.proposer_timeouts += 1
            why = f"proposal took longer than {request.speculation.proposer_timeout_s}s"
        else:
            stats.proposer_failures += 1
            why = f"proposer failed: {error!r}"
            self._reset_proposer(request)
        request.consecutive_failures += 1
        log.warning("request %s: %s; this round runs verifier-only", request.id, why)

    def _reset_proposer(self, request: BatchRequest) -> None:
        """Forget the proposer's state for this request (it may be half-updated)."""
        if request.session is None or self.proposing.busy(request):
            return
        if not self._drop_draft_state(request):
            request.session.reset()

    def depth_limit(self, request: BatchRequest) -> int:
        """The most drafts this request may take this round, before goodput is weighed."""
        speculation = request.speculation
        if request.remote is not None:  # as many as the client sent, within the budget
            pending = request.remote.pending
            return max(0, min(len(pending.tokens) if pending is not None else 0, request.remaining - 1))
        if request.proposer is None or request.consecutive_failures >= speculation.max_proposer_failures:
            return 0
        if self.proposing.busy(request):  # a plug-in's previous call has not returned
            return 0
        limit = speculation.max_depth if speculation.depth == "auto" else int(speculation.depth)
        limit = min(limit, request.remaining - 1)  # a round emits up to depth + 1 tokens
        if request.depth_limit is not None:
            limit = min(limit, request.depth_limit())
        return max(0, limit)

    def choose_depths(self, requests: list[BatchRequest]) -> dict[BatchRequest, int]:
        """Fixed depths as configured; depth auto by the batch's goodput (`goodput.py`). A sampled
        request's depth follows its own acceptance and the single-stream costs only, so that what
        else shares its batch never changes its random draws; a seeded one's, the start-up costs
        (not the live ones), so that its seed reproduces its output in this process."""
        limits = {r: self.depth_limit(r) for r in requests}
        depths = {r: limits[r] for r in requests if r.speculation.depth != "auto" or r.remote is not None}
        auto = [r for r in requests if r not in depths]
        if not auto or all(limits[r] == 0 for r in auto):
            return depths | {r: 0 for r in auto}
        costs = self.costs()
        shared = [r for r in auto if r.params.greedy]
        for request in auto:
            if not request.params.greedy:
                depths |= self._goodput([request], limits, costs if request.params.seed is None else self.costs(live=False))
        beside = sum(1 + k for k in depths.values())
        return depths | self._goodput(shared, limits, costs, beside)

    def remote_hint(self, request: BatchRequest) -> int:
        """The depth that pays best for the verifier, by the session's acceptance so far and the
        measured pass costs, as for a proposer of the server's own (drafting is the client's, so it
        costs the server nothing). An edge client may follow it to spend the least verifier time per
        token; its own round trips may argue for deeper drafts."""
        cap = min(self.batch.max_pass_tokens - 1, max(0, request.remaining - 1), 16)
        chosen = choose_depths([request.acceptance.alpha], [cap], self.costs(), [0.0])
        return chosen[0]

    def _goodput(self, requests, limits, costs: PassCosts, base_rows: int = 0) -> dict[BatchRequest, int]:
        if not requests:
            return {}
        alphas = [r.acceptance.alpha for r in requests]
        caps = [limits[r] for r in requests]
        drafts = [costs.draft_s if self.draft_batch(r.proposer) is not None else 0.0 for r in requests]
        chosen = choose_depths(alphas, caps, costs, drafts, base_rows)
        # A request at depth 0 probes with one draft every 8 rounds, so that text turning
        # predictable gets speculation back.
        return {
            r: (1 if k == 0 and caps[i] > 0 and r.acceptance.rounds_off % 8 == 7 else k)
            for i, (r, k) in enumerate(zip(requests, chosen, strict=True))
        }

    # -- preemption --------------------------------------------------------------------------------

    def preempt(self, request: BatchRequest) -> None:
        """Out of blocks: free this running request's blocks and queue it first, to recompute later."""
        log.info("request %s preempted: the KV cache is full; it resumes once blocks free", request.id)
        self.running.remove(request)
        self._release(request)
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.insert(0, request)

    def _release(self, request: BatchRequest) -> None:
        request.table.free()
        self._drop_draft_state(request)

    def _drop_draft_state(self, request: BatchRequest) -> bool:
        """Give back the request's blocks in the draft model's cache; False if it has none there."""
        batch = self.draft_batch(request.proposer) if request.proposer is not None else None
        if batch is None or request.session is None:
            return False
        batch.release(request.session)
        request.session = None
        return True

    def admit(self, request: BatchRequest) -> bool:
        """Start a waiting request if the cache has blocks for its prefix and prompt: it takes
        them and runs from the next pass. False, and nothing taken, if not."""
        reused = request.table.reuse_prefix(request.tokens)
        pool = self.runner.pool
        need = pool.blocks_for(len(request.tokens) + 1) - len(request.table.blocks)
        # Keep a block per active request spare for its next rounds.
        if need + self.active > pool.free_blocks and self.running:
            request.table.free()
            return False
        if request.preemptions == 0:
            request.stats.cached_tokens = reused
        self._admitted += 1
        request.order = self._admitted
        self.waiting.remove(request)
        self.running.append(request)
        return True

    def close(self) -> None:
        self.proposing.close()


__all__ = ["BatchEngine", "BatchRequest"]
