"""API keys and per-key rate limits.

Keys are compared in constant time: each presented key is hashed and compared with
`hmac.compare_digest` against every configured key's hash, so neither the position of a match nor
the length of a key shows in the response time. A key is known by its ID (given as 'ID:KEY', else
derived from the key's hash), which is what metrics, logs and rate limits use; the key itself is
never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from verispec.config import ServerSettings
from verispec.errors import UserError
from verispec.server.errors import APIError


@dataclass(frozen=True)
class ApiKey:
    id: str
    digest: bytes  # sha256 of the key


def _parse_key(entry: str) -> ApiKey:
    key_id, sep, secret = entry.partition(":")
    if not sep:
        key_id, secret = "", entry
    digest = hashlib.sha256(secret.encode()).digest()
    return ApiKey(key_id or "key-" + digest.hex()[:8], digest)


class KeyRing:
    """The configured API keys; empty means the server is open."""

    def __init__(self, keys: list[ApiKey]):
        self.keys = keys

    @classmethod
    def from_settings(cls, server: ServerSettings) -> KeyRing:
        entries = []
        if server.api_keys is not None:
            entries += server.api_keys.get_secret_value().split(",")
        if server.api_keys_file is not None:
            path = Path(server.api_keys_file)
            if not path.is_file():
                raise UserError(f"--api-keys-file {path} does not exist")
            entries += [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        keys = [_parse_key(entry.strip()) for entry in entries if entry.strip()]
        ids = [k.id for k in keys]
        if len(set(ids)) != len(ids):
            raise UserError("two API keys share an ID; give each 'ID:KEY' entry its own ID")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, presented: str | None) -> str | None:
        """The ID of the key presented, or None when it matches none."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key in self.keys:  # no early exit: every key is compared
            if hmac.compare_digest(digest, key.digest):
                found = key.id
        return found


@dataclass
class TokenBucket:
    """`capacity` tokens, refilled continuously over one minute (the in-process limiter's state)."""

    capacity: float
    level: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
        self.updated = now


@dataclass(frozen=True)
class BucketLevel:
    """One of a key's buckets at a check: refilled, before this request takes anything."""

    kind: str  # 'requests' or 'tokens', as in the x-ratelimit-*-{kind} headers
    capacity: int  # the per-minute limit; refilled at capacity / 60 per second
    amount: int  # what this request takes
    level: float

    def wait(self) -> float:
        """Seconds until `amount` is available (inf if it exceeds the capacity)."""
        if self.amount > self.capacity:
            return math.inf
        return max(0.0, (self.amount - self.level) * 60.0 / self.capacity)


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_s: float  # when not allowed
    headers: dict[str, str]  # OpenAI's x-ratelimit-* headers
    reason: str = ""


def _duration(seconds: float) -> str:
    """OpenAI's reset format: '1s', '6m0s', '250ms'."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def decide(buckets: list[BucketLevel]) -> RateDecision:
    """The request takes its amount from every bucket, or from none (the caller applies the take
    when the decision allows it); the headers show the levels after it. Both limiters decide here."""
    allowed = all(b.amount <= b.level for b in buckets)
    headers = {}
    for b in buckets:
        left = b.level - b.amount if allowed else b.level
        headers[f"x-ratelimit-limit-{b.kind}"] = str(b.capacity)
        headers[f"x-ratelimit-remaining-{b.kind}"] = str(max(0, int(left)))
        headers[f"x-ratelimit-reset-{b.kind}"] = _duration((b.capacity - left) * 60.0 / b.capacity)
    if allowed:
        return RateDecision(True, 0.0, headers)
    worst = max(buckets, key=BucketLevel.wait)
    wait = worst.wait()
    if math.isinf(wait):
        reason = f"this request needs {worst.amount} {worst.kind}, more than the key's limit of {worst.capacity} {worst.kind} per minute; lower max_tokens"
    else:
        reason = f"rate limit of {worst.capacity} {worst.kind} per minute reached for this API key; retry in {math.ceil(wait)}s"
    return RateDecision(False, wait, headers, reason)


class RateLimiter:
    """Per-key token buckets for requests per minute and tokens per minute (0 = unlimited), in this
    process: with several replicas each keeps its own (see `shared_limits.py` for shared ones)."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int, clock=time.monotonic):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def check(self, key_id: str, tokens: int) -> RateDecision:
        """Take one request and `tokens` tokens from the key's buckets, or neither."""
        now = self.clock()
        with self._lock:
            taking = []
            for kind, capacity, amount in (("requests", self.rpm, 1), ("tokens", self.tpm, tokens)):
                if capacity:
                    bucket = self._buckets.setdefault((key_id, kind), TokenBucket(capacity, updated=now))
                    bucket.refill(now)
                    taking.append((bucket, BucketLevel(kind, capacity, amount, bucket.level)))
            decision = decide([level for _, level in taking])
            if decision.allowed:
                for bucket, level in taking:
                    bucket.level -= level.amount
        return decision

    async def acheck(self, key_id: str, tokens: int) -> RateDecision:
        """`check` for the event loop: in process it never waits."""
        return self.check(key_id, tokens)


def bearer_auth(keys: KeyRing):
    """The routes' dependency: the caller's API key ID from 'Authorization: Bearer KEY' ('anonymous'
    when the server has no keys), or a 401."""
    async def authorize(request: Request) -> str:
        if not keys.enabled:
            request.state.key_id = "anonymous"
            return "anonymous"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        key_id = keys.identify(token.strip())
        if key_id is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        request.state.key_id = key_id
        return key_id

    return authorize
