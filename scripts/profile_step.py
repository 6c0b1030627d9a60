"""Where the time of one speculative round goes: profile a decode step (width 1) and a verify
step (width k+1) of the verifier, and a draft step, on the chosen backend.

    python scripts/profile_step.py [--target T] [--draft D] [--backend lean|transformers] [--width 4]
                                   [--steps 50] [--per-op] [--activations float|q8|bf16]

Prints each step's time (the median of --steps passes, untimed inside) and the weight bytes it has
to stream, which on a CPU bounds a step from below (bytes / memory bandwidth), then where the
step's time goes. On the lean backend's CPU kernel step, the time of each kernel call (the kernels
run outside torch, where its profiler cannot see): all the layers are one call (`lean_layers`,
csrc/lean_step.c) and the rest is the final norm, the LM head and Python; --per-op runs the layers
one kernel call per operation from Python instead (the same bits, the step as it was before the
one-call step) and sums the calls by operation. Otherwise torch.profiler's operator table. Ends
with the draft step's cost relative to the verifier's decode step; for a draft head (made by
`verispec distill --head`), its reading of a prompt and its greedy proposals, as the engine makes
them, split into the first pass and the later positions.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from verispec.models import kernels, lean, load_model, quant, reference_pair
from verispec.models.head import is_head


def weight_bytes(lm) -> int:
    """Bytes of weight a pass streams (the embedding table is only gathered from)."""
    model = getattr(lm, "model", None)
    if model is not None:
        return sum(t.numel() * t.element_size() for t in model.parameters())
    return sum(linear.nbytes for linear in lm.linears())


def profile_step(
    lm, label: str, width: int, context: int = 400, steps: int = 50, per_op: bool = False
) -> float:
    """Print the step's time, weight bytes and breakdown; returns seconds per step."""
    session = lm.session()
    session.extend(list(range(1, context + 1)))
    tokens = list(range(5, 5 + width))
    gb = weight_bytes(lm) / 1e9
    kernel_step = getattr(lm, "kernel_step", False)
    native = getattr(lm, "native", None)
    if per_op and kernel_step:
        lm.native = None  # LeanLM.kernel_pass then runs the layers one call per operation
    try:
        for _ in range(5):  # warm-up
            session.extend(tokens)
            session.rollback(context)
        per_step = _step_seconds(session, tokens, context, steps)
        if kernel_step:
            table = _time_kernel_calls(lm, session, tokens, context, steps)
        else:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    session.extend(tokens)
                    session.rollback(context)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    finally:
        if kernel_step:
            lm.native = native
    mode = " (per-op)" if per_op and kernel_step else ""
    print(
        f"\n== {label}{mode}: width {width}, context {context}: {per_step * 1e3:.3f} ms per step; "
        f"weights {gb * 1e3:.0f} MB -> {gb / per_step:.1f} GB/s if weight-streaming bound"
    )
    print(table)
    return per_step


def _step_seconds(session, tokens, context: int, steps: int) -> float:
    """The median time of `steps` passes (robust to other load on the machine)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        session.extend(tokens)
        times.append(time.perf_counter() - start)
        session.rollback(context)
    return statistics.median(times)


def _time_kernel_calls(lm, session, tokens, context: int, steps: int) -> str:
    """Run `steps` passes with every kernel call timed (means; the wrappers add a little); the
    rest of the pass is Python and torch."""
    names = {id(getattr(layer, n)): n for layer in lm.layers for n in ("qkv", "o", "gate_up", "down")}
    names[id(lm.lm_head)] = "lm_head"
    spent: dict[str, float] = defaultdict(float)
    library = kernels.kernel_library()

    class Timed:
        def __getattr__(self, name):
            function = getattr(library, name)

            def call(*args):
                start = time.perf_counter()
                result = function(*args)
                spent[name] += time.perf_counter() - start
                return result

            return call

    plain = {cls: cls.into for cls in (kernels.Linear, quant.QuantLinear)}

    def timed(cls):
        def timed_into(linear, *args, **kwargs):
            start = time.perf_counter()
            plain[cls](linear, *args, **kwargs)
            spent[f"linear {names.get(id(linear), '?')}"] += time.perf_counter() - start

        return timed_into

    lean.kernel_library = lambda: Timed()
    for cls in plain:
        cls.into = timed(cls)
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            session.extend(tokens)
            session.rollback(context)
        total = time.perf_counter() - t0
    finally:
        lean.kernel_library = kernels.kernel_library
        for cls, into in plain.items():
            cls.into = into
    rows = sorted(spent.items(), key=lambda item: -item[1])
    rows.append(("python and torch (embedding, buffers, dispatch)", total - sum(spent.values())))
    lines = [
        f"  {name:<48} {seconds / steps * 1e3:7.3f} ms  {seconds / total:6.1%}" for name, seconds in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair = reference_pair()
    parser.add_argument("--target", default=pair[0] if pair else None)
    parser.add_argument("--draft", default=pair[1] if pair else None)
    parser.add_argument("--backend", default="lean")
    parser.add_argument("--width", type=int, default=4, help="verify pass width (depth + 1)")
    parser.add_argument("--steps", type=int, default=50, help="timed passes per step kind")
    parser.add_argument("--draft-depth", type=int, default=4, help="draft tokens per timed greedy proposal")
    parser.add_argument(
        "--per-op",
        action="store_true",
        help="kernel step: the layers one kernel call per operation, timed by operation",
    )
    parser.add_argument("--activations", default="float", choices=("float", "q8", "bf16"), help="as verispec's --activations")
    args = parser.parse_args()
    cpu, f32 = torch.device("cpu"), torch.float32
    target = load_model(args.target, cpu, f32, backend=args.backend, activations=args.activations)
    options = dict(steps=args.steps, per_op=args.per_op)
    decode = profile_step(target, "verifier decode", 1, **options)
    profile_step(target, "verifier verify", args.width, **options)
    if args.draft and is_head(args.draft):
        head_proposal(target, args.draft, args.draft_depth, args.steps, decode)
    elif args.draft:
        draft = load_model(args.draft, cpu, f32, role="draft", backend=args.backend, activations=args.activations)
        step = profile_step(draft, "draft step", 1, **options)
        print(f"\ndraft step / verifier decode step: {step / decode:.3f}")
        vocab = getattr(target, "vocab_size", draft.vocab_size)
        for native in (False, True):
            token = draft_token_seconds(draft, vocab, args.draft_depth, native, args.steps)
            how = "one native call per proposal" if native else "one pass per token from Python"
            print(
                f"draft token in a greedy proposal of {args.draft_depth} ({how}): {token * 1e3:.3f} ms "
                f"= {token / decode:.3f} of a verifier decode step"
            )


def head_proposal(target, path: str, depth: int, steps: int, decode: float, context: int = 400) -> None:
    """Time a draft head's greedy proposals as the engine makes them (`HeadBatch.propose`): its
    reading of a prompt of `context` rows, then `steps` rounds that each verified the whole last
    chain (depth + 1 new rows for its first pass, then one native call for the rest). The head's
    inputs are random features: a pass's cost does not depend on their values."""
    from verispec.config import SamplingParams
    from verispec.core.head_batch import HeadBatch
    from verispec.models.head import load_head
    from verispec.proposers.base import DraftPolicy

    batch, width = HeadBatch(load_head(path, target), 256 << 20, 16), target.embed.shape[1]
    state, policy = batch.state(), DraftPolicy(SamplingParams())
    tokens = [1 + i % (target.vocab_size - 1) for i in range(context + (steps + 6) * (depth + 1))]
    state.restore(0, torch.randn(context - 1, width))
    start = time.perf_counter()
    batch.propose([(state, tokens[:context], depth, policy)])
    prompt_s = time.perf_counter() - start
    proposals, firsts, laters, length = [], [], [], context
    for i in range(steps + 5):
        state.restore(length - 1, torch.randn(depth + 1, width))  # the round verified the chain and its bonus
        length += depth + 1
        start = time.perf_counter()
        batch.propose([(state, tokens[:length], depth, policy)])
        if i >= 5:  # warm-up
            proposals.append(time.perf_counter() - start)
            later, first = batch.pass_s
            firsts.append(first)
            laters.append(later)
    batch.release(state)
    proposal, laters = statistics.median(proposals), [s for s in laters if s is not None]
    print(
        f"\n== draft head {path}: reading a prompt of {context} rows {prompt_s * 1e3:.2f} ms "
        f"({prompt_s / context * 1e6:.1f} us a row)\n"
        f"greedy proposal of {depth} after a round that kept {depth + 1} rows: {proposal * 1e3:.3f} ms "
        f"= {proposal / decode:.3f} of a verifier decode step ({proposal / depth * 1e3:.3f} ms a draft token)\n"
        f"  its first pass ({depth + 1} rows, logits of the last): {statistics.median(firsts) * 1e3:.3f} ms"
    )
    if laters:
        print(f"  each later position ({depth - 1} after the first; one native call where greedy runs natively): {statistics.median(laters) * 1e3:.3f} ms")


def draft_token_seconds(draft, vocab: int, depth: int, native: bool, steps: int, context: int = 400) -> float:
    """Seconds per draft token of a greedy proposal as the draft proposer makes it (catch-up on
    the newly verified token, then `depth` tokens): the median over `steps` proposals."""
    from verispec.config import SamplingParams
    from verispec.proposers.base import DraftPolicy
    from verispec.proposers.draft import DraftModelProposer

    session = DraftModelProposer(draft, target_vocab_size=vocab).session()
    if not native:
        session.kv.greedy_native = lambda: False
    elif not session.kv.greedy_native():
        return float("nan")
    policy, prompt = DraftPolicy(SamplingParams()), list(range(1, context + 1))
    times = []
    for i in range(steps + 5):
        context_now = prompt + [7 + i % 50]  # a newly verified token each round, as in decoding
        start = time.perf_counter()
        session.propose(context_now, depth, policy)
        if i >= 5:  # warm-up
            times.append(time.perf_counter() - start)
        session.kv.rollback(context)
        del session.cached[context:]
    return statistics.median(times) / depth


if __name__ == "__main__":
    main()
