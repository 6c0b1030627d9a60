"""The lean backend's one torch forward (`verispec/models/reference.py`) is the reference the C
kernel step is checked against: a session's kernel step and the batched runner's paged kernel pass
agree with it up to float32 summation order (test_lean.py's tolerance; bitwise they cannot: the
kernels sum in another order), and the runner's torch pass over many sequences is the session's
torch step, the same forward over another cache.

The models hold 16-bit-exact weights with a head size of 64, so that one checkpoint runs the kernel
step (the default) and the torch forward (`cpu_kernel=False`: the same weights, in float32).
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import exact16_family_model, save, written_cache
from verispec.core.kv_cache import BlockTable
from verispec.core.runner import ModelRunner, Segment
from verispec.models import load_model
from verispec.models.kernels import kernel_library

VOCAB = 96
CPU, F32 = torch.device("cpu"), torch.float32
# float32 on the CPU, as in test_lean.py: the two differ only in summation order. The weights'
# small initial range keeps logits to a few units, and their differences under a quarter of this.
ATOL = 1e-4
needs_kernel = pytest.mark.skipif(kernel_library() is None, reason="no C compiler or no AVX2/FMA/F16C here")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    """(kernel, torch): one 16-bit-exact checkpoint on the kernel step and on the torch forward;
    grouped-query attention, head size 64, and for Qwen2 a random q/k/v bias."""
    model = exact16_family_model(request.param, VOCAB, seed=41, initializer_range=0.1)
    path = save(model, tmp_path_factory.mktemp(request.param) / "model", VOCAB)
    kernel = load_model(path, CPU, F32, backend="lean")
    reference = load_model(path, CPU, F32, backend="lean", cpu_kernel=False)
    assert not reference.kernel_step, "the reference must run the torch forward"
    return kernel, reference


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@needs_kernel
def test_the_kernel_step_agrees_with_the_torch_forward(pair):
    """A prompt of 300 rows (two of the kernel's contiguous attention chunks), a decode step, a
    width-5 verify after a rollback, and a last-row-only pass: the same logits and cached keys and
    values as the torch forward, up to summation order."""
    kernel, reference = pair
    assert kernel.kernel_step and kernel.native is not None
    a, b = kernel.session(), reference.session()
    close(a.extend(tokens(1, 300)), b.extend(tokens(1, 300)))
    close(a.extend([7]), b.extend([7]))
    a.rollback(299)
    b.rollback(299)
    close(a.extend(tokens(2, 5)), b.extend(tokens(2, 5)))
    close(a.extend([3, 9], last_only=True), b.extend([3, 9], last_only=True))
    for mine, theirs in zip(a.keys + a.values, b.keys + b.values, strict=True):
        close(mine[:, : a.length], theirs[:, : b.length])


def passes(runner: ModelRunner, seqs: list[list[int]]) -> tuple[list[torch.Tensor | None], list[BlockTable]]:
    """The sequences prefilled together (all but their last 5 tokens), then one pass of a width-5 verify, a decode and a prompt
    chunk: every pass's outputs, and the sequences' block tables."""
    tables = [BlockTable(runner.pool) for _ in seqs]
    wanted = [None, 1, 0]  # every row's logits, the last row's, none
    first = runner.forward([Segment(s[:-5], 0, t, w) for s, t, w in zip(seqs, tables, wanted, strict=True)])
    second = runner.forward(
        [
            Segment(seqs[0][-5:], len(seqs[0]) - 5, tables[0]),
            Segment(seqs[1][-5:-4], len(seqs[1]) - 5, tables[1]),
            Segment(seqs[2][-5:], len(seqs[2]) - 5, tables[2], logits=0),
        ]
    )
    return first + second, tables


@needs_kernel
def test_the_paged_kernel_pass_agrees_with_the_torch_forward(pair):
    """The runner on the kernel step (one C call, paged attention) and on the torch forward
    (`ModelRunner._torch_pass`): the same logits, and pools holding the same keys and values, up to
    summation order."""
    runners = [ModelRunner(lm, 8 << 20, block_size=16) for lm in pair]
    assert [runner.kernel for runner in runners] == [True, False]
    seqs = [tokens(10, 60), tokens(11, 23), tokens(12, 41)]
    (mine, my_tables), (theirs, their_tables) = (passes(runner, seqs) for runner in runners)
    for a, b in zip(mine, theirs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b)
    assert [t.blocks for t in my_tables] == [t.blocks for t in their_tables]
    written = [len(seqs[0]), len(seqs[1]) - 4, len(seqs[2])]
    caches = [written_cache(runner, tables, written) for runner, tables in zip(runners, (my_tables, their_tables), strict=True)]
    for a, b in zip(*caches, strict=True):
        close(a, b)


def test_the_runners_torch_pass_is_the_sessions_torch_step(pair):
    """The torch forward on the paged cache, many sequences a pass, gives each sequence's rows the
    logits that the torch forward on a session's cache gives it alone, up to the rounding of
    batched operators."""
    reference = pair[1]
    runner = ModelRunner(reference, 8 << 20, block_size=16)
    assert not runner.kernel
    seqs = [tokens(20, 60), tokens(21, 23), tokens(22, 41)]
    outputs, _ = passes(runner, seqs)
    prefill, verify = outputs[:3], outputs[3:]
    sessions = [reference.session() for _ in seqs]
    close(prefill[0], sessions[0].extend(seqs[0][:-5]))
    close(prefill[1], sessions[1].extend(seqs[1][:-5], last_only=True))
    assert prefill[2] is None
    sessions[2].extend(seqs[2][:-5])
    close(verify[0], sessions[0].extend(seqs[0][-5:]))
    close(verify[1], sessions[1].extend(seqs[1][-5:-4]))
    assert verify[2] is None
