"""The batched engine: one verifier pass for every running request, and a request's output the same
bits whatever shares its passes, however its prompt was chunked, whether its prefix came from the
cache, and at any depth.

The models here are tiny Llamas whose weights float16 holds exactly, with a head size of 64, so
that the lean backend runs its CPU kernel step (the batch-invariant path) as on the reference pair.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from tests.conftest import EOS, save
from verispec.config import BatchSettings, SamplingParams, SpeculationSettings
from verispec.core.acceptance import accept_stochastic
from verispec.core.engine import Engine
from verispec.core.goodput import PassCosts, choose_depths
from verispec.core.kv_cache import BlockPool, BlockTable
from verispec.core.runner import ModelRunner, Segment
from verispec.models import load_model, load_tokenizer
from verispec.models.kernels import kernel_library
from verispec.proposers import DraftModelProposer, NgramProposer, Proposal
from verispec.proposers.remote import RemoteDrafts

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no C compiler or no AVX2/FMA/F16C here")

VOCAB = 96
# Fixed pass costs: depth auto then depends on acceptance only, the same in every engine here.
COSTS = PassCosts(rows=(1, 4, 16, 64, 256), seconds=(0.010, 0.011, 0.016, 0.040, 0.150), draft_s=0.001)


def exact16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return kernel_models(exact_pair(tmp_path_factory.mktemp("batch-models"), seed=11))


def kernel_models(paths: dict[str, str]) -> dict:
    """The pair at `paths` (`exact_pair`) on the lean backend's kernel step, with each proposer."""
    cpu, f32 = torch.device("cpu"), torch.float32
    target_lm = load_model(paths["target"], cpu, f32, backend="lean")
    draft_lm = load_model(paths["draft"], cpu, f32, role="draft", backend="lean")
    assert target_lm.kernel_step and draft_lm.kernel_step, "the test models must run the kernel step"
    return {
        "target": target_lm,
        "tokenizer": load_tokenizer(paths["target"]),
        "draft": DraftModelProposer(draft_lm, target_vocab_size=target_lm.vocab_size),
        "ngram": NgramProposer(4, 1),
        "none": None,
    }


def exact_pair(root, seed: int) -> dict[str, str]:
    """Paths of a target (2 layers, `seed`) and a draft (1 layer, `seed` + 1) whose weights 16 bits
    hold exactly, so that they run the kernel step; the servers' tests load them from disk."""
    return {
        "target": save(exact16(_llama(VOCAB, layers=2, seed=seed, heads=2, kv_heads=1, hidden=128)), root / "target", VOCAB),
        "draft": save(exact16(_llama(VOCAB, layers=1, seed=seed + 1, heads=2, kv_heads=1, hidden=128)), root / "draft", VOCAB),
    }


def _llama(vocab, layers, seed, heads, kv_heads, hidden):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        initializer_range=0.15, bos_token_id=EOS, eos_token_id=EOS, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def engine(models, max_running=8, memory="64MiB", max_pass_tokens=128, prefix_cache=True, block_size=16) -> Engine:
    batch = BatchSettings(kv_cache_memory=memory, max_pass_tokens=max_pass_tokens, prefix_cache=prefix_cache, kv_block_size=block_size)
    runner = ModelRunner(models["target"], batch.kv_cache_bytes, batch.kv_block_size, batch.prefix_cache)
    core = Engine(runner, models["tokenizer"], frozenset({EOS}), batch, max_running)
    core.pin_costs(COSTS)
    return core


def run(core: Engine, jobs, arrivals=None, rng=None) -> dict[str, list[int]]:
    """Run jobs (name, prompt, params, proposer, depth) to the end; `arrivals[name]` = the step at
    which a job is added (default: all at once). Returns each job's tokens."""
    arrivals = arrivals or {}
    pending = sorted(jobs, key=lambda j: arrivals.get(j[0], 0))
    out, requests, step = {}, {}, 0
    while pending or core.busy:
        while pending and arrivals.get(pending[0][0], 0) <= step:
            name, prompt, params, proposer, depth = pending.pop(0)
            speculation = SpeculationSettings(depth=depth, proposer_timeout_s=60.0, max_depth=6)
            requests[core.add(name, prompt, params, speculation, proposer)] = name
            out[name] = []
        for request, delta in core.step():
            out[requests[request]] += delta.token_ids
        step += 1
        assert step < 5000, "the engine stopped making progress"
    return out


def prompts(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def test_batched_rows_are_the_single_sequence_step_bitwise(models):
    """The runner's pass over rows of many sequences gives every row the logits the lean backend's
    single-sequence step gives it, to the bit: head size 64, contexts past 256 positions."""
    lm = models["target"]
    core = engine(models)
    seqs = prompts(1, 4, 20, 300)
    seqs[0] = seqs[0] + prompts(2, 1, 300, 300)[0]  # > 256 positions of context
    tables = [BlockTable(core.runner.pool) for _ in seqs]
    # Prefill in uneven chunks, several sequences per pass, then a verify-shaped segment each.
    done = [0] * len(seqs)
    while any(d < len(s) - 5 for d, s in zip(done, seqs, strict=True)):
        segments = []
        for i, s in enumerate(seqs):
            n = min(len(s) - 5 - done[i], 37 + 11 * i)
            if n > 0:
                segments.append(Segment(s[done[i] : done[i] + n], done[i], tables[i], logits=0))
                done[i] += n
        core.runner.forward(segments)
    batched = core.runner.forward([Segment(s[-5:], len(s) - 5, t) for s, t in zip(seqs, tables, strict=True)])
    for s, logits in zip(seqs, batched, strict=True):
        session = lm.session()
        session.extend(s[:-5])
        alone = session.extend(s[-5:])
        assert torch.equal(logits, alone)


def test_acceptance_at_depth_two_with_a_rejection_in_the_middle():
    """Draft 0 is certain to be accepted and draft 1 certain to be rejected: one accepted, and the
    recovered token comes from the residual at position 1 (a wrong cumulative product or index
    would take position 0's or 2's)."""
    V = 6
    target = torch.zeros(1, 3, V)
    target[0, 0, 2] = 1.0  # position 0: the draft (2) is the target's only token
    target[0, 1, 3], target[0, 1, 4] = 0.5, 0.5  # position 1: the draft (5) has no mass
    target[0, 2, 1] = 1.0  # position 2 (bonus), never reached
    draft_probs = torch.zeros(1, 2, V)
    draft_probs[0, 0, 2] = 1.0
    draft_probs[0, 1, 5], draft_probs[0, 1, 3] = 0.5, 0.5
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        verdict = accept_stochastic(torch.tensor([[2, 5]]), draft_probs, target, g)
        assert int(verdict.accepted[0]) == 1
        seen.add(int(verdict.next_token[0]))
    # residual at 1: max(0, p - q) = {4: 0.5} (3 is cancelled by the draft's own mass)
    assert seen == {4}


def test_ragged_acceptance_in_distribution():
    """Requests of different depths in one batch, each through its own generator: the marginal of
    the token after an accepted draft follows the target (chi-square, 2,000 draws)."""
    V = 4
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]])
    g = torch.Generator().manual_seed(1)
    first = torch.zeros(V)
    for _ in range(2000):
        x0 = int(torch.multinomial(q[0], 1, generator=g))
        x1 = int(torch.multinomial(q[1], 1, generator=g))
        verdict = accept_stochastic(torch.tensor([[x0, x1]]), q[None], p[None], g)
        a = int(verdict.accepted[0])
        tokens = [x0, x1][:a] + [int(verdict.next_token[0])]
        first[tokens[0]] += 1
    expected = p[0] * 2000
    chi2 = float(((first - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, f"first token off the target distribution: {first.tolist()} (chi2 {chi2:.1f}, p < 0.001)"


def test_goodput_shrinks_speculation_as_the_batch_fills():
    costs = PassCosts(rows=(1, 8, 16, 64), seconds=(0.010, 0.011, 0.013, 0.060), draft_s=0.0)
    alone = choose_depths([0.7], [8], costs)
    assert alone[0] >= 3
    full = choose_depths([0.7] * 8, [8] * 8, costs)
    assert sum(full) < 8 * alone[0]
    never = choose_depths([0.05] * 4, [8] * 4, costs)
    assert never == [0, 0, 0, 0]  # drafts that are never accepted are not worth a row


def _jobs(models):
    """Greedy and seeded sampled requests, draft, n-gram and no proposer, short and long prompts
    (past a chunk), and prompts sharing a prefix."""
    shared = prompts(3, 1, 70, 70)[0]
    texts = prompts(4, 6, 3, 40) + [shared + p for p in prompts(5, 3, 2, 9)] + prompts(6, 1, 200, 200)
    jobs = []
    for i, text in enumerate(texts):
        kind = ["draft", "ngram", "none"][i % 3]
        sampled = i % 2 == 1
        params = SamplingParams(max_new_tokens=20 + 3 * i, temperature=0.8 if sampled else 0.0, seed=100 + i if sampled else None, top_p=0.95)
        depth = "auto" if i % 4 else 3
        jobs.append((f"r{i}", text, params, models[kind], depth))
    return jobs


def test_batch_invariance(models):
    """The same requests alone one by one, then mixed with random other requests arriving at random
    times at concurrency 1 to 8, with other chunk sizes and without the prefix cache: every output
    identical, to the token."""
    jobs = _jobs(models)
    alone_engine = engine(models, max_running=1)
    alone = {}
    for job in jobs:
        alone |= run(alone_engine, [job])
    # Greedy equals verifier-only decoding (depth 0) of the request alone.
    reference = engine(models, max_running=1)
    for name, prompt, params, _, _ in jobs:
        if params.greedy:
            assert run(reference, [(name, prompt, params, None, 0)])[name] == alone[name]

    rng = random.Random(7)
    for concurrency in (2, 3, 5, 8):
        others = [
            (f"x{concurrency}-{i}", p, SamplingParams(max_new_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 1.0]), seed=i),
             models[rng.choice(["draft", "ngram", "none"])], rng.choice([0, 2, "auto"]))
            for i, p in enumerate(prompts(concurrency, 6, 1, 90))
        ]  # fmt: skip
        mixed_jobs = jobs + others
        rng.shuffle(mixed_jobs)
        arrivals = {j[0]: rng.randint(0, 40) for j in mixed_jobs}
        core = engine(
            models, max_running=concurrency, max_pass_tokens=rng.choice([16, 40, 128]),
            prefix_cache=concurrency % 2 == 1, block_size=rng.choice([8, 16, 32]),
        )  # fmt: skip
        mixed = run(core, mixed_jobs, arrivals)
        for name, *_ in jobs:
            assert mixed[name] == alone[name], f"{name} changed beside other requests at concurrency {concurrency}"


def test_prompts_waiting_in_numbers_get_more_rows_beside_cheap_rounds(models):
    """Beside running rounds a prompt chunk takes what keeps the pass within `prefill_slowdown` times
    the rounds' cost; prompts waiting together get that allowance times (prompts + 1) / streams
    where over 1: three prompts behind one stream's one-row rounds no longer get a few rows a pass
    (their first tokens waited up to 1.5 s), while a lone prompt keeps the streams' inter-token
    latency within the plain allowance."""
    core = engine(models)
    # COSTS: 1 row 10 ms, 16 rows 16 ms, 64 rows 40 ms, linear between.
    assert core.chunk_budget(3, rounds=3, prompts=1) == 23  # the plain allowance, 2 x 10.7 ms: 26 rows in all
    assert core.chunk_budget(2, rounds=2, prompts=1) == 23  # the plain allowance, 2 x 10.3 ms: 25 rows
    assert core.chunk_budget(1, rounds=1, prompts=1) == 23  # a lone prompt: the plain allowance
    assert core.chunk_budget(1, rounds=1, prompts=2) == 97  # 3 x 2 x 10 ms: 98 rows in all
    assert core.chunk_budget(3, rounds=3, prompts=2) == 23  # as many streams as prompts + 1: plain
    assert core.chunk_budget(1, rounds=1, prompts=0) == 23  # none waiting: what a chunk of 23 rows costs
    assert core.chunk_budget(1, rounds=1, prompts=3) == 127  # 4 x 2 x 10 ms: the whole pass
    assert core.chunk_budget(120, rounds=8, prompts=8) == 8  # never past the pass's rows
    assert core.chunk_budget(0, rounds=0, prompts=4) == 128  # nothing running: the whole pass

    # Three 200-token prompts arriving beside a verifier-only stream: the last one's first token from
    # the 15th pass (the 23rd with the plain allowance), each the same tokens as alone.
    params = SamplingParams(max_new_tokens=60, temperature=0)
    first, *late = prompts(21, 4, 200, 200)
    alone = run(engine(models), [(str(i), p, params, None, 0) for i, p in enumerate(late)])
    core = engine(models)
    stream = core.add("stream", first, params, SpeculationSettings(depth=0), None)
    while not core.step() or stream.prefilling:
        pass
    newcomers = [core.add(str(i), p, params, SpeculationSettings(depth=0), None) for i, p in enumerate(late)]
    passes, started = 0, set()
    while len(started) < 3:
        started |= {r for r, _ in core.step() if r in newcomers}
        passes += 1
    assert passes == 15
    while core.busy:
        core.step()
    assert {r.id: r.tokens[200:] for r in newcomers} == alone


def test_prefix_reuse_hits_misses_and_evicts(models):
    lm = models["target"]
    per_block = 2 * len(lm.layers) * lm.kv_heads * 16 * lm.head_dim * 4
    core = engine(models, memory=str(per_block * 70))  # 70 blocks: one full window, little more
    pool = core.runner.pool
    prefix = prompts(8, 1, 64, 64)[0]
    first = core.add("a", prefix + [5, 6, 7], SamplingParams(max_new_tokens=8), SpeculationSettings(depth=0), None)
    out_a = run_requests(core)
    assert first.stats.cached_tokens == 0
    second = core.add("b", prefix + [9, 9], SamplingParams(max_new_tokens=8), SpeculationSettings(depth=0), None)
    run_requests(core)
    assert second.stats.cached_tokens == 64  # four full blocks of the shared prefix
    assert pool.hits >= 64
    # the same request through a cold engine gives the same tokens
    cold = engine(models, prefix_cache=False)
    assert run(cold, [("a", prefix + [5, 6, 7], SamplingParams(max_new_tokens=8), None, 0)])["a"] == out_a[first]
    # fill the pool with other prefixes: the first one is evicted, least recently used first
    for i, p in enumerate(prompts(9, 40, 60, 120)):
        core.add(f"f{i}", p, SamplingParams(max_new_tokens=2), SpeculationSettings(depth=0), None)
        run_requests(core)
    third = core.add("c", prefix + [1], SamplingParams(max_new_tokens=2), SpeculationSettings(depth=0), None)
    run_requests(core)
    assert third.stats.cached_tokens == 0
    assert pool.free_blocks == pool.num_blocks  # nothing held once all finished


def run_requests(core: Engine) -> dict:
    out = {}
    while core.busy:
        for request, delta in core.step():
            out.setdefault(request, []).extend(delta.token_ids)
    return out


def test_preemption_recomputes_and_keeps_the_output(models):
    """A cache too small for every running request: the newest are preempted and recomputed, nobody
    fails, and every output is what it is alone."""
    jobs = [(f"p{i}", p, SamplingParams(max_new_tokens=150), models["ngram"], 2) for i, p in enumerate(prompts(10, 6, 150, 250))]
    alone = {}
    for job in jobs:
        alone |= run(engine(models, max_running=1), [job])
    lm = models["target"]
    per_block = 2 * len(lm.layers) * lm.kv_heads * 16 * lm.head_dim * 4
    tight = engine(models, max_running=6, memory=str(per_block * (1024 // 16 + 1)))
    assert run(tight, jobs) == alone
    assert tight.preemptions > 0


def test_cancelling_frees_blocks_at_once(models):
    core = engine(models)
    pool = core.runner.pool
    request = core.add("c", prompts(11, 1, 150, 150)[0], SamplingParams(max_new_tokens=50), SpeculationSettings(depth=2), models["draft"])
    for _ in range(4):
        core.step()
    assert pool.free_blocks < pool.num_blocks
    core.abort(request)
    assert pool.free_blocks == pool.num_blocks
    assert not core.busy


def test_a_free_slot_goes_to_the_key_holding_the_fewest(models):
    """Key b fills the slots and queues six more; key a's request, queued last, takes the next free
    slot: one key's requests never keep another's waiting past its fair share of the slots."""
    core = engine(models, max_running=2)
    params, speculation = SamplingParams(max_new_tokens=40), SpeculationSettings(depth=0)
    b = [core.add(f"b{i}", p, params, speculation, None, share_key="b") for i, p in enumerate(prompts(5, 8, 4, 8))]
    core.step()
    assert core.running == b[:2]
    a = core.add("a0", prompts(6, 1, 4, 8)[0], params, speculation, None, share_key="a")
    core.abort(b[0])  # b0 ends
    core.step()
    assert core.running == [b[1], a]
    core.abort(b[1])  # b1 ends: b's queue goes on in its order
    core.step()
    assert core.running == [a, b[2]]


def test_parked_sessions_take_no_slot_and_give_their_blocks_first(models):
    """Verify-API sessions waiting for their clients' drafts (parked) hold no running slot, and
    their blocks go before anyone else's: a new request runs beside them at once, never preempted;
    each session's next round admits it again, recomputed, with the output it has alone."""
    lm = models["target"]
    per_block = 2 * len(lm.layers) * lm.kv_heads * 16 * lm.head_dim * 4
    core = engine(models, max_running=2, memory=str(per_block * 65))  # the least a full window needs
    long = prompts(12, 3, 450, 450)  # 29 blocks each: two parked sessions leave too few for a third
    greedy = SamplingParams(max_new_tokens=6)
    alone = {f"s{i}": run(engine(models, max_running=1), [(f"s{i}", p, greedy, None, 0)])[f"s{i}"] for i, p in enumerate(long[:2])}
    alone |= run(engine(models, max_running=1), [("plain", long[2], SamplingParams(max_new_tokens=40), models["ngram"], 2)])

    speculation = SpeculationSettings(depth=2, proposer_timeout_s=60.0)
    sessions = {core.add(f"s{i}", p, greedy, speculation, None, remote=RemoteDrafts(Proposal([]))): f"s{i}" for i, p in enumerate(long[:2])}
    out = {name: [] for name in [*sessions.values(), "plain"]}
    while not all(s.parked and s in core.running for s in sessions):
        for request, delta in core.step():
            out[sessions[request]] += delta.token_ids
    assert core.active == 0 and len(core.running) == 2  # both slots' requests are parked

    plain = core.add("plain", long[2], SamplingParams(max_new_tokens=40), speculation, models["ngram"])
    for _ in range(200):
        for request, delta in core.step():
            out[sessions.get(request, "plain")] += delta.token_ids
        if plain not in core.running and plain not in core.waiting:
            break
    assert out["plain"] == alone["plain"] and plain.preemptions == 0
    assert any(s.preemptions for s in sessions)  # a parked session's blocks went to the new request
    assert all(s.parked for s in sessions) and not any(s.table.blocks for s in sessions if s in core.waiting)

    for _ in range(2 * greedy.max_new_tokens):  # each session's next rounds: drafts come, it is admitted again
        for session in sessions:
            if session.parked:
                session.remote.pending = Proposal([])
        for request, delta in core.step():
            out[sessions[request]] += delta.token_ids
        if not core.busy:
            break
    assert {name: out[name] for name in sessions.values()} == {name: alone[name] for name in sessions.values()}


class _Hanging:
    """A proposer whose proposals never return (until the test ends)."""

    name = "hanging"

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def session(self):
        return self

    def reset(self):
        pass

    def propose(self, context, depth, policy):
        self.calls += 1
        self.release.wait()
        return Proposal.empty()


class _Raising(_Hanging):
    name = "raising"

    def propose(self, context, depth, policy):
        raise RuntimeError("proposer bug")


class _Slow(_Hanging):
    name = "slow"

    def propose(self, context, depth, policy):
        time.sleep(0.3)
        return Proposal(list(context[-depth:]))


def test_a_hung_raising_or_slow_proposer_never_holds_the_pass(models):
    hanging, raising, slow = _Hanging(), _Raising(), _Slow()
    texts = prompts(12, 8, 5, 30)
    kinds = [hanging, raising, slow, models["draft"], models["ngram"], None, hanging, models["draft"]]
    params = SamplingParams(max_new_tokens=24)
    expected = run(engine(models, max_running=1), [(f"q{i}", t, params, None, 0) for i, t in enumerate(texts)])
    core = engine(models)
    requests = {}
    for i, (text, proposer) in enumerate(zip(texts, kinds, strict=True)):
        speculation = SpeculationSettings(depth=3, proposer_timeout_s=0.1)
        requests[core.add(f"q{i}", text, params, speculation, proposer)] = f"q{i}"
    started = time.monotonic()
    try:
        out = {name: [] for name in requests.values()}
        while core.busy:
            for request, delta in core.step():
                out[requests[request]] += delta.token_ids
            assert time.monotonic() - started < 120
    finally:
        hanging.release.set()
    assert out == expected
    assert hanging.calls == 2  # asked once per request using it; they ran verifier-only while it hung
    stats = {requests[r]: r.stats for r in requests}
    assert stats["q0"].proposer_timeouts == 1 and stats["q0"].proposed == 0
    assert stats["q1"].proposer_failures >= 1
    assert stats["q3"].proposed > 0  # the draft model kept drafting beside them


def test_block_pool_bookkeeping():
    pool = BlockPool(4, 8)
    table = BlockTable(pool)
    tokens = list(range(1, 30))
    table.reserve(24)
    table.verified(24, tokens)
    assert len(pool._cached) == 3
    table.free()
    assert pool.free_blocks == 4
    again = BlockTable(pool)
    assert again.reuse_prefix(tokens) == 24 and pool.hits == 24
    other = BlockTable(pool)
    other.reserve(8)  # the one empty block goes first; cached ones stay
    assert len(pool._cached) == 3
    again.free()
    other.free()


def test_drafting_ahead_shows_drafts_during_prefill_and_keeps_the_output(models):
    """A provisional request's first drafts are made while its prompt still prefills (chunks of 16
    rows here), announced then, and scored by its first round: the tokens are exactly those of
    the same request without it, greedy and seeded sampling alike."""
    prompt = prompts(41, 1, 100, 100)[0]
    for params in (SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24, temperature=1.0, seed=3)):
        speculation = SpeculationSettings(depth=3, proposer_timeout_s=60.0)
        outputs = []
        for ahead in (False, True):
            core = engine(models, max_pass_tokens=16)
            announced = []
            core.on_proposed = lambda proposals, seen=announced: seen.extend((r.prefilling, list(p.tokens)) for r, p in proposals.items())
            request = core.add("r", prompt, params, speculation, models["draft"], draft_ahead=ahead)
            tokens = []
            while core.busy:
                tokens += [t for _, delta in core.step() for t in delta.token_ids]
            outputs.append(tokens)
            assert announced and announced[0][0] is ahead  # the first drafts came during prefill only when asked
            assert all(not prefilling for prefilling, _ in announced[1:])
            assert request.early is None
        assert outputs[0] == outputs[1]


def test_a_remote_request_is_parked_between_its_clients_rounds(models):
    """A verify-API request runs a round only once its client's drafts are in; parked, it holds its
    blocks but takes no rows, and what it emits is exactly verifier-only decoding."""
    from verispec.proposers.base import Proposal
    from verispec.proposers.remote import RemoteDrafts

    prompt = prompts(43, 1, 20, 20)[0]
    params = SamplingParams(max_new_tokens=12)
    expected = run(engine(models, max_running=1), [("ref", prompt, params, None, 0)])["ref"]
    core = engine(models)
    remote = RemoteDrafts()
    request = core.add("edge", prompt, params, SpeculationSettings(depth=3), None, remote=remote)
    other = core.add("other", prompts(44, 1, 10, 10)[0], SamplingParams(max_new_tokens=40), SpeculationSettings(depth=0), None)
    remote.pending = Proposal([])  # the first round's drafts came with the prompt: none
    tokens = []
    while request.prefilling or request.remote.pending is not None:
        tokens += [t for r, delta in core.step() if r is request for t in delta.token_ids]
    guesses = iter([[5, 6], expected[len(tokens) : len(tokens) + 3], [1, 2, 3], expected[len(tokens) + 5 : len(tokens) + 7]])
    while request.generated < params.max_new_tokens:
        assert request.parked
        held = list(request.table.blocks)
        assert request not in dict(core.step())  # the other request runs; this one does not
        assert request.table.blocks == held
        remote.pending = Proposal(next(guesses, []))  # the client's drafts arrive
        tokens += [t for r, delta in core.step() if r is request for t in delta.token_ids]
    assert tokens == expected
    core.abort(other)


def test_greedy_drafts_in_one_native_call_are_the_loops_drafts(models):
    """A batch of greedy drafts runs after its first token in one native call over the paged cache
    (`lean_greedy_paged`): every request gets the drafts the loop of one pass per position gives
    it, at its own depth, and its draft cache holds the same tokens after."""
    from verispec.core.draft_batch import DraftBatch
    from verispec.proposers.base import DraftPolicy

    draft = models["draft"].draft_model
    contexts = prompts(31, 5, 3, 40)
    depths = [0, 1, 3, 6, 8]
    drafted = {}
    for native in (True, False):
        batch = DraftBatch(draft, models["target"].vocab_size, 64 << 20, 16)
        if not native:
            batch._greedy_native = lambda items: False
        assert batch.runner.greedy_native()
        states = [batch.state() for _ in contexts]
        policy = DraftPolicy(sampling=SamplingParams())
        rounds = []
        for extra in ([], [5, 9]):  # a second proposal over longer contexts: the caches are caught up first
            items = [(state, context + extra, depth, policy) for state, context, depth in zip(states, contexts, depths, strict=True)]
            rounds.append([p.tokens for p in batch.propose(items)])
        drafted[native] = (rounds, [list(state.cached) for state in states])
    assert drafted[True] == drafted[False]
    assert [len(t) for t in drafted[True][0][0]] == depths
