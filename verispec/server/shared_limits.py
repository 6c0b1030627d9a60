"""Per-key rate limits shared by every replica, kept in Redis.

`RedisRateLimiter` has the in-process `RateLimiter`'s interface and its token-bucket maths, and
decides through the same `auth.decide`. One Lua script refills, checks and takes both of a key's
buckets in a single call, so replicas checking one key at the same moment never admit more than its
limit between them; it reads the time from the Redis server, so the replicas' clocks need not agree.

Failures: at start, a bad URL or an unreachable Redis is a `UserError` (fail fast). While serving, a
Redis error lets the request through (fail open): the limits protect capacity, and refusing every
request while Redis is away would be an outage of its own. Each such check calls `on_error` (the
server counts them in `verispec:rate_limit_errors_total`); the log gets one warning per 30 s.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError
from redis.retry import Retry

from verispec.config import ServerSettings
from verispec.errors import UserError
from verispec.server.auth import BucketLevel, RateDecision, RateLimiter, decide

log = logging.getLogger("verispec.server")

WARN_EVERY_S = 30.0
EXPIRY_SLACK_MS = 120_000  # a bucket's key outlives the moment it is full again by this much

# KEYS[i]: one bucket, a hash of its level and when it was last refilled (microseconds, Redis time).
# ARGV[2i-1], ARGV[2i]: that bucket's capacity (its per-minute limit) and what this request takes;
# ARGV[#ARGV]: the expiry slack in ms. The refill is `TokenBucket.refill`'s, the take all or nothing
# as in `auth.decide`. Returns each bucket's level before the take, as a string: Redis would
# truncate a Lua number to an integer.
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local levels, taken = {}, 1
for i, key in ipairs(KEYS) do
  local capacity, amount = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', key, 'level', 'updated')
  local level, updated = tonumber(state[1]) or capacity, tonumber(state[2]) or now
  level = math.min(capacity, level + math.max(0, now - updated) / 1e6 * capacity / 60)
  levels[i] = level
  if amount > level then taken = 0 end
end
local reply = {}
for i, key in ipairs(KEYS) do
  local capacity, amount = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local left = levels[i] - taken * amount
  redis.call('HSET', key, 'level', string.format('%.17g', left), 'updated', string.format('%.17g', now))
  redis.call('PEXPIRE', key, math.ceil((capacity - left) * 60000 / capacity) + tonumber(ARGV[#ARGV]))
  reply[i] = string.format('%.17g', levels[i])
end
return reply
"""


def _without_password(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//", url)


class RedisRateLimiter:
    """Per-key token buckets for requests and tokens per minute (0 = unlimited), in Redis: one limit
    per key across every replica that uses the same Redis database."""

    def __init__(
        self, url: str, requests_per_minute: int, tokens_per_minute: int,
        on_error: Callable[[], None] = lambda: None, prefix: str = "verispec:ratelimit", timeout_s: float = 0.5,
    ):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.on_error, self.prefix = on_error, prefix
        self.where = _without_password(url)
        # A lost connection (Redis restarted) is retried once at once; a timeout is not, since the
        # script may have run. Past that the check fails open, so it must fail quickly.
        options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        try:
            self._client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1, (ConnectionError,)), **options)
            self._aclient = redis.asyncio.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 1, (ConnectionError,)), **options)
        except ValueError as exc:
            raise UserError(f"--redis-url {self.where}: {exc}; give redis://HOST:PORT/DB") from None
        self._take = self._client.register_script(_TAKE)
        self._atake = self._aclient.register_script(_TAKE)
        self._warned_at = -WARN_EVERY_S
        self._unwarned = 0

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def connect(self) -> None:
        """Fail fast: load the script, which shows Redis answers and lets this client run it."""
        try:
            self._client.script_load(_TAKE)
        except RedisError as exc:
            raise UserError(
                f"cannot use Redis at {self.where} for rate limits ({exc}); start Redis there, correct --redis-url, "
                "or leave --redis-url out for per-replica limits"
            ) from None

    def check(self, key_id: str, tokens: int) -> RateDecision:
        """Take one request and `tokens` tokens from the key's buckets, or neither."""
        buckets, keys, args = self._script_args(key_id, tokens)
        try:
            reply = self._take(keys, args)
        except RedisError as exc:
            return self._fail_open(exc)
        return self._decision(buckets, reply)

    async def acheck(self, key_id: str, tokens: int) -> RateDecision:
        """`check` without blocking the event loop on the round trip."""
        buckets, keys, args = self._script_args(key_id, tokens)
        try:
            reply = await self._atake(keys, args)
        except RedisError as exc:
            return self._fail_open(exc)
        return self._decision(buckets, reply)

    def _script_args(self, key_id: str, tokens: int) -> tuple[list[tuple[str, int, int]], list[str], list[int]]:
        buckets = [(kind, capacity, amount) for kind, capacity, amount in (("requests", self.rpm, 1), ("tokens", self.tpm, tokens)) if capacity]
        # The braces are a Redis Cluster hash tag: a key's buckets share a slot, so one script may take both.
        keys = [f"{self.prefix}:{{{key_id}}}:{kind}" for kind, _, _ in buckets]
        args = [n for _, capacity, amount in buckets for n in (capacity, amount)] + [EXPIRY_SLACK_MS]
        return buckets, keys, args

    @staticmethod
    def _decision(buckets: list[tuple[str, int, int]], levels: list[bytes]) -> RateDecision:
        return decide([BucketLevel(*bucket, float(level)) for bucket, level in zip(buckets, levels, strict=True)])

    def _fail_open(self, exc: Exception) -> RateDecision:
        self.on_error()
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY_S:
            self._unwarned += 1
        else:
            more = f" ({self._unwarned} more since the last warning)" if self._unwarned else ""
            log.warning("rate limits: Redis at %s failed (%s); letting requests through until it answers%s", self.where, exc, more)
            self._warned_at, self._unwarned = now, 0
        return RateDecision(True, 0.0, {})


def limiter_from_settings(server: ServerSettings, on_error: Callable[[], None]) -> RateLimiter | RedisRateLimiter:
    """Limits shared through Redis with --redis-url, else this process's own; `on_error` is called
    for each check that Redis failed (and that was let through)."""
    if server.redis_url is None:
        return RateLimiter(server.rate_limit_rpm, server.rate_limit_tpm)
    limiter = RedisRateLimiter(server.redis_url, server.rate_limit_rpm, server.rate_limit_tpm, on_error)
    limiter.connect()
    return limiter
