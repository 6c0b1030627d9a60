"""Held-out evaluation: greedy agreement of draft and verifier, before and after distillation.

Under greedy verification a draft token is accepted when it is the verifier's argmax, so the
figure is teacher-forced agreement along the verifier's own greedy continuation: the share of its
tokens that are also the draft's argmax given the same prefix. The verifier's continuations are
the one costly part (the draft's side is a single pass per prompt), so they are computed once and
cached in out/eval-verifier.pt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from verispec.training.distill.teacher import fingerprint, greedy

if TYPE_CHECKING:
    import torch

    from verispec.models.backend import CausalLM
    from verispec.training.distill.command import DistillSettings


def verifier_continuations(
    settings: DistillSettings,
    verifier: CausalLM,
    prompts: list[list[int]],
    eos: frozenset[int],
    log: Callable[[str], None],
) -> list[list[int]]:
    """The verifier's greedy continuation of each evaluation prompt (its verifier-only output),
    cached in out/eval-verifier.pt."""
    import torch
    from tqdm import tqdm

    from verispec.models.loading import weights_digest

    path = settings.out / "eval-verifier.pt"
    digest = fingerprint(weights_digest(settings.target), prompts, settings.eval_new_tokens, sorted(eos))
    if path.is_file():
        cached = torch.load(path)
        if cached["fingerprint"] == digest:
            return cached["continuations"]
    log(
        f"verifier greedy continuations of {len(prompts)} evaluation prompts ({settings.eval_new_tokens} tokens each)"
    )
    size = settings.gen_batch_size
    continuations: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), size), desc="eval verifier", unit="batch", file=sys.stderr):
        decoded = greedy(verifier, prompts[start : start + size], settings.eval_new_tokens, eos)
        continuations.extend(d.tokens for d in decoded)
    torch.save({"fingerprint": digest, "continuations": continuations}, path)
    return continuations


def agreement(
    draft: str, prompts: list[list[int]], continuations: list[list[int]], device: torch.device
) -> dict:
    """Teacher-forced greedy agreement: the share of the verifier's tokens that are also the
    draft's argmax given the same prefix. The draft is loaded as `verispec generate` loads it."""
    import torch

    from verispec.models.loading import load_model

    model = load_model(draft, device, torch.float32, role="draft")
    agreed = total = 0
    per_prompt = []
    for ids, cont in zip(prompts, continuations, strict=True):
        logits = model.session(capacity=len(ids) + len(cont)).extend(ids + cont[:-1])  # (T, V)
        guesses = logits[len(ids) - 1 :].argmax(-1).tolist()
        hits = sum(g == t for g, t in zip(guesses, cont, strict=True))
        agreed += hits
        total += len(cont)
        per_prompt.append(hits / len(cont))
    return {
        "agreement": agreed / total,
        "positions": total,
        "prompts": len(prompts),
        "per_prompt": per_prompt,
    }
