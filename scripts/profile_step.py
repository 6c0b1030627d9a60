"""Where the time of one speculative round goes: profile a decode step (width 1) and a verify
step (width k+1) of the verifier, and a draft step, on the chosen backend.

    python scripts/profile_step.py [--target T] [--draft D] [--backend lean|transformers] [--width 4]

Prints the weight bytes each step has to stream, which on a CPU bounds a step from below (bytes /
memory bandwidth), and where the step's time goes: on the lean backend's CPU kernel step, the
time of each kernel call summed by operation (the kernels run outside torch, where its profiler
cannot see); otherwise torch.profiler's operator table.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from verispec.models import kernels, lean, load_model, reference_pair


def weight_bytes(lm) -> int:
    """Bytes of weight a pass streams (the embedding table is only gathered from)."""
    model = getattr(lm, "model", None)
    if model is not None:
        return sum(t.numel() * t.element_size() for t in model.parameters())
    return sum(linear.nbytes for linear in lm.linears())


def profile_step(lm, label: str, width: int, context: int = 400, steps: int = 20) -> None:
    session = lm.session()
    session.extend(list(range(1, context + 1)))
    tokens = list(range(5, 5 + width))
    for _ in range(5):  # warm-up
        session.extend(tokens)
        session.rollback(context)
    gb = weight_bytes(lm) / 1e9
    if getattr(lm, "kernel_step", False):
        per_step, table = _time_kernel_calls(lm, session, tokens, context, steps)
    else:
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                session.extend(tokens)
                session.rollback(context)
        per_step = (time.perf_counter() - t0) / steps
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    print(f"\n== {label}: width {width}, context {context}: {per_step * 1e3:.2f} ms per step; "
          f"weights {gb * 1e3:.0f} MB -> {gb / per_step:.1f} GB/s if weight-streaming bound")
    print(table)


def _time_kernel_calls(lm, session, tokens, context: int, steps: int) -> tuple[float, str]:
    """Run `steps` passes with every kernel call timed; the rest of the pass is Python and torch."""
    names = {id(getattr(layer, n)): n for layer in lm.layers for n in ("qkv", "o", "gate_up", "down")}
    names[id(lm.lm_head)] = "lm_head"
    spent: dict[str, float] = defaultdict(float)
    library = kernels.kernel_library()

    class Timed:
        def __getattr__(self, name):
            function = getattr(library, name)

            def call(*args):
                start = time.perf_counter()
                function(*args)
                spent[name] += time.perf_counter() - start

            return call

    plain_into = kernels.Linear.into

    def timed_into(linear, *args, **kwargs):
        start = time.perf_counter()
        plain_into(linear, *args, **kwargs)
        spent[f"linear {names.get(id(linear), '?')}"] += time.perf_counter() - start

    lean.kernel_library, kernels.Linear.into = (lambda: Timed()), timed_into
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            session.extend(tokens)
            session.rollback(context)
        total = time.perf_counter() - t0
    finally:
        lean.kernel_library, kernels.Linear.into = kernels.kernel_library, plain_into
    rows = sorted(spent.items(), key=lambda item: -item[1])
    rows.append(("python and torch (embedding, buffers, dispatch)", total - sum(spent.values())))
    lines = [f"  {name:<48} {seconds / steps * 1e3:7.3f} ms  {seconds / total:6.1%}" for name, seconds in rows]
    return total / steps, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair = reference_pair()
    parser.add_argument("--target", default=pair[0] if pair else None)
    parser.add_argument("--draft", default=pair[1] if pair else None)
    parser.add_argument("--backend", default="lean")
    parser.add_argument("--width", type=int, default=4, help="verify pass width (depth + 1)")
    args = parser.parse_args()
    cpu, f32 = torch.device("cpu"), torch.float32
    target = load_model(args.target, cpu, f32, backend=args.backend)
    profile_step(target, "verifier decode", 1)
    profile_step(target, "verifier verify", args.width)
    if args.draft:
        profile_step(load_model(args.draft, cpu, f32, role="draft", backend=args.backend), "draft step", 1)


if __name__ == "__main__":
    main()
