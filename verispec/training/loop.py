"""The optimisation loop `verispec train` and `verispec distill` share.

AdamW with linear warm-up and cosine decay to a tenth of the peak rate, gradient-norm clipping, a
progress bar, a checkpoint every N steps (weights, optimizer, RNG, history; the last two kept),
and resume from the last checkpoint. Batches are a pure function of (seed, step), so a resumed
run trains on exactly what an uninterrupted one would.

torch, transformers and tqdm are imported inside the functions that use them: `verispec` imports
this module (through train.py and distill/) to build its command line for every command, `--help`
included, and importing them costs seconds."""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from verispec.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    warmup: int | None = None  # default: 5% of steps
    weight_decay: float = 0.0
    clip: float = 1.0
    checkpoint_every: int = 50

    def factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of the peak rate."""
        warmup = self.warmup if self.warmup is not None else max(1, self.steps // 20)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class StepResult:
    loss: torch.Tensor
    tokens: int  # sequence tokens the step read
    positions: int  # positions it put a loss on
    agree: float | None = None  # share of loss positions where the model's argmax is the target's


def inference_mode(function: Callable) -> Callable:
    """`@torch.inference_mode()` with torch imported at the first call rather than at import."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return function(*args, **kwargs)

    return run


@functools.lru_cache(maxsize=4)
def _epoch_order(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    import torch

    return tuple(
        torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    )


def batch_indices(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """The items of a step, out of `count`: each epoch is a fresh seeded permutation."""
    return [
        _epoch_order(count, seed, g // count)[g % count]
        for g in range(step * batch_size, (step + 1) * batch_size)
    ]


def checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    found = [p for p in folder.glob("step-*") if (p / "trainer.pt").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    out: Path, step: int, model, optimizer, history: dict, keep: int = 2, extra: dict | None = None
) -> None:
    """out/checkpoints/step-N: the model (a Hugging Face model's folder, or a plain module's
    state_dict in trainer.pt), the optimizer, RNG states, history and `extra`; the last `keep` kept."""
    import torch

    folder = out / "checkpoints" / f"step-{step:06d}"
    partial = folder.with_name(f".{folder.name}.partial")  # not matched by step-*
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "history": history,
        **(extra or {}),
    }
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(partial)
    else:
        state["model"] = model.state_dict()
    torch.save(state, partial / "trainer.pt")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # a checkpoint folder with trainer.pt is complete
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)


def claim_run(out: Path, fields: dict, resume: bool) -> None:
    """Make `out` this run's folder: refuse one holding an earlier run's checkpoints unless
    resuming, and a resume whose training options differ from that run's (out/run.json)."""
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if checkpoints(out):
        if not resume:
            raise UserError(
                f"{out} holds checkpoints of an earlier run; pass --resume to continue it or choose another --out"
            )
        earlier = json.loads(run_file.read_text()) if run_file.is_file() else {}
        changed = sorted(k for k in fields if k in earlier and earlier[k] != fields[k])
        if changed:
            raise UserError(
                f"--resume: {', '.join(changed)} differ from the run in {out}; give the same options or choose another --out"
            )
    run_file.write_text(json.dumps(fields, indent=2) + "\n")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def fit(
    start_from: str | Path,
    out: Path,
    schedule: Schedule,
    step_loss: Callable[[PreTrainedModel, int], StepResult],
    device: torch.device,
    resume: bool,
    log: Callable[[str], None],
    desc: str,
    on_step: Callable[[int], None] | None = None,
    on_checkpoint: Callable[[PreTrainedModel, int, dict], None] | None = None,
) -> tuple[PreTrainedModel, dict]:
    """Train the model in `start_from` (a Hugging Face folder) for `schedule.steps` steps, each
    step's loss from `step_loss(model, step)`; with `resume`, continue from out/checkpoints."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    found = checkpoints(out)
    start = 0
    history: dict = {"loss": [], "agree": [], "positions": 0, "tokens": 0, "wall_s": 0.0, "cpu_s": 0.0}
    state = None
    if found and resume:
        start_from = found[-1]
        state = torch.load(found[-1] / "trainer.pt", weights_only=False)
        start, history = state["step"], state["history"]
        log(f"resuming from {found[-1]} (step {start} of {schedule.steps})")
    model = AutoModelForCausalLM.from_pretrained(start_from, dtype=torch.float32).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, betas=(0.9, 0.95), weight_decay=schedule.weight_decay
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    bar = tqdm(
        range(start, schedule.steps),
        initial=start,
        total=schedule.steps,
        desc=desc,
        unit="step",
        file=sys.stderr,
    )
    for step in bar:
        wall, cpu = time.perf_counter(), time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr * schedule.factor(step)
        result = step_loss(model, step)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.clip)
        optimizer.step()
        history["loss"].append(result.loss.item())
        if result.agree is not None:
            history["agree"].append(result.agree)
        history["positions"] += result.positions
        history["tokens"] += result.tokens
        history["wall_s"] += time.perf_counter() - wall
        history["cpu_s"] += time.process_time() - cpu
        postfix = {"loss": f"{mean(history['loss'][-20:]):.3f}"}
        if history["agree"]:
            postfix["agree"] = f"{mean(history['agree'][-20:]):.3f}"
        bar.set_postfix(postfix)
        if (step + 1) % schedule.checkpoint_every == 0 or step + 1 == schedule.steps:
            if on_checkpoint is not None:
                model.eval()
                on_checkpoint(model, step + 1, history)
                model.train()
            save_checkpoint(out, step + 1, model, optimizer, history)
        if on_step is not None:
            on_step(step + 1)
    bar.close()
    model.eval()
    return model, history


def save_final(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, dtype: str) -> None:
    """A Hugging Face model folder: config, safetensors weights, the tokenizer."""
    import torch

    shutil.rmtree(folder, ignore_errors=True)
    weights = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    model.to(weights).save_pretrained(folder)
    model.to(torch.float32)
    tokenizer.save_pretrained(folder)
    for file in folder.iterdir():  # safetensors writes 0600; a server under another user must read it
        file.chmod(0o644)


def finish_report(
    report: dict, path: Path, started_wall: float, started_cpu: float, device: torch.device
) -> dict:
    """Add the run's wall and CPU time, threads and device to its report, and write it as JSON."""
    import torch

    report["wall_s"] = time.perf_counter() - started_wall
    report["cpu_s"] = time.process_time() - started_cpu
    report["threads"] = torch.get_num_threads()
    report["device"] = str(device)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report
