"""Token trees: a tree's nodes verified in one pass with tree attention (each node sees the
context and its own path only) get the bits its path would get as a chain; the accepted path's
keys and values, moved into place, are the ones the chain would have left; acceptance walks the
tree, greedy and sampled, exactly."""

from __future__ import annotations

import random

import pytest
import torch

from tests.test_batching import VOCAB, engine, exact_pair, kernel_models, prompts
from verispec.core.kv_cache import BlockTable
from verispec.core.runner import Segment
from verispec.models.kernels import kernel_library

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
