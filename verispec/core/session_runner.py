"""The runner's interface over a backend that cannot batch sequences in one pass (the transformers
backend, lean GPT-2, a `--compile`d lean model): each segment of a pass runs in turn on its
sequence's own KV session (`models/backend.py`), so the one engine serves these backends too, a
pass costing what its sequences' rounds cost one after another (the interleaved scheduling such a
backend allows).

The block pool only does the engine's bookkeeping here (admission, reservations); the keys and
values live in each sequence's session, kept on its block table (`BlockTable.state`) and
dropped with its blocks. A segment that starts before the session's end (rejected drafts, a
preempted request recomputed) rolls the session back first, never recomputing the kept prefix.
Prompts are read whole, as such a backend reads them (`chunks_prompts`), and there is no prefix
cache (the session holds no shareable blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verispec.core.kv_cache import BlockPool
from verispec.core.runner import Segment
from verispec.models.backend import CausalLM

UNKNOWN_WINDOW = 32768  # positions assumed for the bookkeeping where a model states no window
SEQUENCES = 64  # sequences the bookkeeping pool holds at full window


class SessionRunner:
    batches = False  # a pass runs its segments one after another
    chunks_prompts = False  # a prompt is read in one go
    features = False  # no hidden states come out of a session's pass (a draft head cannot run here)

    def __init__(self, lm: CausalLM, block_size: int = 16):
        self.lm = lm
        window = lm.max_positions or UNKNOWN_WINDOW
        self.pool = BlockPool(SEQUENCES * (window // block_size + 1), block_size, prefix_cache=False)

    @torch.inference_mode()
    def forward(self, segments: Sequence[Segment]) -> list[torch.Tensor | None]:
        """Run each segment on its sequence's session; per segment the logits of its wanted rows
        (n, V) float32, or None."""
        out: list[torch.Tensor | None] = []
        for segment in segments:
            table = segment.table
            table.reserve(segment.start + len(segment.tokens))
            session = table.state
            if session is None:
                session = table.state = self.lm.session(capacity=table.capacity)
            if segment.start < session.length:
                session.rollback(segment.start)
            if segment.start != session.length:
                raise RuntimeError(f"segment at position {segment.start} of a sequence whose session holds {session.length}")
            wanted = segment.wanted
            logits = session.extend(segment.tokens, last_only=wanted <= 1)
            out.append(logits[-wanted:] if wanted else None)
        return out
