"""Token trees: a tree's nodes verified in one pass with tree attention (each node sees the
context and its own path only) get the bits its path would get as a chain; the accepted path's
keys and values, moved into place, are the ones the chain would have left; acceptance walks the
tree, greedy and sampled, exactly."""

from __future__ import annotations

import random

import pytest
import torch

from tests.test_batching import COSTS, VOCAB, engine, exact_pair, kernel_models, prompts
from verispec.config import SamplingParams, SpeculationSettings
from verispec.core.acceptance import accept_tree_stochastic, tree_children
from verispec.core.goodput import PassCosts
from verispec.core.kv_cache import BlockTable
from verispec.core.runner import Segment
from verispec.core.sampling import sample
from verispec.core.trees import choose_widths
from verispec.models.kernels import kernel_library
from verispec.proposers import Proposal

kernel = pytest.mark.skipif(kernel_library() is None, reason="no C compiler or no AVX2/FMA/F16C here")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if kernel_library() is None:
        pytest.skip("no C compiler or no AVX2/FMA/F16C here")
    return kernel_models(exact_pair(tmp_path_factory.mktemp("tree-models"), seed=11))


def random_parents(rng: random.Random, n: int) -> list[int]:
    """A tree of n rows in topological order: row 0 the root, each other row's parent before it."""
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def path_of(parents, row) -> list[int]:
    path = [row]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def prefill(runner, table, tokens):
    runner.forward([Segment(tokens, 0, table, logits=0)])
    table.verified(len(tokens), tokens)


@kernel
@pytest.mark.parametrize("context", [5, 8, 16, 37, 300])
def test_every_node_gets_its_paths_bits(models, context):
    """Each node's logits equal the last row's of its path verified as a chain, to the bit,
    whatever the tree; beside other sequences' chains and a prompt chunk in the same pass."""
    core = engine(models)
    runner, rng = core.runner, random.Random(context)
    prompt = prompts(context, 1, context, context)[0]
    other = prompts(context + 1, 1, 40, 40)[0]
    for trial in range(3):
        n = rng.randint(2, 12)
        parents = random_parents(rng, n)
        tokens = [prompt[-1]] + [rng.randrange(1, VOCAB) for _ in range(n - 1)]
        tree, beside = BlockTable(runner.pool), BlockTable(runner.pool)
        prefill(runner, tree, prompt[:-1])
        prefill(runner, beside, other[:20])
        chunk = BlockTable(runner.pool)
        out = runner.forward(
            [
                Segment(other[20:24], 20, beside),
                Segment(tokens, len(prompt) - 1, tree, parents=parents),
                Segment(other[:17], 0, chunk, logits=0),
            ]
        )
        tree_logits = out[1]
        for row in range(n):
            path = path_of(parents, row)
            chain = BlockTable(runner.pool)
            prefill(runner, chain, prompt[:-1])
            alone = runner.forward([Segment([tokens[r] for r in path], len(prompt) - 1, chain)])[0]
            assert torch.equal(tree_logits[row], alone[-1]), (trial, row, path)
            chain.free()
        for table in (tree, beside, chunk):
            table.free()


@kernel
def test_the_kept_path_is_the_chains_cache(models):
    """After keep_path, the next pass over the accepted path reads what a chain would have left:
    the token after it gets the chain's bits."""
    core = engine(models)
    runner, rng = core.runner, random.Random(3)
    prompt = prompts(5, 1, 29, 29)[0]
    parents = [-1, 0, 0, 1, 2, 2, 4, 5, 5]
    tokens = [prompt[-1]] + [rng.randrange(1, VOCAB) for _ in parents[1:]]
    for leaf in range(len(parents)):
        path = path_of(parents, leaf)
        start = len(prompt) - 1
        tree = BlockTable(runner.pool)
        prefill(runner, tree, prompt[:-1])
        runner.forward([Segment(tokens, start, tree, parents=parents)])
        runner.keep_path(tree, start, path)
        kept = prompt[:-1] + [tokens[r] for r in path]
        tree.verified(len(kept), kept)
        after_tree = runner.forward([Segment([7], len(kept), tree)])[0]
        chain = BlockTable(runner.pool)
        prefill(runner, chain, kept)
        after_chain = runner.forward([Segment([7], len(kept), chain)])[0]
        assert torch.equal(after_tree, after_chain), (leaf, path)
        tree.free()
        chain.free()


def tree_run(core, jobs):
    """Run jobs (name, prompt, params, proposer, depth, width) to the end in one engine; each
    job's tokens, and how many rounds kept a branch (the path left the chain)."""
    out, requests, branched = {}, {}, 0
    for name, prompt, params, proposer, depth, width in jobs:
        speculation = SpeculationSettings(depth=depth, proposer_timeout_s=60.0, max_depth=6, tree_width=width)
        requests[core.add(name, prompt, params, speculation, proposer)] = name
        out[name] = []
    for _ in range(5000):
        if not core.busy:
            return out, branched
        for request, delta in core.step():
            out[requests[request]] += delta.token_ids
            branched += delta.round is not None and delta.round.kept_drafts < delta.round.accepted
    raise AssertionError("the engine stopped making progress")


class Oracle:
    """A plug-in proposer that knows the verifier's greedy continuations and offers trees whose
    chain goes wrong where a branch holds the verifier's token, two levels deep: chain [w1, t2,
    t3, ...], branches t1 under the root, t2 under it, and under that a wrong token and t3, so a
    round accepts through three branch nodes that the cache must move into place."""

    name, inline = "oracle", True

    def __init__(self, expected: dict[tuple[int, ...], list[int]]):
        self.expected = expected

    def session(self):
        return self

    def reset(self) -> None:
        pass

    def propose(self, context, depth, policy):
        for prompt, continuation in self.expected.items():
            if tuple(context[: len(prompt)]) == prompt:
                truth = continuation[len(context) - len(prompt) :][:depth]
                break
        if len(truth) < 3:
            return Proposal(truth)
        wrong = [(t + 1) % VOCAB for t in truth]
        chain = [wrong[0], *truth[1:]]
        k = len(chain)
        branches = ((0, truth[0]), (k + 1, truth[1]), (k + 2, wrong[2]), (k + 2, truth[2]))
        return Proposal(chain, None, branches)


@kernel
def test_greedy_trees_are_token_identical(models):
    """Greedy output with token trees equals verifier-only: trees of a draft model (widths 2
    and 4, a batch of 6 sharing passes, depths 3 and auto), and trees whose accepted path runs
    through branches three nodes deep (their keys and values moved into place)."""
    params = SamplingParams(max_new_tokens=40)
    seqs = prompts(21, 6, 3, 60)
    expected, _ = tree_run(engine(models), [(str(i), p, params, None, 0, 1) for i, p in enumerate(seqs)])
    for depth in (3, "auto"):
        jobs = [(str(i), p, params, models["draft"], depth, 2 + 2 * (i % 2)) for i, p in enumerate(seqs)]
        assert tree_run(engine(models), jobs)[0] == expected
    oracle = Oracle({tuple(p): expected[str(i)] for i, p in enumerate(seqs)})
    got, branched = tree_run(engine(models), [(str(i), p, params, oracle, 4, 1) for i, p in enumerate(seqs)])
    assert got == expected
    assert branched >= 12  # each such round kept 3 branch nodes and the bonus


class ShortChain(Oracle):
    """Trees whose chain is one wrong token, with the verifier's continuation on a branch under the
    root that runs deeper than the chain: a round accepts more drafts than the chain holds."""

    def propose(self, context, depth, policy):
        full = super().propose(context, depth, policy)
        truth = [token for _, token in full.branches[:2]] + full.tokens[2:3]
        if len(full.tokens) < 3:
            return full
        return Proposal([full.tokens[0]], None, ((0, truth[0]), (2, truth[1]), (3, truth[2])))


@kernel
def test_a_round_that_accepts_past_the_chain_counts_the_trees_depth_as_proposed(models):
    """A path through branches deeper than the chain: the round's proposed drafts are the tree's
    depth, never fewer than it accepted (a server's rejected-drafts counter cannot go negative)."""
    params = SamplingParams(max_new_tokens=30)
    seqs = prompts(23, 3, 3, 40)
    expected, _ = tree_run(engine(models), [(str(i), p, params, None, 0, 1) for i, p in enumerate(seqs)])
    core = engine(models)
    oracle = ShortChain({tuple(p): expected[str(i)] for i, p in enumerate(seqs)})
    speculation = SpeculationSettings(depth=4, proposer_timeout_s=60.0)
    requests = {core.add(str(i), p, params, speculation, oracle): str(i) for i, p in enumerate(seqs)}
    got, rounds = {name: [] for name in requests.values()}, []
    while core.busy:
        for request, delta in core.step():
            got[requests[request]] += delta.token_ids
            rounds += [delta.round] if delta.round is not None else []
    assert got == expected
    assert all(r.proposed >= r.accepted for r in rounds)
    assert sum(r.accepted == 3 and r.kept_drafts == 0 for r in rounds) >= 3  # past the one-token chain


def test_widths_narrow_as_the_pass_fills():
    """Alternatives are cheap in a narrow pass and narrowed, widest first, once their rows would
    make the pass dearer than TREE_SLOWDOWN."""
    costs = PassCosts(rows=(1, 16, 64), seconds=(0.010, 0.011, 0.040))
    a, b = object(), object()
    assert choose_widths({a: 3}, {a: 4}, costs, 5) == {a: 3}  # 13 rows: 0.0108 s, within 20% of 0.0103
    # 40 rows (0.0255 s): a's 8 and b's 4 alternatives would cost 0.0328 s, a's 4 and b's 4 0.0303 s
    assert choose_widths({a: 3, b: 2}, {a: 4, b: 4}, costs, 40) == {a: 2, b: 2}
    linear = PassCosts(rows=(1, 64), seconds=(0.01, 0.64))  # every row at full price: 6 more rows of 30 at most
    assert choose_widths({a: 3, b: 2}, {a: 4, b: 4}, linear, 30) == {b: 2}


def test_the_tree_rule_samples_the_target():
    """Multi-draft rejection over a chain's draw and two point-mass siblings (the draft's next
    likeliest), two levels deep: the first two output tokens follow the target exactly."""
    from tests.test_sampling_distribution import ALPHA, P_DRAFT, P_TARGET, goodness_of_fit

    V, n = len(P_TARGET), 20_000
    g = torch.Generator().manual_seed(5)
    second = torch.softmax(torch.randn(V + 1, V, generator=g) * 2, dim=-1)  # target after each first token
    second[:, 5] = 0
    second /= second.sum(-1, keepdim=True)
    pairs = []
    for _ in range(n):
        x = int(sample(P_DRAFT, g))
        beside = [t for t in P_DRAFT.topk(3).indices.tolist() if t != x][:2]
        nodes = [-1, x, *beside]
        parents = [-1, 0, 0, 0]
        # rows: the root's target, then after each node the target given that first token
        target = torch.stack([P_TARGET, *(second[t] for t in nodes[1:])])
        verdict = accept_tree_stochastic(tree_children(parents), nodes, P_DRAFT[None], 1, target, g)
        first = nodes[verdict.path[0]] if verdict.path else verdict.next_token
        after = verdict.next_token if verdict.path else int(sample(second[first], g))
        pairs.append(first * V + after)
    expected = (P_TARGET[:, None] * second[:V]).flatten()
    assert goodness_of_fit(torch.tensor(pairs), expected) > ALPHA


@kernel
def test_sampled_trees_follow_the_target(tmp_path):
    """The statistical test of `test_sampling_distribution.py` with token trees of width 3 from a
    draft model (EAGLE-2's dynamic tree, every node a point mass): rounds keep branches, and the
    output is distributed as the target's."""
    from tests.conftest import llama, make_engine, save
    from tests.test_batching import exact16
    from tests.test_sampling_distribution import (
        ALPHA,
        PARAMS,
        PROMPT,
        exact_two_token_distribution,
        goodness_of_fit,
    )
    from tests.test_sampling_distribution import VOCAB as V

    target = save(exact16(llama(V, layers=2, seed=30, hidden=16)), tmp_path / "target", V)
    draft = save(exact16(llama(V, layers=1, seed=31, hidden=16)), tmp_path / "draft", V)
    core = make_engine(target, draft, proposer="draft", tree_width=3)
    assert core.runner.trees, "the test needs the kernel's tree attention"
    core.pin_costs(PassCosts(tuple(range(1, 10)), (1.0,) * 9, draft_s=0.01))
    core.eos_ids = frozenset()  # token 0 is an ordinary token here: every sample has two tokens
    expected = exact_two_token_distribution(core)
    outputs, branched = [], 0
    for seed in range(2500):
        tokens = []
        for delta in core.stream(PROMPT, PARAMS.model_copy(update={"seed": seed}), depth=1):
            tokens += delta.token_ids
            branched += delta.round is not None and delta.round.kept_drafts < delta.round.accepted
        outputs.append(tokens[0] * V + tokens[1])
    assert branched > 100
    assert goodness_of_fit(torch.tensor(outputs), expected) > ALPHA


@kernel
def test_coupled_sampling_with_trees_is_the_verifier_only_sample(models):
    """Coupled sampling fixes each position's draw by the seed: with trees, every node draws at its
    own depth's position, and the output is the verifier-only sample."""
    params = SamplingParams(max_new_tokens=30, temperature=0.9, seed=5, sampled_acceptance="coupled")
    seqs = prompts(8, 4, 3, 40)
    expected, _ = tree_run(engine(models), [(str(i), p, params, None, 0, 1) for i, p in enumerate(seqs)])
    got, _ = tree_run(engine(models), [(str(i), p, params, models["draft"], 3, 3) for i, p in enumerate(seqs)])
    assert got == expected


@kernel
def test_draft_head_trees_are_token_identical(tmp_path):
    """A draft head grows its tree on its own features (each node fed the feature its parent's
    row predicted, in one tree segment per level): greedy output equals verifier-only, alone and
    in a batch, with branches kept."""
    from tests.test_head import head_from
    from verispec.assemble import build_engine
    from verispec.config import Settings

    paths = exact_pair(tmp_path, seed=11)
    head = head_from(paths["target"], tmp_path / "head", scale=6.0)
    params = SamplingParams(max_new_tokens=32)
    seqs = prompts(31, 5, 2, 50)
    reference = build_engine(Settings(target=paths["target"], proposer="none"))
    reference.pin_costs(COSTS)
    expected, _ = tree_run(reference, [(str(i), p, params, None, 0, 1) for i, p in enumerate(seqs)])
    core = build_engine(Settings(target=paths["target"], draft=head))
    core.pin_costs(COSTS)
    proposer = core.proposer
    assert proposer.name.startswith("head")
    got, branched = tree_run(core, [(str(i), p, params, proposer, 4, 3) for i, p in enumerate(seqs)])
    assert got == expected
    assert branched > 0
    alone, _ = tree_run(core, [("0", seqs[0], params, proposer, "auto", 2)])
    assert alone["0"] == expected["0"]


@kernel
def test_native_head_drafts_are_the_pass_loops(tmp_path, monkeypatch):
    """A draft head's greedy chains in one native call (`lean_greedy_paged` feeding its own
    features) are the tokens its pass-per-position loop drafts, round by round."""
    from tests.test_head import head_from
    from verispec.assemble import build_engine
    from verispec.config import Settings
    from verispec.core import head_batch
    from verispec.core.draft_batch import greedy_native

    paths = exact_pair(tmp_path, seed=11)
    head = head_from(paths["target"], tmp_path / "head", scale=6.0)
    params = SamplingParams(max_new_tokens=32)
    seqs = prompts(41, 4, 2, 50)

    def drafts(native: bool) -> list[list[int]]:
        monkeypatch.setattr(head_batch, "greedy_native", lambda runner, items: native and greedy_native(runner, items))
        core = build_engine(Settings(target=paths["target"], draft=head))
        core.pin_costs(COSTS)
        seen = []
        core.on_proposed = lambda proposals: seen.extend(p.tokens for p in proposals.values())
        tree_run(core, [(str(i), p, params, core.proposer, 5, 1) for i, p in enumerate(seqs)])
        return seen

    native = drafts(True)
    assert native == drafts(False) and sum(map(len, native)) > 50


@kernel
def test_a_tree_without_room_in_the_cache_is_verified_as_its_chain(models):
    """Where the KV cache has no slot left for a tree's nodes, the round verifies the chain
    alone: the step goes on, and the output is verifier-only's."""
    params = SamplingParams(max_new_tokens=24)
    prompt = prompts(51, 1, 20, 20)[0]  # its first round fits in the blocks its prompt took
    expected, _ = tree_run(engine(models), [("a", prompt, params, None, 0, 1)])
    core = engine(models)
    speculation = SpeculationSettings(depth=4, proposer_timeout_s=60.0, tree_width=1)
    request = core.add("a", prompt, params, speculation, Oracle({tuple(prompt): expected["a"]}))
    core.step()  # the prompt
    pool = core.runner.pool
    held = [pool.take() for _ in range(pool.free_blocks)]
    many = Proposal([1, 2, 3, 4], None, tuple((0, t) for t in range(5, 69)))  # 68 nodes: 4 more blocks
    assert not core._room_for_tree(request, many)
    tokens, proposed = [], []
    core.on_proposed = lambda proposals: proposed.extend(proposals.values())
    core.drafting.propose = lambda rounds, depths, widths: ({r: many for r in rounds}, {r: 0.0 for r in rounds})
    tokens += [t for _, delta in core.step() for t in delta.token_ids]  # one round: the tree has no room
    assert proposed == [many.chain()]
    pool.release(held)
    del core.drafting.propose
    while core.busy:
        tokens += [t for _, delta in core.step() for t in delta.token_ids]
    assert tokens == expected["a"]
