"""The suffix cache: drafts from earlier requests' text, bounded, kept apart by tenant, and exact."""

import httpx
import pytest

from tests.conftest import make_engine, random_prompts
from tests.serving import ServerProcess
from verispec.config import SamplingParams, SpeculationSettings
from verispec.proposers.suffix import CANDIDATES, SuffixPool, SuffixProposer

VOCAB = 64


def pool_of(*sequences, capacity=1000, key_length=2) -> SuffixPool:
    pool = SuffixPool(capacity, key_length)
    for tokens in sequences:
        pool.extend(pool.open(), tokens)
    return pool


def indexed(pool: SuffixPool) -> set[int]:
    """The sequences that some key's latest position is in."""
    return {position >> 32 for position in pool.head.values()}


def test_proposes_what_followed_the_contexts_end_in_an_earlier_sequence():
    pool = pool_of([1, 2, 3, 4, 5, 6, 7])
    assert pool.lookup([9, 3, 4], 3) == [5, 6, 7]
    assert pool.lookup([9, 3, 4], 10) == [5, 6, 7]  # no more than followed
    assert pool.lookup([9, 4, 3], 3) == []  # no match of the key
    assert pool.lookup([6, 7], 3) == []  # the match ends its sequence: nothing followed
    assert pool.lookup([3, 4], 0) == []


def test_the_longest_match_wins_and_the_latest_on_ties():
    pool = pool_of([1, 2, 3, 4, 10], [9, 3, 4, 11])
    assert pool.lookup([2, 3, 4], 1) == [10]  # 3 tokens of match against 2, though older
    assert pool.lookup([5, 3, 4], 1) == [11]  # 2 against 2: the latest
    assert pool_of([1, 2, 3, 4, 10], [1, 2, 3, 4, 12]).lookup([1, 2, 3, 4], 1) == [12]


def test_the_pool_forgets_its_oldest_sequences_beyond_its_capacity():
    pool = SuffixPool(capacity=10, key_length=2)
    first, second, third = pool.open(), pool.open(), pool.open()
    pool.extend(first, [1, 2, 3, 4])
    pool.extend(second, [5, 6, 7, 8])
    assert pool.lookup([1, 2], 2) == [3, 4]
    pool.extend(third, [9, 10, 11, 12])  # 12 tokens: the first goes
    assert pool.tokens == 8 and list(pool.sequences) == [second, third]
    assert pool.lookup([1, 2], 2) == []
    assert indexed(pool) == {second, third}  # its positions left the index too
    pool.extend(second, [13])  # the second is now the latest; the third the oldest
    fourth = pool.open()
    pool.extend(fourth, [14, 15])
    assert list(pool.sequences) == [second, fourth] and pool.tokens == 7
    assert pool.lookup([10, 11], 1) == [] and pool.lookup([7, 8], 1) == [13]


def test_one_sequence_longer_than_the_pool_keeps_its_end():
    pool = SuffixPool(capacity=8, key_length=2)
    sequence = pool.open()
    pool.extend(sequence, list(range(20, 40)))
    assert pool.tokens <= 8  # half the pool: its last 4
    assert pool.lookup([36, 37], 2) == [38, 39]
    assert pool.lookup([21, 22], 2) == []


def test_a_lookup_compares_the_latest_candidates_only():
    long_match = [7, 8, 9, 1, 2, 50]
    assert pool_of(long_match, *([5, 1, 2, i] for i in range(10, 10 + CANDIDATES - 1))).lookup(
        [7, 8, 9, 1, 2], 1
    ) == [50]
    pool = pool_of(long_match, *([5, 1, 2, i] for i in range(10, 10 + CANDIDATES)))
    assert pool.lookup([7, 8, 9, 1, 2], 1) == [10 + CANDIDATES - 1]  # the long match is 9th latest


def test_a_session_adds_its_verified_tokens_and_its_own_text_counts():
    proposer = SuffixProposer(1000, 2)
    session = proposer.session()
    context = [1, 2, 3, 4, 1, 2]
    assert session.propose(context, 2).tokens == [3, 4]  # prompt lookup within its own text
    assert session.propose(context + [3, 4, 9], 2).tokens == []  # (4, 9) is new
    assert proposer.session().propose([7, 4, 9], 3).tokens == []  # 9 ended the first's text: nothing after
    assert proposer.session().propose([7, 3, 4], 3).tokens == [9]  # the first's latest continuation of (3, 4)
    assert session.propose([5, 6], 1).tokens == []  # a context that shrank starts a new sequence
    assert proposer.pools[""].tokens == 9 + 3 + 3 + 2


def test_tenants_do_not_see_each_others_text_unless_pools_are_shared():
    text = [11, 12, 13, 14, 15, 16]
    for shared in (False, True):
        proposer = SuffixProposer(1000, 2, shared=shared)
        proposer.session("tenant-a").propose(text, 1)
        drafts = proposer.session("tenant-b").propose([9, 11, 12], 3).tokens
        assert drafts == ([13, 14, 15] if shared else [])
        assert proposer.session("tenant-a").propose([9, 11, 12], 3).tokens == [13, 14, 15]


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        SuffixProposer(0, 2)
    with pytest.raises(ValueError):
        SpeculationSettings(suffix_cache_tokens=0)


@pytest.fixture(scope="module")
def suffix_engine(tiny_models):
    return make_engine(tiny_models["llama"], proposer="suffix")


def test_speculation_from_the_cache_equals_verifier_only(suffix_engine):
    accepted = 0
    for prompt in random_prompts(8, VOCAB, seed=21):
        reference = suffix_engine.generate(prompt, SamplingParams(max_new_tokens=30), depth=0)
        for depth in (1, 3, "auto"):
            out = suffix_engine.generate(prompt, SamplingParams(max_new_tokens=30), depth=depth)
            assert out.token_ids == reference.token_ids, (prompt, depth)
            accepted += out.stats.accepted
        seeded = SamplingParams(max_new_tokens=30, temperature=1.0, seed=5)
        sampled = suffix_engine.generate(prompt, seeded, depth=0).token_ids
        assert suffix_engine.generate(prompt, seeded, depth=4).token_ids == sampled
    assert accepted > 0


def test_a_repeated_request_is_drafted_from_the_first(suffix_engine):
    prompt = random_prompts(1, VOCAB, seed=22, min_len=20, max_len=20)[0]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    first = suffix_engine.generate(prompt, params, depth=4)
    # a new request with that prompt is offered the first's continuation at once
    assert suffix_engine.proposer.session().propose(prompt, 4).tokens == first.token_ids[:4]
    again = suffix_engine.generate(prompt, params, depth=4)
    assert again.token_ids == first.token_ids
    assert again.stats.accepted == again.stats.proposed >= 30  # every draft right
    assert again.stats.rounds <= 10


def test_requests_another_proposer_or_depth_0_served_teach_it_too(tiny_models):
    engine = make_engine(tiny_models["llama"], proposer="suffix")
    prompts = random_prompts(2, VOCAB, seed=23, min_len=20, max_len=20)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    served = [
        engine.generate(prompts[0], params, depth=3, proposer=None),
        engine.generate(prompts[1], params, depth=0),
    ]
    for prompt, out in zip(prompts, served, strict=True):
        assert out.stats.proposed == 0  # verifier-only served it
        assert engine.proposer.session().propose(prompt, 4).tokens == out.token_ids[:4]


def test_a_served_requests_last_round_reaches_the_pool(suffix_engine):
    prompt = random_prompts(1, VOCAB, seed=24, min_len=20, max_len=20)[0]
    out = suffix_engine.generate(prompt, SamplingParams(max_new_tokens=16, ignore_eos=True), depth=3)
    pool = suffix_engine.proposer.pools[""]
    assert list(pool.sequences.values())[-1][0].tolist() == prompt + out.token_ids


@pytest.fixture(scope="module")
def keyed_server(tiny_models, tmp_path_factory):
    proc = ServerProcess(
        ["--target", tiny_models["llama"], "--proposer", "suffix", "--depth", "4"],
        log_dir=tmp_path_factory.mktemp("logs"),
        env={"VERISPEC_API_KEYS": "alice:sk-alice-0123456789,bob:sk-bob-0123456789"},
    ).wait_ready()
    yield proc
    proc.stop_gracefully()


def test_over_http_a_tenant_is_drafted_from_its_own_requests_only(keyed_server):
    def complete(key: str) -> dict:
        body = {"model": "llama", "prompt": "t4 t7 t10 t13 t16", "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "speculation_stats": True}  # fmt: skip
        response = httpx.post(keyed_server.url + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert response.status_code == 200, response.text
        return response.json()

    first = complete("sk-alice-0123456789")
    again = complete("sk-alice-0123456789")
    other = complete("sk-bob-0123456789")
    text = first["choices"][0]["text"]
    assert again["choices"][0]["text"] == text == other["choices"][0]["text"]  # exact whatever was drafted
    drafted, cold = again["speculation_stats"], other["speculation_stats"]
    assert drafted["proposer"] == "suffix" and drafted["accepted"] == drafted["proposed"] >= 18
    assert cold["accepted"] < drafted["accepted"]  # bob's pool had none of alice's text
