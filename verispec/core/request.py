"""One request as the engine keeps it between passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from verispec.config import SamplingParams, SpeculationSettings
from verispec.core.goodput import Acceptance
from verispec.core.kv_cache import BlockTable
from verispec.core.processing import Processing
from verispec.core.sampling import PositionNoise
from verispec.proposers.base import DraftPolicy, Proposal, Proposer
from verispec.stats import RequestStats
from verispec.text import TextStream

if TYPE_CHECKING:
    from verispec.core.grammar import Matcher
    from verispec.core.rounds import TokenLogprob
    from verispec.proposers.remote import RemoteDrafts


@dataclass(eq=False)
class Request:
    """A request's verified tokens, its place in the verifier's cache (a block table: its KV holds
    every verified position but the last, whose logits the next round needs), and its proposer's
    state. Waiting, running, parked (a verify-API session waiting for its client's drafts) or
    preempted (back in the waiting line, its blocks given up, to be recomputed)."""

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
    # Where a draft head is loaded but this request's proposer is not it: per head batch (by id),
    # the verifier's features of its positions, kept beside its cached blocks (`Drafting.keep`).
    feature_logs: dict = field(default_factory=dict)
    consecutive_failures: int = 0
    preemptions: int = 0
    arrived: float = field(default_factory=time.perf_counter)
    order: int = 0  # admission order: the newest is preempted first
    share_key: str = ""  # whose share of the running slots it takes (the server's API key)
    admitted: float | None = None  # time.monotonic() of its first admission
    stop_ids: frozenset[int] = frozenset()  # tokens that end it: EOS (unless ignored) and its stop_token_ids
    processing: Processing | None = None  # penalties, bias, a token floor (`processing.py`), where asked for
    grammar: Matcher | None = None  # what its output must be (`grammar.py`), where it asked for a format
    forced: list[int] = field(default_factory=list)  # this round's drafts: the tokens its grammar forces
    repeat: Proposal | None = None  # this round's drafts: the text's own repeat (`repeats.py`), in place of its proposer's
    # Where asked for: its prompt's positions 1.. scored so far (`prompt_logprobs.py`), all of them by its first Delta.
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def noise(self) -> PositionNoise | None:
        """A coupled sampled request's per-position draws (its drafts are drawn with them too)."""
        return self.draft_policy.noise

    @property
    def draws_by_position(self) -> bool:
        """Whether its output is fixed whatever the depth (greedy, or coupled sampling): its depth may
        then follow the batch's live costs without changing what it emits."""
        return self.params.greedy or self.noise is not None

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
