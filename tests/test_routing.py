"""Per-request proposer choice and canary decisions, as pure functions with seeded randomness."""

import random

import pytest
from scipy import stats

from verispec.server.routing import Canary, ProposerBandit, Router, Throughput, mann_whitney_greater


def test_mann_whitney_matches_scipy():
    rng = random.Random(1)
    xs = [rng.gauss(0.6, 0.1) for _ in range(40)]
    ys = [rng.gauss(0.5, 0.1) for _ in range(35)] + [0.6, 0.6]  # with ties
    expected = stats.mannwhitneyu(xs, ys, alternative="greater", method="asymptotic").pvalue
    assert mann_whitney_greater(xs, ys) == pytest.approx(expected, rel=1e-6)
    assert mann_whitney_greater([], ys) == 1.0


def test_throughput_is_a_ratio_of_sums_with_a_sound_standard_error():
    rng = random.Random(5)
    means, errors = [], []
    for _ in range(400):
        figures = Throughput()
        for _ in range(30):
            tokens = rng.choice([4, 64])  # some requests stop early, where the prefill dominates
            figures.add(tokens, 0.05 + tokens / rng.gauss(100, 15))
        means.append(figures.mean)
        errors.append(figures.stderr)
    assert figures.mean == pytest.approx(figures.tokens / figures.seconds)
    spread = stats.tstd(means)
    assert 0.8 < sum(errors) / len(errors) / spread < 1.25  # the standard error matches the spread of the estimate


def simulate(bandit: ProposerBandit, speed: dict, key=None, rounds=300, rng=None) -> dict:
    rng = rng or random.Random(0)
    chosen = {arm: 0 for arm in bandit.arms}
    for _ in range(rounds):
        arm = bandit.choose(key)
        chosen[arm] += 1
        tokens = 64
        bandit.update(key, arm, tokens, tokens / max(1.0, rng.gauss(speed[arm], 0.1 * speed[arm])))
    return chosen


def test_the_bandit_settles_on_the_fastest_proposer_and_none_wins_when_speculation_does_not_pay():
    bandit = ProposerBandit(["draft", "ngram", "none"], rng=random.Random(3))
    chosen = simulate(bandit, {"draft": 90.0, "ngram": 130.0, "none": 100.0})
    assert chosen["ngram"] > 0.8 * sum(chosen.values())
    assert min(chosen.values()) >= 3  # each tried

    bandit = ProposerBandit(["draft", "ngram", "none"], rng=random.Random(4))
    chosen = simulate(bandit, {"draft": 70.0, "ngram": 80.0, "none": 100.0})
    assert max(chosen, key=chosen.get) == "none"


def test_keys_learn_their_own_best_proposer():
    bandit = ProposerBandit(["draft", "ngram"], rng=random.Random(5))
    for _ in range(4):  # interleave two kinds of traffic with opposite winners
        simulate(bandit, {"draft": 140.0, "ngram": 90.0}, key="prose", rounds=60)
        simulate(bandit, {"draft": 90.0, "ngram": 160.0}, key="code", rounds=60)
    assert bandit.means("prose")["draft"] > bandit.means("prose")["ngram"]
    picks = [bandit.choose("code") for _ in range(200)]
    assert picks.count("ngram") > 180
    picks = [bandit.choose("prose") for _ in range(200)]
    assert picks.count("draft") > 180


def test_a_new_key_explores_on_its_own_instead_of_following_the_overall_winner():
    bandit = ProposerBandit(["draft", "ngram", "none"], rng=random.Random(3))
    simulate(bandit, {"draft": 150.0, "ngram": 90.0, "none": 100.0}, key="code", rounds=200)
    assert bandit.means()["draft"] > bandit.means()["ngram"]  # overall, the draft wins
    chosen = simulate(bandit, {"draft": 80.0, "ngram": 200.0, "none": 100.0}, key="copy", rounds=40, rng=random.Random(4))
    assert chosen["ngram"] >= 30
    assert [bandit.choose("copy") for _ in range(100)].count("ngram") > 90


def feed(canary: Canary, current: float, candidate: float, n: int, rng: random.Random, throughput=(100.0, 100.0)):
    decision = None
    for _ in range(n):
        for arm, rate, speed in (("current", current, throughput[0]), ("candidate", candidate, throughput[1])):
            proposed = 40
            accepted = max(0, min(proposed, round(rng.gauss(rate, 0.08) * proposed)))
            decision = canary.record(arm, proposed, accepted, 64, 64 / rng.gauss(speed, 5)) or decision
    return decision


def test_a_better_candidate_is_promoted():
    decisions = []
    canary = Canary(fraction=0.2, min_requests=20, on_decision=decisions.append, rng=random.Random(0))
    decision = feed(canary, current=0.55, candidate=0.70, n=40, rng=random.Random(1))
    assert decision is not None and decision.verdict == "promote"
    assert canary.state == Canary.PROMOTED and decisions == [decision]
    assert canary.route() == "current"  # the canary is over


def test_a_worse_candidate_is_rolled_back():
    canary = Canary(fraction=0.2, min_requests=20, rng=random.Random(0))
    decision = feed(canary, current=0.6, candidate=0.3, n=40, rng=random.Random(2))
    assert decision.verdict == "rollback" and "acceptance" in decision.why
    assert canary.state == Canary.ROLLED_BACK


def test_a_slower_candidate_is_rolled_back_even_if_it_accepts_as_much():
    canary = Canary(fraction=0.2, min_requests=20, rng=random.Random(0))
    decision = feed(canary, current=0.6, candidate=0.6, n=40, rng=random.Random(3), throughput=(100.0, 60.0))
    assert decision.verdict == "rollback" and "throughput" in decision.why


def test_no_verdict_on_equal_proposers_or_too_few_requests():
    canary = Canary(fraction=0.2, min_requests=20, rng=random.Random(0))
    assert feed(canary, current=0.6, candidate=0.9, n=19, rng=random.Random(4)) is None  # too few yet
    canary = Canary(fraction=0.2, min_requests=20, margin=0.05, rng=random.Random(0))
    assert feed(canary, current=0.6, candidate=0.6, n=40, rng=random.Random(6)) is None


def test_the_router_moves_all_traffic_to_a_promoted_candidate():
    canary = Canary(fraction=0.5, min_requests=5, rng=random.Random(0))
    router = Router({"draft": "E1", "canary": "E2"}, "draft", canary=canary, candidate="canary")
    rng = random.Random(7)
    for _ in range(200):
        name = router.choose(None)
        rate = 0.8 if name == "canary" else 0.4
        router.finished(name, None, 40, round(rng.gauss(rate, 0.05) * 40), 64, 0.5)
        if canary.state != Canary.RUNNING:
            break
    assert canary.state == Canary.PROMOTED
    assert {router.choose(None) for _ in range(50)} == {"canary"}


def test_a_candidate_whose_proposals_fail_is_rolled_back():
    # Every proposal of the candidate fails (raises or times out): no draft token is ever proposed,
    # and that must count as acceptance 0, not as a request that says nothing.
    canary = Canary(fraction=0.5, min_requests=10, rng=random.Random(0))
    router = Router({"draft": "E1", "canary": "E2"}, "draft", canary=canary, candidate="canary")
    assert router.on_trial("canary") and not router.on_trial("draft")
    rng = random.Random(8)
    for _ in range(30):
        router.finished("draft", None, 40, round(rng.gauss(0.6, 0.05) * 40), 64, 0.5)
        router.finished("canary", None, 0, 0, 64, 0.6, failures=3)
    assert canary.state == Canary.ROLLED_BACK
    assert not router.on_trial("canary")  # the breaker guards whatever still runs on it
    # A request that never tried to speculate (depth 0) is no evidence either way.
    assert Canary(fraction=0.5, min_requests=1).record("candidate", 0, 0, 64, 0.5) is None
