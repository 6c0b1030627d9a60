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

from verispec.config import ServerSettings
from verispec.errors import UserError


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
    """`capacity` tokens, refilled continuously over one minute."""

    capacity: float
    level: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` tokens are available (inf if it exceeds the capacity)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.rate


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


class RateLimiter:
    """Per-key token buckets for requests per minute and tokens per minute (0 = unlimited)."""

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
        limits = [("requests", self.rpm, 1), ("tokens", self.tpm, tokens)]
        with self._lock:
            buckets = []
            for kind, capacity, amount in limits:
                if not capacity:
                    continue
                bucket = self._buckets.setdefault((key_id, kind), TokenBucket(capacity, updated=now))
                bucket.refill(now)
                buckets.append((kind, bucket, amount))
            waits = {kind: bucket.wait_for(amount) for kind, bucket, amount in buckets}
            allowed = all(w == 0.0 for w in waits.values())
            if allowed:
                for _, bucket, amount in buckets:
                    bucket.level -= amount
            headers = {}
            for kind, bucket, _ in buckets:
                headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(bucket.level)))
                headers[f"x-ratelimit-reset-{kind}"] = _duration(bucket.until_full())
        if allowed:
            return RateDecision(True, 0.0, headers)
        kind, wait = max(waits.items(), key=lambda kv: kv[1])
        if math.isinf(wait):
            reason = f"this request needs {tokens} tokens, more than the key's limit of {self.tpm} tokens per minute; lower max_tokens"
        else:
            reason = f"rate limit of {int(dict((k, c) for k, c, _ in limits)[kind])} {kind} per minute reached for this API key; retry in {math.ceil(wait)}s"
        return RateDecision(False, wait, headers, reason)
