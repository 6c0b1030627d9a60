"""The verify API's sessions: each open one bound to the API key that opened it, the recently
ended (so that a late round hears why: 410, not "unknown": 404), and the recent openings by their
Idempotency-Key (so that an opening sent again gets its session back, never a second one)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from verispec.server.errors import APIError
from verispec.server.job import Job
from verispec.server.logprobs import LogprobFormat
from verispec.server.reply import Reply
from verispec.server.underway import Underway

_TOMBSTONES = 4096  # ended sessions and openings remembered


@dataclass(eq=False)
class Session:
    id: str
    key_id: str
    underway: Underway
    reply: Reply
    position: int  # verified tokens: prompt + generated
    last_active: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rounds: int = 0
    bytes: int = 0
    client_prob_rounds: int = 0  # rounds accepted by distributions the client reported
    last: tuple[int, tuple[int, ...], dict] | None = None  # (position before, drafts, answer) of the last round
    logprobs: LogprobFormat | None = None  # where the opening asked for logprobs (text offsets run on over rounds)

    @property
    def job(self) -> Job:
        return self.underway.job


@dataclass
class Opening:
    """An opening sent with an Idempotency-Key: what identifies its body, and its answer once made."""

    body: str
    answered: asyncio.Future  # the opening round's answer (a dict), or None when the opening failed


class Sessions:
    """Open sessions by id, each bound to the API key that opened it, the recently ended, and the
    recent openings by idempotency key."""

    def __init__(self, idle_s: float, max_per_key: int):
        self.idle_s = idle_s
        self.max_per_key = max_per_key
        self.open: dict[str, Session] = {}
        self.ended: OrderedDict[str, tuple[str, str, tuple | None]] = OrderedDict()  # id -> (key_id, why, last round)
        self.openings: OrderedDict[tuple[str, str], Opening] = OrderedDict()  # (key_id, idempotency key) -> opening
        self.opening: Counter[str] = Counter()  # key_id -> openings under way, which count against its cap

    def held(self, key_id: str) -> int:
        """Sessions a key holds open or is opening."""
        return sum(s.key_id == key_id for s in self.open.values()) + self.opening[key_id]

    @contextmanager
    def claim(self, key_id: str) -> Iterator[None]:
        """A place under the key's cap for the session it is opening, until the opening ends (an
        open session counts itself); a 429 when the key holds all its places."""
        held = self.held(key_id)
        if held >= self.max_per_key:
            raise APIError(
                429, f"this API key holds {held} open verify sessions, the most this server allows (--verify-max-sessions "
                f"{self.max_per_key}); close one (\"close\": true) or let it finish", code="too_many_sessions",
            )
        self.opening[key_id] += 1
        try:
            yield
        finally:
            self.opening[key_id] -= 1
            if not self.opening[key_id]:
                del self.opening[key_id]

    def remember(self, key: tuple[str, str], opening: Opening) -> None:
        self.openings[key] = opening
        while len(self.openings) > _TOMBSTONES:
            self.openings.popitem(last=False)

    def replay(self, session_id: str, key_id: str, position: int | None, drafts: tuple[int, ...]) -> dict | None:
        """The answer to a round sent again, the last one of a session (open or just finished)."""
        session = self.open.get(session_id)
        if session is not None:
            key, last = session.key_id, session.last
        else:
            key, _, last = self.ended.get(session_id, (None, None, None))
        if key == key_id and last is not None and position == last[0] and drafts == last[1]:
            return last[2]
        return None

    def get(self, session_id: str, key_id: str) -> Session:
        session = self.open.get(session_id)
        if session is not None and session.key_id == key_id:
            return session
        key, why, _ = self.ended.get(session_id, (None, None, None))
        if key == key_id:  # only its own key hears that it existed
            code = "session_expired" if why == "expired" else "session_ended"
            raise APIError(410, f"session {session_id} has ended ({why}); open a new one with a prompt", code=code, param="session_id")
        raise APIError(404, f"no session {session_id} for this API key; open one with a prompt", code="session_not_found", param="session_id")

    def add(self, session: Session) -> None:
        self.open[session.id] = session

    def end(self, session: Session, why: str) -> bool:
        """Close a session; False if it had already ended."""
        if self.open.pop(session.id, None) is None:
            return False
        self.ended[session.id] = (session.key_id, why, session.last if why == "finished" else None)
        while len(self.ended) > _TOMBSTONES:
            self.ended.popitem(last=False)
        return True

    def idle(self) -> list[Session]:
        """Sessions past their idle time, with no round in flight."""
        cutoff = time.monotonic() - self.idle_s
        return [s for s in self.open.values() if s.last_active < cutoff and not s.lock.locked()]
