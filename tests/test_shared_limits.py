"""Rate limits shared by replicas through Redis: the real Redis on 127.0.0.1:6379.

Each test keeps its buckets under a key prefix (or API key ID) of its own and deletes them after,
so runs and other users of the same Redis never meet. The in-process limiter's behaviour is the
reference: the shared one must decide alike, only across processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import shutil
import subprocess
import uuid

import httpx
import pytest
import redis

from tests.serving import ServerProcess, free_port, metric, wait_for
from verispec.config import ServerSettings, load_settings
from verispec.errors import UserError
from verispec.server.app import create_app
from verispec.server.auth import RateLimiter
from verispec.server.shared_limits import RedisRateLimiter, limiter_from_settings

REDIS_URL = "redis://127.0.0.1:6379/0"
HTTP_DB = 3  # the HTTP tests' servers use their own database number (their key IDs are unique too)


@pytest.fixture(scope="module")
def client():
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"needs Redis on 127.0.0.1:6379 ({exc})")
    yield client
    client.close()


@pytest.fixture
def prefix(client):
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"verispec-test:{uuid.uuid4().hex}:ratelimit"
    yield prefix
    for key in client.scan_iter(match=prefix + ":*"):
        client.delete(key)


def replica(prefix: str, rpm: int = 0, tpm: int = 0, on_error=lambda: None, url: str = REDIS_URL) -> RedisRateLimiter:
    return RedisRateLimiter(url, rpm, tpm, on_error=on_error, prefix=prefix)


def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


# -- one limit across replicas ----------------------------------------------------------------------


def test_two_replicas_share_one_keys_limit(prefix):
    first, second = replica(prefix, rpm=5), replica(prefix, rpm=5)
    decisions = [(first, second)[i % 2].check("alice", 10) for i in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.headers["x-ratelimit-remaining-requests"] for d in decisions] == ["4", "3", "2", "1", "0", "0"]
    refused = decisions[-1]
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert 11.0 < refused.retry_after_s <= 12.0  # one request refills in 60 / 5 s
    assert refused.reason == "rate limit of 5 requests per minute reached for this API key; retry in 12s"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert first.check("bob", 10).allowed  # buckets are per key


def test_a_request_over_the_token_limit_is_refused_as_in_process(prefix):
    shared, local = replica(prefix, rpm=10, tpm=100), RateLimiter(10, 100, clock=lambda: 0.0)
    too_big = shared.check("alice", 500)
    assert not too_big.allowed and math.isinf(too_big.retry_after_s)
    assert too_big.reason == local.check("alice", 500).reason
    assert "lower max_tokens" in too_big.reason
    after = shared.check("alice", 40)  # the refused request took nothing from either bucket
    assert after.allowed
    assert (after.headers["x-ratelimit-remaining-requests"], after.headers["x-ratelimit-remaining-tokens"]) == ("9", "60")


def test_shared_and_in_process_limiters_decide_alike(prefix):
    """The same calls, one after another: the same decisions, reasons and headers (Redis's clock
    moves a few ms meanwhile; no figure here sits on a rounding boundary)."""
    shared, local = replica(prefix, rpm=4, tpm=90), RateLimiter(4, 90, clock=lambda: 0.0)
    calls = [("a", 30), ("a", 50), ("a", 20), ("a", 10), ("a", 500), ("b", 5), ("a", 2)] + [("c", 1)] * 5
    for key_id, tokens in calls:
        expected, got = local.check(key_id, tokens), shared.check(key_id, tokens)
        assert (got.allowed, got.reason, got.headers) == (expected.allowed, expected.reason, expected.headers), (key_id, tokens)
        assert got.retry_after_s == pytest.approx(expected.retry_after_s, abs=0.05)


def test_concurrent_checks_never_admit_more_than_the_limit(prefix):
    """Many threads through two replicas at once: the script takes both buckets atomically, so
    exactly the limit gets through, and a request refused by one bucket takes nothing from the other."""
    replicas = [replica(prefix, rpm=1000, tpm=100), replica(prefix, rpm=1000, tpm=100)]
    requests_only = [replica(prefix + ":rpm", rpm=20), replica(prefix + ":rpm", rpm=20)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        by_tokens = list(pool.map(lambda i: replicas[i % 2].check("k", 7).allowed, range(200)))
        by_requests = list(pool.map(lambda i: requests_only[i % 2].check("k", 1).allowed, range(200)))
    assert sum(by_tokens) == 100 // 7  # the next needs 5 more tokens: 3 s of refill, far longer than the burst
    assert sum(by_requests) == 20
    # The refused 186 took no request (the bucket refills 16.7 a second meanwhile, and caps at 1000).
    remaining = int(replicas[0].check("k", 1).headers["x-ratelimit-remaining-requests"])
    assert 1000 - 100 // 7 - 1 <= remaining < 1000


def test_acheck_on_the_event_loop_shares_the_limit(prefix):
    async def burst() -> list[bool]:
        limiters = [replica(prefix, rpm=7), replica(prefix, rpm=7)]
        decisions = await asyncio.gather(*(limiters[i % 2].acheck("k", 1) for i in range(30)))
        return [d.allowed for d in decisions]

    assert sum(asyncio.run(burst())) == 7


def test_idle_buckets_expire(prefix, client):
    replica(prefix, rpm=5, tpm=600).check("alice", 60)
    # Full again 12 s (requests) and 6 s (tokens) from now; the keys live 2 minutes beyond that.
    assert 120_000 < client.pttl(f"{prefix}:{{alice}}:requests") <= 132_000
    assert 120_000 < client.pttl(f"{prefix}:{{alice}}:tokens") <= 126_000


# -- failures -----------------------------------------------------------------------------------------


def test_a_failing_redis_lets_requests_through_and_reports_each_failure(caplog):
    errors = []
    limiter = replica("verispec-test:down", rpm=1, on_error=lambda: errors.append(1), url=closed_port_url())
    with caplog.at_level(logging.WARNING, logger="verispec.server"):
        decisions = [limiter.check("alice", 10) for _ in range(3)] + [asyncio.run(limiter.acheck("alice", 10))]
    assert all(d.allowed for d in decisions) and decisions[0].headers == {}
    assert len(errors) == 4
    warnings = [r for r in caplog.records if "letting requests through" in r.getMessage()]
    assert len(warnings) == 1  # at most one per 30 s


def test_bad_or_unreachable_redis_at_start_is_a_user_error():
    with pytest.raises(UserError, match="--redis-url: give a Redis URL"):
        load_settings({"redis_url": "http://127.0.0.1:6379"})
    with pytest.raises(UserError, match="database after the host must be a number"):
        load_settings({"redis_url": "redis://127.0.0.1:6379/zero"})
    with pytest.raises(UserError, match="--redis-url redis://127.0.0.1:port/0: Port"):
        limiter_from_settings(ServerSettings(redis_url="redis://127.0.0.1:port/0", rate_limit_rpm=1), lambda: None)
    url = closed_port_url().replace("//", "//:hunter2@")
    with pytest.raises(UserError, match="cannot use Redis at redis://127.0.0.1:.*leave --redis-url out") as refused:
        limiter_from_settings(ServerSettings(redis_url=url, rate_limit_rpm=1), lambda: None)
    assert "hunter2" not in str(refused.value)


def test_without_redis_the_limits_are_in_process(client):
    assert isinstance(limiter_from_settings(ServerSettings(rate_limit_rpm=3), lambda: None), RateLimiter)
    assert load_settings({"redis_url": "none"}).redis_url is None
    assert isinstance(limiter_from_settings(ServerSettings(redis_url=REDIS_URL, rate_limit_rpm=3), lambda: None), RedisRateLimiter)


# -- over HTTP: real server processes -------------------------------------------------------------------
# Without --redis-url a server limits in process: tests/test_server.py::test_per_key_rate_limit_is_429.


@pytest.fixture(scope="module")
def key_id(client):
    key_id = f"replica-test-{uuid.uuid4().hex[:12]}"
    yield key_id
    shared = redis.Redis.from_url(f"redis://127.0.0.1:6379/{HTTP_DB}")
    for key in shared.scan_iter(match=f"verispec:ratelimit:{{{key_id}}}:*"):
        shared.delete(key)
    shared.close()


@pytest.fixture(scope="module")
def private_redis(client, tmp_path_factory):
    """A Redis of this module's own, which one test stops while a server uses it (None without redis-server)."""
    if shutil.which("redis-server") is None:
        yield None
        return
    port, folder = free_port(), tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    probe = redis.Redis.from_url(url)

    def up() -> bool:
        try:
            return probe.ping()
        except redis.ConnectionError:
            return False

    wait_for(up, 10, "the private Redis to start")
    probe.close()
    yield url, process
    if process.poll() is None:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def servers(tiny_models, key_id, private_redis, tmp_path_factory):
    """Two replicas sharing the real Redis, and one on the private Redis (if any); started side by side."""
    logs = tmp_path_factory.mktemp("logs")

    def start(redis_url: str) -> ServerProcess:
        return ServerProcess(
            # Verifier only, one request a pass: no step costs to measure, so it loads in a second.
            ["--target", tiny_models["llama"], "--proposer", "none", "--depth", "0", "--scheduler", "interleaved",
             "--rate-limit-rpm", "3", "--redis-url", redis_url, "--api-keys", f"{key_id}:sk-{key_id}"],
            log_dir=logs,
        )

    shared = f"redis://127.0.0.1:6379/{HTTP_DB}"
    procs = [start(shared), start(shared)] + ([start(private_redis[0])] if private_redis else [])
    try:
        yield [proc.wait_ready() for proc in procs]
    finally:
        for proc in procs:
            proc.stop()


def complete(server: ServerProcess, key_id: str) -> httpx.Response:
    body = {"model": "llama", "prompt": "t1 t2", "max_tokens": 1}
    return httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer sk-{key_id}"}, timeout=60)


def test_two_servers_share_one_keys_limit(servers, key_id):
    first, second = servers[:2]
    responses = [complete((first, second)[i % 2], key_id) for i in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses] == ["2", "1", "0", "0"]
    limited = responses[-1]
    assert 1 <= int(limited.headers["retry-after"]) <= 20  # one request refills in 20 s
    assert limited.headers["x-ratelimit-limit-requests"] == "3"
    error = limited.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", "rate_limit_exceeded", None)
    assert "3 requests per minute" in error["message"]
    assert complete(first, key_id).status_code == 429  # the other replica refuses too
    samples = first.metrics()
    assert any(name.startswith("verispec:rate_limit_errors_total{") for name in samples)
    assert metric(samples, "verispec:rate_limit_errors_total") == 0


def test_a_server_whose_redis_stops_lets_requests_through(servers, key_id, private_redis):
    if private_redis is None:
        pytest.skip("needs redis-server to run a Redis of its own")
    server, (_, redis_process) = servers[2], private_redis
    assert complete(server, key_id).status_code == 200
    redis_process.terminate()
    redis_process.wait(10)
    responses = [complete(server, key_id) for _ in range(4)]  # past the limit of 3: nothing counts now
    assert [r.status_code for r in responses] == [200] * 4
    assert "x-ratelimit-remaining-requests" not in responses[0].headers
    assert metric(server.metrics(), "verispec:rate_limit_errors_total") == 4
    assert server.log().count("letting requests through") == 1


def test_a_server_refuses_to_start_without_its_redis(tiny_models):
    settings = load_settings({"target": tiny_models["llama"], "rate_limit_rpm": 3, "redis_url": closed_port_url(), "audit_url": "none"})
    with pytest.raises(UserError, match="cannot use Redis at redis://127.0.0.1:"):
        create_app(settings)
