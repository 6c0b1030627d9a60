"""The speculative engine: every running request advances one round in ONE verifier pass.

A step

1. plans the pass (`planner.py`): which requests run a round and at what depth, which prompts
   get a chunk of prefill, under the pass's row budget and the KV cache's blocks;
2. proposes drafts for every round (`drafting.py`);
3. scores every round's rows, the last verified token and the drafts, and every prompt chunk in
   one pass of the runner (`runner.py`, or `session_runner.py` for a backend that cannot batch);
4. accepts per request (`rounds.accept`: its own depth, its own generator) and emits the
   accepted, recovered and bonus tokens (`rounds.emit`).

With depth 0 a round is a plain verifier-only decoding step, so depth 0 is the reference decoding
the speculative output is checked against. One stream (`stream`, `generate`: the commands) is a
batch of one; the server's scheduler steps the same engine for all its requests. A pass's time
is shared among its requests in proportion to their rows, so per-request statistics, cost and
the bandit's busy time stay right.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from verispec.config import BatchSettings, Depth, SamplingParams, SpeculationSettings
from verispec.core.calibrate import measure_draft_cost
from verispec.core.drafting import Drafting
from verispec.core.goodput import DraftCost, LiveCosts, PassCosts, choose_depths, measure_pass_costs
from verispec.core.grammar import compiled
from verispec.core.kv_cache import BlockTable, OutOfBlocks
from verispec.core.planner import Plan, plan_pass
from verispec.core.processing import Processing, check_token_ids
from verispec.core.prompt_logprobs import cacheable, rows_to_score, score_rows
from verispec.core.repeats import repeat_drafts
from verispec.core.request import Request
from verispec.core.rounds import Completion, Delta, Round, accept, emit, inspect, token_logprobs
from verispec.core.runner import Segment
from verispec.core.sampling import PositionNoise, request_generator
from verispec.core.trees import chain_prefix, choose_widths
from verispec.errors import UserError
from verispec.proposers.base import DraftPolicy, Proposal, Proposer
from verispec.stats import RequestStats
from verispec.text import TextStream

log = logging.getLogger(__name__)

_stream_ids = itertools.count(1)
JUMP_FORWARD_MAX = 16  # tokens a grammar forces that one round may take
DEFAULT: Proposer = object()  # type: ignore[assignment]  # stream(): the engine's own proposer


class Engine:
    """Owns the verifier's runner and cache, the waiting and running requests, and the step."""

    def __init__(
        self,
        runner,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        batch: BatchSettings | None = None,
        max_running: int = 8,
        proposer: Proposer | None = None,
        speculation: SpeculationSettings | None = None,
    ):
        self.runner = runner
        self.target = runner.lm
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.batch = batch or BatchSettings()
        self.max_running = max_running
        self.proposer = proposer  # the default proposer (a request may bring its own)
        # proposers that learn from every finished request, whichever proposer served it (`learn`)
        self.learners: list[Proposer] = [proposer] if hasattr(proposer, "learn") else []
        self.speculation = speculation or SpeculationSettings()  # the default speculation settings
        self.waiting: list[Request] = []  # admission order; preempted requests go first
        self.running: list[Request] = []
        self.check_runner(proposer)
        self.drafting = Drafting(runner, self.target.vocab_size)
        self.drafting.on_draft_pass = self._observe_draft
        self._costs: PassCosts | None = None  # set from outside: kept as set (tests pin them)
        self._live: LiveCosts | None = None  # measured here: they follow the passes run
        self._draft_s: dict[int, float] = {}  # per proposer the engine cannot batch (by id): seconds per draft token
        self._admitted = 0
        self.preemptions = 0
        # Called with each pass's drafts before the verifier scores them (provisional streaming).
        self.on_proposed: Callable[[dict[Request, Proposal]], None] | None = None

    # -- one stream: a batch of one ----------------------------------------------------------------

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, depth: Depth | None = None, proposer=DEFAULT
    ) -> Completion:
        token_ids: list[int] = []
        text = []
        first: Delta | None = None
        for delta in self.stream(prompt, params, depth, proposer=proposer):
            first = first or delta
            token_ids += delta.token_ids
            text.append(delta.text)
        assert first is not None and delta.finish_reason is not None and delta.stats is not None
        return Completion(token_ids, "".join(text), delta.finish_reason, delta.stats, first.prompt_logprobs)

    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        depth: Depth | None = None,
        depth_limit: Callable[[], int] | None = None,
        inspect: bool = False,
        proposer: Proposer | None = DEFAULT,
    ) -> Iterator[Delta]:
        """Yield one request's verified tokens round by round, stepping the engine on this thread
        (so nothing else may step it meanwhile: the commands' way; the server steps it for all
        its requests). `depth` overrides the configured depth for this request; `depth_limit`,
        asked before every round, caps it; `inspect` adds drift and mismatch figures to each
        round (see drift.py); `proposer` replaces the engine's default proposer for this request.
        Closing the iterator early cancels the request and frees its caches."""
        request = self.add(
            f"stream-{next(_stream_ids)}", self.encode(prompt), params or SamplingParams(), self.speculation,
            self.proposer if proposer is DEFAULT else proposer, depth=depth, depth_limit=depth_limit, inspect=inspect,
        )  # fmt: skip
        try:
            while True:
                results = self.step()
                if not results and request in self.waiting and not self.running:
                    raise UserError("the KV cache cannot hold this request; raise --kv-cache-memory")
                for owner, delta in results:
                    if owner is request:
                        if isinstance(delta, UserError):  # its format could not be followed
                            raise delta
                        yield delta
                        if delta.finish_reason:
                            return
        finally:
            self.abort(request)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise UserError("the prompt is empty; give some text to continue")
        return ids

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
        remote=None,
        draft_ahead: bool = False,
        share_key: str = "",
    ) -> Request:
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
        problem = check_token_ids(params, self.target.vocab_size)
        if problem is not None:
            raise UserError(problem[1])
        seed = None if params.greedy else (params.seed if params.seed is not None else secrets.randbits(63))
        device = self.target.device
        noise = PositionNoise(seed, self.target.vocab_size, device) if seed is not None and params.sampled_acceptance == "coupled" else None
        stop_ids = (frozenset() if params.ignore_eos else self.eos_ids) | frozenset(params.stop_token_ids)
        grammar = None
        if params.constrained:  # compiled once per format (the server compiles it off this thread first)
            grammar = compiled(params.response_format, self.tokenizer, self.target.vocab_size).start(stop_ids)
        auto = speculation.depth == "auto"
        table = BlockTable(self.runner.pool)
        table.capacity = len(prompt_ids) + params.max_new_tokens  # a round never holds more (depth is capped by the budget)
        request = Request(
            id=request_id,
            params=params,
            tokens=prompt_ids,
            prompt_len=len(prompt_ids),
            speculation=speculation,
            proposer=proposer,
            draft_policy=DraftPolicy(
                sampling=params,
                generator=None if seed is None else request_generator(seed, device),
                noise=noise,
                min_confidence=speculation.draft_confidence if auto else 0.0,
                time_budget_s=speculation.proposer_timeout_s,
                want_probs=inspect,
            ),
            text=TextStream(self.tokenizer, params.stop),
            stats=RequestStats(prompt_tokens=len(prompt_ids), seed=seed),
            table=table,
            depth_limit=depth_limit,
            inspect=inspect,
            remote=remote,
            draft_ahead=draft_ahead,
            share_key=share_key,
            stop_ids=stop_ids,
            processing=Processing(params, prompt_ids, stop_ids, self.target.vocab_size, device) if params.processed else None,
            grammar=grammar,
            prompt_logprobs=None if params.prompt_logprobs is None else [],
        )
        self.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
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

    # -- pass costs --------------------------------------------------------------------------------

    def costs(self, live: bool = True) -> PassCosts:
        """Verifier pass cost by rows and the draft pass's (for --depth auto and prompt chunks):
        measured on first use, then following the passes this engine runs (`goodput.LiveCosts`),
        so that a measurement taken on a busy machine heals within a few requests. With `live`
        False: the start-up measurement only (a seeded request sampled by the rejection rule, so
        that its seed reproduces its output in this process)."""
        if self._costs is None and self._live is None:
            max_rows = max(self.batch.max_pass_tokens, self.max_running * 9)
            if not self.runner.batches:  # a pass runs its sequences one after another: one's widths
                max_rows = self.speculation.max_depth + 1
            draft_s = 0.0
            for batch in self.drafting.batches.values():
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

    def pin_costs(self, costs: PassCosts) -> None:
        """Use these pass costs from now on, never measured ones (tests and benchmarks pin them)."""
        self._costs, self._live = costs, None

    def _observe_draft(self, step_s: float | None, first_s: float | None) -> None:
        if self._live is not None:
            self._live.observe_draft(step_s, first_s)

    def chunk_budget(self, round_rows: int, rounds: int, prompts: int) -> int:
        """Prompt rows this pass may take beside `round_rows` rows of `rounds` requests' rounds,
        for `prompts` requests reading their prompts: what keeps the pass within `prefill_slowdown`
        times the rounds' cost alone. A lone prompt gets that plain allowance, whatever runs beside
        it (the streams' inter-token latency stays within it); prompts waiting together, as
        closed-loop clients in step send them, get it times (prompts + 1) / rounds where that is
        over 1: three prompts behind one stream's one-row rounds get four times it instead of a few
        rows a pass (their first tokens waited up to 1.5 s: docs/performance.md, "Prompts waiting
        together")."""
        if not self.runner.chunks_prompts:  # the whole prompt in one pass, as its backend reads it
            return 1 << 30
        room = max(self.batch.max_pass_tokens - round_rows, 1)
        if round_rows == 0:
            return room
        costs = self.costs()
        together = max(1.0, (prompts + 1) / rounds) if prompts > 1 else 1.0  # rounds >= 1: round_rows > 0
        limit = self.batch.prefill_slowdown * costs.verify(round_rows) * together
        rows = 1
        while rows < room and costs.verify(round_rows + rows + 1) <= limit:
            rows += 1
        return rows

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[tuple[Request, Delta | UserError]]:
        """One pass: a round for every running request past its prompt, prompt chunks for the rest.
        A request whose format cannot be followed (its grammar ran out of fuel, or allows no token)
        ends alone: its entry is that UserError instead of a Delta, and the pass goes on without it."""
        plan = plan_pass(self)
        if not plan.rounds and not plan.chunks:
            return []
        started_ns = time.time_ns()
        self._draft_ahead(plan)
        announced = {r for r in plan.rounds if r.early is not None}  # shown while the prompt prefilled
        drafted = {r: 0 if r.forced else d for r, d in plan.depths.items()}
        proposals, propose_s = self.drafting.propose(plan.rounds, drafted, self._widths(plan.rounds, drafted))
        masks, failed = {}, []
        for request in plan.rounds:
            if proposals[request].branches and not self._room_for_tree(request, proposals[request]):
                proposals[request] = proposals[request].chain()
            if request.grammar is None:
                continue
            try:
                proposals[request], masks[request] = self._within_grammar(request, proposals[request])
            except UserError as exc:
                failed.append(self._fail(request, exc))
                del proposals[request]
        if failed:
            plan.rounds = [r for r in plan.rounds if r in proposals]
            if not plan.rounds and not plan.chunks:
                return failed
        if self.on_proposed is not None:
            self.on_proposed({r: p for r, p in proposals.items() if p.tokens and r not in announced})
        # A draft head's requests also keep their rows' features (the verifier's final hidden
        # states); where a head is loaded, every other request's prompt chunks too (`_features`).
        segments = [
            Segment(
                [r.tokens[-1], *proposals[r].nodes], r.table.computed, r.table, features=reads_features(r),
                parents=proposals[r].parents() if proposals[r].branches else None,
            )
            for r in plan.rounds
        ]  # fmt: skip
        for r, n in plan.chunks:  # a chunk writes keys and values; logits only for rows scoring prompt logprobs
            start = r.table.computed
            scored = rows_to_score(r, start, n)
            segments.append(Segment(r.tokens[start : start + n], start, r.table, logits=scored, features=self._features(r)))
        t0 = time.perf_counter()
        logits = self.runner.forward(segments)
        pass_s = time.perf_counter() - t0
        rows = sum(len(s.tokens) for s in segments)
        if self._live is not None:
            self._live.observe(rows, pass_s)

        deltas = []
        chunk_segments = segments[len(plan.rounds) :]
        for (request, n), chunk_logits, segment in zip(plan.chunks, logits[len(plan.rounds) :], chunk_segments, strict=True):
            if chunk_logits is not None:
                score_rows(request, request.table.computed + n, chunk_logits)
            request.table.verified(request.table.computed + n, request.tokens)
            if segment.hidden is not None:
                self._observe(request, segment.start, segment.hidden)
            request.stats.prefill_s += pass_s * n / rows
        ended_ns = time.time_ns()
        for request, target_logits, segment in zip(plan.rounds, logits, segments, strict=False):
            proposal = proposals[request]
            if request.processing is not None:
                target_logits = request.processing.apply(target_logits, proposal.tokens, request.generated)
            if request in masks:
                target_logits = _masked(target_logits, masks[request], request.stop_ids)
            position = len(request.tokens)  # the output position row 0 scores
            verdict = accept(request.params, proposal, target_logits, request.draft_policy.generator, request.noise, position)
            accepted, kept = len(verdict.path), [0, *verdict.path]  # the verified rows: the last token's, the accepted path's
            drafts = [request.tokens[-1], *proposal.nodes]
            if proposal.branches:  # the path's keys and values to its positions; the other nodes' are left behind
                self.runner.keep_path(request.table, request.table.computed, kept)
                target_logits = target_logits[kept]  # row i now scores the path's token i
            request.table.verified(request.table.computed + 1 + accepted, request.tokens + [drafts[v] for v in verdict.path])
            if segment.hidden is not None:
                self._observe(request, segment.start, segment.hidden[kept])
            stats = request.stats
            share = pass_s * len(segment.tokens) / rows
            stats.verify_s += share
            proposed = proposal.depth  # a tree's deepest path: what the round could have accepted
            stats.record_round(plan.depths[request], proposed, accepted)
            if request.repeat is not None:  # not the proposer's: its acceptance estimate leaves it out
                stats.repeat_rounds += 1
            else:
                request.acceptance.update(proposed, accepted)
            if request.remote is not None:
                request.remote.hint = self.remote_hint(request)
            round_ = Round(
                plan.depths[request], proposed, accepted, chain_accepted=chain_prefix(verdict.path),
                propose_s=propose_s.get(request, 0.0), verify_s=share,
                proposer_failed=request in self.drafting.failed, repeat=request.repeat is not None,
                started_ns=started_ns, ended_ns=ended_ns,
                inspection=inspect(request.params, proposal, target_logits, verdict, request.generated)
                if request.inspect and proposal.tokens else None,
            )  # fmt: skip
            stats.mismatch_s += round_.mismatch_s
            new_tokens = [drafts[v] for v in verdict.path] + [verdict.next_token]
            top = request.params.logprobs
            logprobs = None if top is None else token_logprobs(target_logits, new_tokens, top)
            delta = emit(request, new_tokens, round_, request.stop_ids, logprobs)
            if request.processing is not None:
                request.processing.observe(delta.token_ids)
            if request.grammar is not None and not delta.finish_reason:
                try:
                    request.grammar.advance(delta.token_ids)
                except UserError as exc:
                    failed.append(self._fail(request, exc))
                    continue
            if delta.finish_reason:
                stats.total_s = time.perf_counter() - request.arrived
                self.abort(request)
                self._teach(request)
            deltas.append((request, delta))
        return failed + deltas

    def _features(self, request: Request) -> bool:
        """Whether a prompt chunk's pass gives the request's rows' features: its draft head reads
        them, or a head loaded beside its proposer keeps them with its cached blocks for a later
        head's request with that prefix (`Drafting.keep`). Only its prompt's: kept from every round
        too, they cost a server with a head loaded 3-5% of its verifier-only speed at 4 streams."""
        return reads_features(request) or self.drafting.keeps_features()

    def _observe(self, request: Request, start: int, features: torch.Tensor) -> None:
        if reads_features(request):
            self.drafting.observe(request, start, features)
            return
        try:
            self.drafting.keep(request, start, features)
        except Exception as exc:  # noqa: BLE001 (keeping them is a courtesy to later requests, never this one's output)
            log.warning("request %s: its features were not kept for the draft head: %r", request.id, exc)
            request.feature_logs.clear()

    def _teach(self, request: Request) -> None:
        """Give a finished request's text to the proposers that learn from every request (its own
        proposer included, whose session saw all but its last round)."""
        learners = self.learners
        if hasattr(request.proposer, "learn") and request.proposer not in learners:
            learners = [*learners, request.proposer]
        for learner in learners:
            learner.learn(request.tokens, request.share_key, request.session)

    def _fail(self, request: Request, error: UserError) -> tuple[Request, UserError]:
        """End a request whose format cannot be followed, alone: its step entry is the error."""
        log.info("request %s ended: %s", request.id, error)
        request.stats.total_s = time.perf_counter() - request.arrived
        self.abort(request)
        return request, error

    def _within_grammar(self, request: Request, proposal: Proposal) -> tuple[Proposal, torch.Tensor]:
        """A constrained request's drafts (the tokens its grammar forces, else its proposer's up to
        the first one the grammar forbids: that one could never be accepted, so it costs no row)
        and the grammar's mask at every row that scores them."""
        if request.forced:
            proposal = Proposal(request.forced)  # certain: the grammar leaves the verifier no other token
        masks, allowed = request.grammar.masks_for(proposal.tokens)
        if allowed < len(proposal.tokens):
            proposal = proposal.cut(allowed)
            masks = masks[: allowed + 1]
        return proposal, masks.to(self.target.device)

    def _draft_ahead(self, plan: Plan) -> None:
        """Draft the first round of the requests that want it while their prompts prefill, so that
        the drafts reach their clients before the verifier has read the whole prompt. The first
        round scores these drafts: the context they continue does not change during prefill, and
        no other random draw of the request comes between, so the output is what it would be."""
        # A draft head cannot draft before the verifier has read the prompt: it reads its features.
        ahead = [
            r for r, _ in plan.chunks
            if r.draft_ahead and r.early is None and r.proposer is not None and not reads_features(r)
        ]  # fmt: skip
        if not ahead:
            return
        proposals, _ = self.drafting.propose(ahead, self.choose_depths(ahead))
        for request in ahead:
            request.early = proposals[request]
        if self.on_proposed is not None:
            self.on_proposed({r: p for r, p in proposals.items() if p.tokens})

    # -- depths ------------------------------------------------------------------------------------

    def depth_limit(self, request: Request) -> int:
        """The most drafts this request may take this round, before goodput is weighed."""
        speculation = request.speculation
        if request.remote is not None:  # as many as the client sent, within the budget
            pending = request.remote.pending
            return max(0, min(len(pending.tokens) if pending is not None else 0, request.remaining - 1))
        if request.proposer is None or request.consecutive_failures >= speculation.max_proposer_failures:
            return 0
        if self.drafting.busy(request):  # a plug-in's previous call has not returned
            return 0
        limit = speculation.max_depth if speculation.depth == "auto" else int(speculation.depth)
        limit = min(limit, request.remaining - 1)  # a round emits up to depth + 1 tokens
        if request.depth_limit is not None:
            limit = min(limit, request.depth_limit())
        return max(0, limit)

    def choose_depths(self, requests: list[Request]) -> dict[Request, int]:
        """Each request's depth this round (`_depths`), or, where its grammar forces the next tokens,
        as many of those as it may take: they are proposed for free (jump-forward) and the verifier
        keeps all of them, one pass for several tokens. A request at depth 0 (verifier only) and an
        edge client's session jump nowhere."""
        depths = self._depths(requests)
        for request in requests:
            request.forced = []
            if request.grammar is None or request.remote is not None or request.speculation.depth == 0:
                continue
            cap = min(JUMP_FORWARD_MAX, request.remaining - 1, self.batch.max_pass_tokens - 1)
            if request.depth_limit is not None:
                cap = min(cap, max(request.depth_limit(), 1))
            try:
                request.forced = request.grammar.forced()[: max(cap, 0)]
            except UserError:  # the matcher failed for good: the round's masks fail too and end it (`step`)
                continue
            if request.forced:
                depths[request] = len(request.forced)
        for request in requests:
            request.repeat = self._repeat(request, depths[request])
            if request.repeat is not None:
                depths[request] = len(request.repeat.tokens)
        return depths

    def _repeat(self, request: Request, depth: int) -> Proposal | None:
        """This round's drafts from the text's own repeat (`repeats.py`), where its context repeats
        itself and it speculates at all; None where its proposer drafts as ever. A round its grammar
        forces, an edge client's and one its proposer may not draft for (the server's breaker, a
        plug-in's call in flight) take none."""
        speculation = request.speculation
        if request.forced or request.remote is not None or not speculation.repeat_match:
            return None
        if depth == 0 and self.depth_limit(request) == 0:  # depth auto's 0 still takes a free repeat
            return None
        most = min(speculation.repeat_depth, request.remaining - 1, self.batch.max_pass_tokens - 1)
        drafts = repeat_drafts(request.tokens, speculation.repeat_match, most)
        return Proposal(drafts) if drafts else None

    def _depths(self, requests: list[Request]) -> dict[Request, int]:
        """Fixed depths as configured; depth auto by the batch's goodput (`goodput.py`). A request
        sampled by the rejection rule draws its randomness round by round, so its depth follows its
        own acceptance and the single-stream costs only, so that what else shares its batch never
        changes its draws; a seeded one's, the start-up costs (not the live ones), so that its seed
        reproduces its output in this process. Greedy and coupled requests emit the same tokens at
        any depth, so theirs follow the batch's live costs."""
        limits = {r: self.depth_limit(r) for r in requests}
        depths = {r: limits[r] for r in requests if r.speculation.depth != "auto" or r.remote is not None}
        auto = [r for r in requests if r not in depths]
        if not auto or all(limits[r] == 0 for r in auto):
            return depths | {r: 0 for r in auto}
        costs = self.costs()
        # Requests whose output no depth changes share the pass's price where one pass computes them
        # all; where the runner runs sequences one after another, each is priced alone.
        shared = [r for r in auto if r.draws_by_position] if self.runner.batches else []
        for request in auto:
            if request not in shared:
                fixed = request.params.seed is not None and not request.draws_by_position
                depths |= self._goodput([request], limits, self.costs(live=False) if fixed else costs)
        beside = sum(1 + k for k in depths.values())
        return depths | self._goodput(shared, limits, costs, beside)

    def _takes_trees(self, request: Request) -> bool:
        """Whether a round of this request may verify a token tree: a runner with tree attention,
        and nothing that reads the drafts as a chain (logits processing, a grammar's masks, an
        inspection of the drafts, an edge client's drafts)."""
        return (
            getattr(self.runner, "trees", False) and request.processing is None and request.grammar is None
            and not request.inspect and request.remote is None
        )  # fmt: skip

    def _room_for_tree(self, request: Request, proposal: Proposal) -> bool:
        """Whether this round may verify the proposal's tree: it takes trees, and its blocks
        hold a slot for every node (the plan reserved the chain's; never preempts for more)."""
        if not self._takes_trees(request):
            return False
        try:
            request.table.reserve(request.table.computed + 1 + len(proposal.nodes))
        except OutOfBlocks:
            return False
        return True

    def _widths(self, requests: list[Request], depths: dict[Request, int]) -> dict[Request, int]:
        """Candidates per draft position for each round (`trees.choose_widths`): above 1, a tree."""
        wanted = {r: r.speculation.tree_width for r in requests if depths.get(r, 0) > 0 and self._takes_trees(r)}
        wanted = {r: w for r, w in wanted.items() if w != 1}
        if not wanted:
            return {}
        base_rows = sum(1 + depths[r] for r in requests)
        return choose_widths(wanted, depths, self.costs(), base_rows)

    def remote_hint(self, request: Request) -> int:
        """The depth that pays best for the verifier, by the session's acceptance so far and the
        measured pass costs, as for a proposer of the server's own (drafting is the client's, so it
        costs the server nothing). An edge client may follow it to spend the least verifier time per
        token; its own round trips may argue for deeper drafts."""
        cap = min(self.batch.max_pass_tokens - 1, max(0, request.remaining - 1), 16)
        chosen = choose_depths([request.acceptance.alpha], [cap], self.costs(), [DraftCost()])
        return chosen[0]

    def _goodput(self, requests, limits, costs: PassCosts, base_rows: int = 0) -> dict[Request, int]:
        if not requests:
            return {}
        alphas = [r.acceptance.alpha for r in requests]
        caps = [limits[r] for r in requests]
        drafts = [self._draft_cost(r.proposer, costs) for r in requests]
        chosen = choose_depths(alphas, caps, costs, drafts, base_rows)
        # A request at depth 0 probes with one draft every 8 rounds, so that text turning
        # predictable gets speculation back.
        return {
            r: (1 if k == 0 and caps[i] > 0 and r.acceptance.rounds_off % 8 == 7 else k)
            for i, (r, k) in enumerate(zip(requests, chosen, strict=True))
        }

    def _draft_cost(self, proposer: Proposer | None, costs: PassCosts) -> DraftCost:
        """What this proposer's drafts cost: a batched drafter's passes (a draft model's or a
        head's) as the live passes have them; any other proposer's per token, as measured on its
        first use (`calibrate.py`)."""
        if proposer is None:
            return DraftCost()
        if self.drafting.batch(proposer) is not None:
            return costs.draft
        if id(proposer) not in self._draft_s:
            speculation = self.speculation
            self._draft_s[id(proposer)] = measure_draft_cost(
                proposer, self.target.vocab_size, speculation.max_depth, budget_s=20 * speculation.proposer_timeout_s
            )
        return DraftCost(self._draft_s[id(proposer)], self._draft_s[id(proposer)])

    def prepare(self, proposers: Sequence[Proposer | None] = ()) -> None:
        """Measure now, not during the first requests, what depth auto and prompt chunks need: the
        pass costs, and each proposer's draft cost (batched draft models get their caches now)."""
        for proposer in proposers:
            self.check_runner(proposer)
            self.drafting.batch(proposer)
            if hasattr(proposer, "learn") and proposer not in self.learners:
                self.learners.append(proposer)
        costs = self.costs()
        for proposer in proposers:
            self._draft_cost(proposer, costs)

    def check_runner(self, proposer: Proposer | None) -> None:
        """Refuse a proposer that reads the verifier's features (a draft head) where the runner
        gives none (a backend that cannot batch, or --scheduler interleaved)."""
        if getattr(proposer, "head_model", None) is not None and not getattr(self.runner, "features", False):
            raise UserError(
                f"the proposer {proposer.name} reads the verifier's hidden states, which only the batched "
                "scheduler gives: use --scheduler batched (or auto) on the lean backend"
            )

    # -- admission and preemption (`planner.py` decides when) ---------------------------------------

    def admit(self, request: Request) -> bool:
        """Start a waiting request if the cache has blocks for its prefix and prompt: it takes
        them and runs from the next pass. False, and nothing taken, if not."""
        fresh = not request.table.blocks  # a resumed session keeps the blocks it has
        reused = request.table.reuse_prefix(self._cacheable(request)) if fresh else 0
        if reused and reads_features(request):
            self.drafting.restore(request, reused)
        pool = self.runner.pool
        need = pool.blocks_for(len(request.tokens) + 1) - len(request.table.blocks)
        # Keep a block per active request spare for its next rounds.
        if need + self.active > pool.free_blocks and self.running:
            if fresh:
                request.table.free()
            return False
        if request.preemptions == 0 and fresh:
            request.stats.cached_tokens = reused
        if request.admitted is None:
            request.admitted = time.monotonic()
        self._admitted += 1
        request.order = self._admitted
        self.waiting.remove(request)
        self.running.append(request)
        return True

    def _cacheable(self, request: Request) -> list[int]:
        """The tokens whose prefix the prefix cache may supply (`prompt_logprobs.cacheable`); for a
        draft head's request, only as far as it has the verifier's features, in its session or
        kept beside the cached blocks (`Drafting.recall`): cached blocks keep keys and values, and
        the head reads a feature at every position."""
        tokens = cacheable(request)
        if reads_features(request):
            tokens = tokens[: self.drafting.recall(request, tokens) + 1]
        return tokens

    def resume(self, request: Request) -> None:
        """A parked request's drafts came: it waits for a running slot like any request (keeping
        its blocks, while memory allows), behind those already waiting."""
        if request in self.running:
            self.running.remove(request)
            self.waiting.append(request)

    def preempt(self, request: Request) -> None:
        """Out of blocks: free this running request's blocks and queue it first, to recompute later."""
        log.info("request %s preempted: the KV cache is full; it resumes once blocks free", request.id)
        self.running.remove(request)
        self._release(request)
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.insert(0, request)

    def _release(self, request: Request) -> None:
        request.table.free()
        self.drafting.release(request)

    def close(self) -> None:
        self.drafting.close()


__all__ = ["Engine", "Request"]


def reads_features(request: Request) -> bool:
    """Whether the request's proposer reads the verifier's features (a draft head does)."""
    return getattr(request.proposer, "head_model", None) is not None


def _masked(logits: torch.Tensor, masks: torch.Tensor, stop_ids: frozenset[int]) -> torch.Tensor:
    """Logits with every token the grammar forbids at -inf. A row left with no token at all is one
    where the grammar allows nothing but its end and a token floor (`min_tokens`) holds the stop
    tokens back: the output ends there all the same, on the stop tokens the grammar allows (the
    matcher allows all of the request's stop tokens exactly where the output may end, and never
    leaves a row empty, `Matcher.masks_for`)."""
    out = logits.float().masked_fill(~masks, float("-inf"))
    dead = torch.isneginf(out).all(dim=-1).nonzero()[:, 0]
    if len(dead) and stop_ids:
        rows, stops = dead[:, None], torch.tensor(sorted(stop_ids), device=out.device)
        out[rows, stops] = torch.zeros((), device=out.device).masked_fill(~masks[rows, stops], float("-inf"))
    return out
