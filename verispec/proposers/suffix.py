"""A suffix cache: a proposer without a model over what earlier requests said.

Prompt lookup (`ngram.py`) finds the context's last tokens earlier in the same context. This
proposer finds them in a pool of earlier requests' prompts and verified outputs as well, its own
request's included: the same file edited in turn, a batch of similar prompts, an agent repeating
its tool calls, each request drafts what an earlier one went on to say. Its proposals are point
masses, so acceptance keeps the output exact whatever the pool holds.

The pool is bounded: it keeps the most recent sequences up to `suffix_cache_tokens` tokens and
forgets the oldest first. Each request adds its tokens as they are verified (a session sees its
request's prompt and verified tokens at every round, never drafts). The index maps the last
`ngram_min` tokens at every position to the latest few positions they ended at; a lookup takes the
candidate whose match with the context runs longest backwards (up to `MATCH_LIMIT` tokens, the
most recent on ties), at least `ngram_min` tokens, and proposes the tokens that followed it.

Tenants are kept apart: a request's session reads and writes the pool of its API key
(`Request.share_key`), because what one tenant's drafts would reveal through acceptance timing is
another tenant's text. `suffix_shared` pools every key's requests, an operator's choice.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from verispec.proposers.base import DraftPolicy, Proposal

if TYPE_CHECKING:
    from verispec.proposers import ProposerInputs

MATCH_LIMIT = 64  # how far back a candidate's match with the context is followed
CANDIDATES = 8  # latest positions kept per key
SHARED = ""  # the pool every request shares when pools are shared, and requests without a key use


def build(inputs: ProposerInputs) -> SuffixProposer:
    """The "suffix" proposer's builder (its row in `verispec/proposers/names.py` names it)."""
    speculation = inputs.speculation
    return SuffixProposer(
        speculation.suffix_cache_tokens, speculation.ngram_min, shared=speculation.suffix_shared
    )


class SuffixPool:
    """The sequences of one tenant, most recent last, at most `capacity` tokens in all, and the
    index of their positions by their last `key_length` tokens."""

    def __init__(self, capacity: int, key_length: int):
        self.capacity, self.key_length = capacity, key_length
        self.sequences: OrderedDict[int, array] = OrderedDict()  # by id, oldest first
        self.index: dict[tuple[int, ...], deque[tuple[int, int]]] = {}  # key -> latest (sequence, end)
        self.tokens = 0
        self._next_id = 0

    def open(self) -> int:
        """A new, empty sequence; its id."""
        self._next_id += 1
        self.sequences[self._next_id] = array("l")
        return self._next_id

    def extend(self, sequence: int, tokens: Sequence[int]) -> None:
        """Append verified tokens to a sequence (dropped if the pool has already forgotten it)."""
        stored = self.sequences.get(sequence)
        if stored is None or not tokens:
            return
        k, start = self.key_length, len(stored)
        stored.extend(tokens)
        for end in range(max(start + 1, k), len(stored) + 1):  # every position a key now ends at
            positions = self.index.get(key := tuple(stored[end - k : end]))
            if positions is None:
                positions = self.index[key] = deque(maxlen=CANDIDATES)
            positions.append((sequence, end))
        self.tokens += len(tokens)
        self.sequences.move_to_end(sequence)
        while self.tokens > self.capacity and len(self.sequences) > 1:
            self._forget(next(iter(self.sequences)))
        if self.tokens > self.capacity:  # one sequence longer than the pool: keep its end
            self._trim(sequence)

    def _forget(self, sequence: int) -> None:
        stored = self.sequences.pop(sequence)
        self.tokens -= len(stored)
        k = self.key_length
        for end in range(k, len(stored) + 1):
            key = tuple(stored[end - k : end])
            positions = self.index.get(key)
            if positions is None:
                continue
            kept = [p for p in positions if p[0] != sequence]
            if kept:
                positions.clear()
                positions.extend(kept)
            else:
                del self.index[key]

    def _trim(self, sequence: int) -> None:
        """Keep the last half of the pool's capacity of an over-long sequence, as a new sequence."""
        stored = self.sequences[sequence]
        tail = stored[len(stored) - self.capacity // 2 :]
        self._forget(sequence)
        self.sequences[sequence] = array("l")
        self.extend(sequence, tail)

    def lookup(self, context: Sequence[int], depth: int) -> list[int]:
        """Up to `depth` tokens that followed the candidate matching the context's end longest
        (at least the key's length). The context's own end, last in its own sequence, has none."""
        k = self.key_length
        if depth <= 0 or len(context) < k:
            return []
        positions = self.index.get(tuple(context[-k:]))
        if not positions:
            return []
        best, best_length = None, 0
        for sequence, end in reversed(positions):  # the most recent first: it wins ties
            stored = self.sequences.get(sequence)
            if stored is None or end >= len(stored):
                continue  # forgotten, or nothing after it
            length = k
            limit = min(MATCH_LIMIT, end, len(context))
            while length < limit and stored[end - length - 1] == context[-length - 1]:
                length += 1
            if length > best_length:
                best, best_length = (stored, end), length
        if best is None:
            return []
        stored, end = best
        return stored[end : end + depth].tolist()


class SuffixProposer:
    name = "suffix"
    inline = True  # microseconds of dictionary lookups: the batched engine calls it on its own thread
    draft_model = None
    per_key = True  # a session takes the request's API key (`core/drafting.py: open_session`)

    def __init__(self, capacity: int, key_length: int, shared: bool = False):
        if capacity < 1 or key_length < 1:
            raise ValueError(
                f"need a capacity and a key length of at least 1, got {capacity} and {key_length}"
            )
        self.capacity, self.key_length, self.shared = capacity, key_length, shared
        self.pools: dict[str, SuffixPool] = {}
        self.lock = threading.Lock()  # sessions may run on the engine's thread and on others (calibration)

    def pool(self, share_key: str = SHARED) -> SuffixPool:
        key = SHARED if self.shared else share_key
        with self.lock:
            pool = self.pools.get(key)
            if pool is None:
                pool = self.pools[key] = SuffixPool(self.capacity, self.key_length)
            return pool

    def session(self, share_key: str = SHARED) -> SuffixSession:
        """A request's session, reading and writing its tenant's pool."""
        return SuffixSession(self, self.pool(share_key))

    def learn(self, tokens: Sequence[int], share_key: str = SHARED) -> None:
        """Add a finished request that another proposer served (the engine calls this, `learners`)."""
        pool = self.pool(share_key)
        with self.lock:
            pool.extend(pool.open(), tokens)


class SuffixSession:
    """One request: its own sequence in the pool, extended by the tokens verified since the last
    round before each lookup."""

    def __init__(self, proposer: SuffixProposer, pool: SuffixPool):
        self.proposer, self.pool = proposer, pool
        self.sequence = 0
        self.seen = 0  # tokens of the context already in the pool

    def propose(self, context: Sequence[int], depth: int, policy: DraftPolicy | None = None) -> Proposal:
        with self.proposer.lock:
            if not self.sequence or len(context) < self.seen:  # first round, or a context that shrank
                self.sequence, self.seen = self.pool.open(), 0
            self.pool.extend(self.sequence, context[self.seen :])
            self.seen = len(context)
            return Proposal(self.pool.lookup(context, depth))

    def reset(self) -> None:
        self.sequence, self.seen = 0, 0
