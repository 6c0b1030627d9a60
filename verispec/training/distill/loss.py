"""The distillation loss and the training steps over the teacher's examples.

Loss: forward KL(p_verifier || q_draft) over the verifier's top-k tokens plus one tail bucket
holding the rest of its mass, which is the exact KL of that coarse-grained distribution,
optionally plus `--ce-weight` times the cross-entropy on the verifier's argmax. Why forward KL:
what sampled speculation accepts is 1 - TVD(p, q), and TVD <= sqrt(KL / 2) (Pinsker), so driving
KL down drives the acceptance bound up; unlike TVD its gradient does not vanish on tokens where q
already exceeds p, and it is mode-covering, so the draft puts mass on the verifier's top choice
even where it is unsure, which is what greedy agreement rewards. The argmax cross-entropy is the
greedy decision itself, as a sharper extra term. `--loss tvd` trains on TVD of the same buckets
directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from verispec.errors import UserError
from verispec.training.loop import Schedule, StepResult, batch_indices, fit

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from verispec.training.distill.command import DistillSettings
    from verispec.training.distill.teacher import Example


def kd_loss(
    logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_logp: torch.Tensor,
    kind: str = "fkl",
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """Per-position loss, (N,), of draft logits (N, V) against the verifier's top-k log-probs (N, k).

    The verifier's distribution is taken as its top-k tokens plus one tail bucket holding the rest
    of the mass; the draft's is bucketed the same way, so the divergence is exact for those buckets."""
    import torch

    logq = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    top_ids = top_ids.long()
    p = top_logp.float().exp()  # (N, k)
    p_tail = (1 - p.sum(-1)).clamp_min(0)  # (N,)
    logq_top = logq.gather(-1, top_ids)  # (N, k)
    logq_tail = logq.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # (N,)
    if kind == "fkl":
        loss = (p * (top_logp.float() - logq_top)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * logq_tail
    elif kind == "tvd":
        loss = 0.5 * ((p - logq_top.exp()).abs().sum(-1) + (p_tail - logq_tail.exp()).abs())
    else:
        raise UserError(f"--loss {kind!r}: use fkl or tvd")
    if ce_weight:
        loss = loss - ce_weight * logq_top[:, 0]  # column 0: the verifier's argmax
    return loss


def collate(
    examples: list[Example], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the flat loss positions with their teacher rows. Right padding
    needs no attention mask: under the causal mask no real position sees a pad after it."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    rows, cols = [], []
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = e.ids.long()
        n = len(e.top_ids)
        rows.append(torch.full((n,), b))
        cols.append(torch.arange(e.start, e.start + n))
    top_ids = torch.cat([e.top_ids for e in examples])
    top_logp = torch.cat([e.top_logp for e in examples])
    return tuple(t.to(device) for t in (ids, torch.cat(rows), torch.cat(cols), top_ids, top_logp))


def batch_loss(
    model: PreTrainedModel, batch: list[Example], settings: DistillSettings, device: torch.device
) -> tuple[torch.Tensor, float, int]:
    """Mean loss over the batch's loss positions, the draft's agreement with the verifier's argmax
    there, and the position count. Output logits are computed at loss positions only."""
    ids, rows, cols, top_ids, top_logp = collate(batch, device)
    hidden = model.base_model(input_ids=ids).last_hidden_state  # (B, T, D)
    logits = model.get_output_embeddings()(hidden[rows, cols])  # (N, V)
    loss = kd_loss(logits, top_ids, top_logp, settings.loss, settings.ce_weight).mean()
    agree = (logits.argmax(-1) == top_ids[:, 0].long()).float().mean().item()
    return loss, agree, len(rows)


def train(
    settings: DistillSettings,
    examples: list[Example],
    device: torch.device,
    log: Callable[[str], None],
    on_step: Callable[[int], None] | None = None,
) -> tuple[PreTrainedModel, dict]:
    """The shared loop of `verispec.training.loop` over the teacher's examples; with `resume`,
    continues from the last checkpoint."""
    s = settings
    schedule = Schedule(s.steps, s.lr, s.warmup, s.weight_decay, s.clip, s.checkpoint_every)

    def step_loss(model: PreTrainedModel, step: int) -> StepResult:
        batch = [examples[i] for i in batch_indices(step, s.batch_size, len(examples), s.seed)]
        loss, agree, positions = batch_loss(model, batch, s, device)
        return StepResult(loss, sum(len(e.ids) for e in batch), positions, agree)

    return fit(s.draft, s.out, schedule, step_loss, device, s.resume, log, "distill", on_step)
