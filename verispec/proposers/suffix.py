"""A suffix cache: a proposer without a model over what earlier requests said.

Prompt lookup (`ngram.py`) finds the context's last tokens earlier in the same context. This
proposer finds them in a pool of earlier requests' prompts and verified outputs as well, its own
request's included: the same file edited in turn, a batch of similar prompts, an agent repeating
its tool calls, each request drafts what an earlier one went on to say. Its proposals are point
masses, so acceptance keeps the output exact whatever the pool holds.

The pool is bounded: it keeps the most recent sequences up to `suffix_cache_tokens` tokens and
forgets the oldest first. Each request adds its tokens as they are verified (a session sees its
request's prompt and verified tokens at every round, never drafts). The index chains every
position to the previous one that ended with the same last `ngram_min` tokens; a lookup takes,
among the latest `CANDIDATES` positions with the context's last tokens, the one whose match with
the context runs longest backwards (up to `MATCH_LIMIT` tokens, the most recent on ties), and
proposes the tokens that followed it.

Tenants are kept apart: a request's session reads and writes the pool of its API key
(`Request.share_key`), because what one tenant's drafts would reveal through acceptance timing is
another tenant's text. `suffix_shared` pools every key's requests, an operator's choice.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from verispec.proposers.base import DraftPolicy, Proposal

if TYPE_CHECKING:
    from verispec.proposers import ProposerInputs

MATCH_LIMIT = 64  # how far back a candidate's match with the context is followed
CANDIDATES = 8  # latest positions of a key a lookup compares
SHARED = ""  # the pool every request shares when pools are shared, and requests without a key use


def build(inputs: ProposerInputs) -> SuffixProposer:
    """The "suffix" proposer's builder (its row in `verispec/proposers/names.py` names it)."""
    speculation = inputs.speculation
    return SuffixProposer(
        speculation.suffix_cache_tokens, speculation.ngram_min, shared=speculation.suffix_shared
    )


class SuffixPool:
    """The sequences of one tenant, most recently extended last, at most `capacity` tokens in all,
    and an index of their positions by their last `key_length` tokens: `head` maps a key to its
    latest position, and each position links to the previous one with the same key (a hash chain,
    as LZ77 compressors keep), so an index costs a dictionary entry per distinct key and 8 bytes a
    token. A position is packed in one integer: sequence id << 32 | end (the index just past it)."""

    def __init__(self, capacity: int, key_length: int):
        self.capacity, self.key_length = capacity, key_length
        self.sequences: OrderedDict[int, tuple[array, array]] = OrderedDict()  # id -> (tokens, previous)
        self.head: dict[int, int] = {}  # key -> latest position
        self.tokens = 0
        self._next_id = 0

    def _key(self, tokens: Sequence[int], end: int) -> int:
        return self._keys(tokens, end, end)[0]

    def _keys(self, tokens: Sequence[int], first: int, last: int) -> list[int]:
        """The keys of the positions ending at first..last (each >= key_length)."""
        k = self.key_length
        if k == 1:
            return list(tokens[first - 1 : last])
        if k == 2:  # token ids are below 2^31
            return [
                a << 32 | b
                for a, b in zip(tokens[first - 2 : last - 1], tokens[first - 1 : last], strict=True)
            ]
        return [
            hash(tuple(tokens[end - k : end])) for end in range(first, last + 1)
        ]  # lookups compare tokens

    def open(self) -> int:
        """A new, empty sequence; its id."""
        self._next_id += 1
        self.sequences[self._next_id] = (array("q"), array("q"))
        return self._next_id

    def extend(self, sequence: int, tokens: Sequence[int]) -> None:
        """Append verified tokens to a sequence (dropped if the pool has already forgotten it)."""
        entry = self.sequences.get(sequence)
        if entry is None or not tokens:
            return
        stored, previous = entry
        start, head, base = len(stored), self.head, sequence << 32
        stored.extend(tokens)
        first = max(start + 1, self.key_length)  # the first position with a whole key
        previous.extend([-1] * (first - start - 1))
        for end, key in enumerate(self._keys(stored, first, len(stored)), first):
            previous.append(head.get(key, -1))
            head[key] = base | end
        self.tokens += len(tokens)
        self.sequences.move_to_end(sequence)
        while self.tokens > self.capacity and len(self.sequences) > 1:
            self._forget(next(iter(self.sequences)))
        if self.tokens > self.capacity:  # one sequence longer than the pool: keep its end
            self._trim(sequence)

    def _forget(self, sequence: int) -> None:
        stored, previous = self.sequences.pop(sequence)
        self.tokens -= len(stored)
        first = self.key_length
        for key in self._keys(stored, first, len(stored)) if len(stored) >= first else []:
            position = self.head.get(key, -1)
            if position >> 32 != sequence:
                continue  # a later sequence holds the key's latest position
            while position >= 0 and (position >> 32 == sequence or position >> 32 not in self.sequences):
                position = self._previous(position, previous, sequence)
            if position >= 0:
                self.head[key] = position
            else:
                del self.head[key]

    def _previous(self, position: int, previous: array, forgotten: int) -> int:
        """The position before `position` in its key's chain (-1: none, or lost with its sequence)."""
        sequence, end = position >> 32, position & 0xFFFFFFFF
        links = previous if sequence == forgotten else self.sequences.get(sequence, (None, None))[1]
        return -1 if links is None or end > len(links) else links[end - 1]

    def _trim(self, sequence: int) -> None:
        """Keep the last half of the pool's capacity of an over-long sequence, as a new sequence."""
        stored, _ = self.sequences[sequence]
        tail = stored[len(stored) - self.capacity // 2 :]
        self._forget(sequence)
        self.sequences[sequence] = (array("q"), array("q"))
        self.extend(sequence, tail)

    def lookup(self, context: Sequence[int], depth: int) -> list[int]:
        """Up to `depth` tokens that followed the position, among the latest CANDIDATES with the
        context's key, whose match with the context's end runs longest backwards (at least the key's
        length; the latest on ties). The context's own end, last in its own sequence, has none."""
        k = self.key_length
        if depth <= 0 or len(context) < k:
            return []
        position = self.head.get(self._key(context, len(context)), -1)
        best, best_length = None, k - 1
        for _ in range(CANDIDATES):
            if position < 0:
                break
            entry = self.sequences.get(position >> 32)
            if entry is None:
                break  # lost with a forgotten sequence, and the chain with it
            stored, previous = entry
            end = position & 0xFFFFFFFF
            if end > len(stored):
                break  # a link into the sequence as it was before it was trimmed
            if end < len(stored):  # something followed it
                length, limit = 0, min(MATCH_LIMIT, end, len(context))
                while length < limit and stored[end - length - 1] == context[-length - 1]:
                    length += 1
                if length > best_length:
                    best, best_length = (stored, end), length
            position = previous[end - 1]
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

    def learn(self, tokens: Sequence[int], share_key: str = SHARED, session: object = None) -> None:
        """A finished request's prompt and output (the engine calls this for every request): the
        tokens its session of this proposer has not added yet, or all of them as a new sequence."""
        if isinstance(session, SuffixSession) and session.proposer is self:
            with self.lock:
                session.add(tokens)
            return
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
            self.add(context)
            return Proposal(self.pool.lookup(context, depth))

    def add(self, context: Sequence[int]) -> None:
        """Put the context's tokens not yet in the pool there (under the proposer's lock)."""
        if not self.sequence or len(context) < self.seen:  # first round, or a context that shrank
            self.sequence, self.seen = self.pool.open(), 0
        self.pool.extend(self.sequence, context[self.seen :])
        self.seen = len(context)

    def reset(self) -> None:
        self.sequence, self.seen = 0, 0
