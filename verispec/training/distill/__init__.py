"""`verispec distill`: train a draft to agree with its verifier (knowledge distillation, DistillSpec-style).

A draft is only as useful as its agreement with the verifier: under greedy verification a draft
token is accepted when it is the verifier's argmax, so the figure to raise is the greedy
agreement rate along the verifier's own output. The draft is fine-tuned on the verifier's
next-token distributions, and that rate is measured before and after, on held-out prompts.

Training data, two modes:
- on-policy (the default for prompts: `--prompts`, `--stdlib-prompts`, or `--audit-db`, the prompts
  of served requests from the audit trail): the verifier first greedy-decodes a continuation of
  every prompt; the draft is then trained on the continuation positions, which are exactly the
  contexts it will see when proposing for this verifier (DistillSpec, Zhou et al. 2023). The
  verifier's distributions come out of that same decode, so the teacher costs nothing beyond the
  generation.
- text (`--data`, or `--off-policy`): chunks of given text, with the verifier's distributions at
  every position from one pass per chunk.
Either way the teacher is computed once, kept as its top-k log-probabilities per position (the
rest of the vocabulary as one tail bucket), and cached under `--out/teacher`, so epochs and a
`--resume` never rerun the verifier.

The rooms, in the order of a run: `data.py` (prompt sources and the held-out split),
`evaluation.py` (agreement before and after), `teacher.py` (the verifier's greedy continuations
and top-k targets), `loss.py` (the divergence and the training steps), `command.py` (the
settings, the flags and the whole run).

torch, transformers and the model loaders are imported inside the functions that use them:
`verispec` imports this package to build its command line for every command, `--help` included.
"""

from verispec.training.distill.command import DistillSettings, add_distill_command, distill
from verispec.training.distill.data import DEFAULT_EVAL_PROMPTS, audit_prompts, split_prompts
from verispec.training.distill.evaluation import agreement, verifier_continuations
from verispec.training.distill.loss import batch_loss, kd_loss
from verispec.training.distill.teacher import Decoded, Example, build_teacher, greedy

__all__ = [
    "DEFAULT_EVAL_PROMPTS",
    "Decoded",
    "DistillSettings",
    "Example",
    "add_distill_command",
    "agreement",
    "audit_prompts",
    "batch_loss",
    "build_teacher",
    "distill",
    "greedy",
    "kd_loss",
    "split_prompts",
    "verifier_continuations",
]
