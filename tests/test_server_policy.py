"""The server's policies as pure functions: circuit breaker, load-aware depth, keys, rate limits."""

import pytest

from verispec.config import ServerSettings
from verispec.core.rounds import Round
from verispec.errors import UserError
from verispec.server.auth import KeyRing, RateLimiter
from verispec.server.breaker import BreakerState, CircuitBreaker
from verispec.server.scheduler import load_depth_cap


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rounds(n: int, proposed: int, accepted: int, failed: bool = False) -> list[Round]:
    return [Round(depth=proposed or 4, proposed=proposed, accepted=accepted, propose_s=0, verify_s=0, proposer_failed=failed)] * n


def breaker(clock: Clock, moves: list) -> CircuitBreaker:
    return CircuitBreaker(
        min_acceptance=0.3, window=64, max_failures=3, cooldown_s=10, clock=clock, on_change=lambda s, why: moves.append(s)
    )


def test_breaker_opens_on_low_acceptance_and_closes_after_a_good_probe():
    clock, moves = Clock(), []
    b = breaker(clock, moves)
    for r in rounds(7, proposed=4, accepted=1):  # 28 drafts: under half a window, no verdict yet
        b.record(r)
    assert b.state == BreakerState.CLOSED
    for r in rounds(1, proposed=4, accepted=1):  # 32 drafts at 0.25 < 0.3
        b.record(r)
    assert b.state == BreakerState.OPEN and not b.speculating()

    clock.now += 9.9
    assert b.state == BreakerState.OPEN
    clock.now += 0.2
    assert b.state == BreakerState.HALF_OPEN and b.speculating()
    for r in rounds(8, proposed=4, accepted=3):  # a probe of 32 drafts at 0.75
        b.record(r)
    assert b.state == BreakerState.CLOSED
    assert moves == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_bad_probe_reopens_the_breaker():
    clock, moves = Clock(), []
    b = breaker(clock, moves)
    for r in rounds(8, proposed=4, accepted=0):
        b.record(r)
    clock.now += 11
    assert b.state == BreakerState.HALF_OPEN
    for r in rounds(8, proposed=4, accepted=0):
        b.record(r)
    assert b.state == BreakerState.OPEN
    assert moves == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN]


def test_breaker_opens_on_repeated_proposer_failures():
    b = breaker(Clock(), [])
    for r in rounds(2, proposed=0, accepted=0, failed=True) + rounds(5, proposed=4, accepted=4):
        b.record(r)
    assert b.state == BreakerState.CLOSED
    b.record(rounds(1, proposed=0, accepted=0, failed=True)[0])
    assert b.state == BreakerState.OPEN


def test_breaker_ignores_rounds_that_asked_for_no_drafts():
    b = breaker(Clock(), [])
    for _ in range(100):
        b.record(Round(depth=0, proposed=0, accepted=0, propose_s=0, verify_s=0))
    assert b.state == BreakerState.CLOSED and b.acceptance_rate is None


def test_rolling_window_forgets_old_rounds():
    b = breaker(Clock(), [])
    for r in rounds(16, proposed=4, accepted=4) + rounds(8, proposed=4, accepted=0):
        b.record(r)
    assert b.acceptance_rate == pytest.approx(32 / 64)  # the window holds the last 64 drafts
    assert b.state == BreakerState.CLOSED


@pytest.mark.parametrize(
    "busy, cap",
    [(0, 8), (1, 8), (10, 8), (11, 8), (15, 4), (18, 2), (19, 1), (20, 0), (25, 0)],
)
def test_depth_shrinks_with_load(busy, cap):
    # capacity 4 + 16 = 20; shrinking from load 0.5 (11 busy) to off at load 1 (20 busy)
    server = ServerSettings(max_running=4, max_waiting=16, load_depth_from=0.5, load_depth_off=1.0)
    assert load_depth_cap(busy, server, max_depth=8) == cap


def test_a_lone_request_always_speculates():
    server = ServerSettings(max_running=1, max_waiting=0, load_depth_from=0.0, load_depth_off=0.0)
    assert load_depth_cap(1, server, max_depth=6) == 6


def test_load_depth_off_must_not_precede_its_start():
    with pytest.raises(ValueError, match="load-depth-from"):
        ServerSettings(load_depth_from=0.8, load_depth_off=0.5)


def test_keys_from_settings_and_file(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nops:sk-ops\nsk-anon\n\n")
    ring = KeyRing.from_settings(ServerSettings(api_keys="web:sk-web", api_keys_file=keys_file))
    assert ring.enabled
    assert ring.identify("sk-web") == "web"
    assert ring.identify("sk-ops") == "ops"
    assert ring.identify("sk-anon").startswith("key-")
    assert ring.identify("sk-nope") is None
    assert ring.identify(None) is None
    assert not KeyRing.from_settings(ServerSettings()).enabled


def test_bad_key_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        KeyRing.from_settings(ServerSettings(api_keys_file=tmp_path / "missing"))
    with pytest.raises(UserError, match="share an ID"):
        KeyRing.from_settings(ServerSettings(api_keys="a:sk-1,a:sk-2"))


def test_token_buckets_refill_over_a_minute():
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=2, tokens_per_minute=100, clock=clock)
    assert limiter.check("k", 40).allowed
    second = limiter.check("k", 40)
    assert second.allowed and second.headers["x-ratelimit-remaining-requests"] == "0"
    assert second.headers["x-ratelimit-remaining-tokens"] == "20"
    third = limiter.check("k", 10)
    assert not third.allowed and third.retry_after_s == pytest.approx(30.0)  # one request refills in 30 s
    assert limiter.check("other", 10).allowed  # buckets are per key
    clock.now += 30
    assert limiter.check("k", 10).allowed
    too_big = limiter.check("k", 500)
    assert not too_big.allowed and "lower max_tokens" in too_big.reason


def test_the_queue_bound_counts_jobs_not_yet_handed_to_the_engine():
    """Jobs submitted between two engine steps wait in the inbox, not yet in the engine; the bound
    counts them, so the queue never grows past it meanwhile (a load test once found it did)."""
    import asyncio
    import types

    from verispec.config import SamplingParams, SpeculationSettings
    from verispec.server.job import Job, Overloaded
    from verispec.server.metrics import ServerMetrics
    from verispec.server.scheduler import Scheduler

    server = ServerSettings(max_running=2, max_waiting=2)
    engine = types.SimpleNamespace(speculation=SpeculationSettings(depth=2), runner=types.SimpleNamespace(batches=True))
    scheduler = Scheduler(engine, server, breaker(Clock(), []), ServerMetrics("m", server, max_depth=2))  # its thread not started
    loop = asyncio.new_event_loop()

    def job() -> Job:
        return Job("r", [1], SamplingParams(), None, None, loop, events=None)

    for _ in range(4):
        scheduler.submit(job())
    with pytest.raises(Overloaded) as refused:
        scheduler.submit(job())
    assert refused.value.retry_after_s >= 1
    assert scheduler.busy == 4
    loop.close()


def test_a_fault_in_watching_a_round_ends_its_request_not_the_engine_thread(tiny_models):
    """A bug in what observes a round (metrics, the breaker) once left the engine's thread dead and
    every request hanging: now the request it hit ends with an error and the others go on."""
    import asyncio

    from tests.conftest import make_engine
    from verispec.config import SamplingParams
    from verispec.server.job import Job
    from verispec.server.metrics import ServerMetrics
    from verispec.server.scheduler import Scheduler

    server = ServerSettings(max_running=2, max_waiting=2)
    metrics = ServerMetrics("fault", server, max_depth=2)
    engine = make_engine(tiny_models["llama"], proposer="ngram", depth=2)
    scheduler = Scheduler(engine, server, breaker(Clock(), []), metrics)
    plain = metrics.observe_round
    faults = []

    def observe_round(round_):
        if not faults:
            faults.append(round_)
            raise ValueError("a bug in a metric")
        plain(round_)

    metrics.observe_round = observe_round
    scheduler.start()

    async def run() -> list:
        loop = asyncio.get_running_loop()
        jobs = [Job(f"r{i}", [3, 5, 7, 3, 5], SamplingParams(max_new_tokens=8), None, None, loop) for i in range(2)]
        for job in jobs:
            scheduler.submit(job)
        deadline = loop.time() + 60
        for job in jobs:  # each ends (its outcome is set after its last event is sent)
            while job.outcome is None:
                assert loop.time() < deadline, "a request never ended: the engine's thread stopped"
                try:
                    await asyncio.wait_for(job.events.get(), timeout=0.05)
                except TimeoutError:
                    pass
        return [job.outcome for job in jobs]

    try:
        outcomes = asyncio.run(run())
    finally:
        scheduler.drain(0)
    assert faults and sorted(outcomes) == ["error", "ok"]
