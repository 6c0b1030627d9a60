"""Where distillation's prompts and text come from, and which of them are held out for evaluation.

Training sources (one per run): `--prompts` (a JSONL file), `--stdlib-prompts N` (~40-line
windows of this machine's standard library, leaving out the modules the shared prompts are cut
from and the folders the reference pair never trained on), `--audit-db` (the prompts of served
requests, from the audit trail), or `--data` (text: JSONL files, folders or globs of .py files).

Evaluation prompts: `--eval-prompts`, by default the shared prompt set beside this checkout, else
held-out standard-library windows. When training and evaluation prompts come from the same file,
the last `--eval-limit` (default 16) are held out and the rest train.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from verispec.errors import UserError
from verispec.prompts import Prompt, load_prompts, stdlib_windows
from verispec.training.corpus import text_documents

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from verispec.training.distill.command import DistillSettings

# The shared prompts live beside the checkout that holds the verispec package (as the shared models do).
DEFAULT_EVAL_PROMPTS = Path(__file__).resolve().parents[4] / "shared" / "prompts" / "code-completion.jsonl"
SPLIT_EVAL_LIMIT = 16  # held out when training and evaluation prompts share a file


def audit_prompts(url: str, model: str | None = None, since: str | None = None) -> list[Prompt]:
    """The distinct prompts of completed requests in an audit trail (SQLite or PostgreSQL URL): the
    traffic the draft will propose for. Content must have been audited (`--audit-content`) and
    redacted, not hashed; the redaction placeholders (such as <EMAIL>) stay in the text as stored,
    and the verifier's continuations are generated afresh from it. Records without usable content
    are skipped."""
    from verispec.audit.query import parse_time
    from verispec.audit.store import AuditStore

    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise UserError(f"--audit-db: no audit database at {url}; give the server's --audit-url")
    store = AuditStore(url)
    try:
        cutoff = parse_time(since, "--audit-since") if since else None
        rows = [
            r
            for outcome in ("ok", "fallback")
            for r in store.query(since=cutoff, outcome=outcome, model=model)
        ]
    finally:
        store.close()
    seen: set[str] = set()
    prompts = []
    for row in sorted(rows, key=lambda r: r["created_at"]):
        text = row["prompt"]
        if not text or text.startswith("sha256:") or text in seen:
            continue
        seen.add(text)
        prompts.append(Prompt(row["request_id"], text))
    if not prompts:
        raise UserError(
            f"--audit-db {url}: none of {len(rows)} completed requests"
            f"{f' of model {model}' if model else ''} holds a usable prompt; the server must store "
            "content (--audit-content) redacted rather than hashed (--audit-redaction redact)"
        )
    return prompts


def eval_file(settings: DistillSettings) -> Path | None:
    """The evaluation prompts' file: the one given, else the shared set where present; None when
    evaluation is off or falls back to standard-library windows."""
    if settings.no_eval:
        return None
    if settings.eval_prompts is not None:
        return settings.eval_prompts
    return DEFAULT_EVAL_PROMPTS if DEFAULT_EVAL_PROMPTS.is_file() else None


def _same_file(a: Path | str | None, b: Path | None) -> bool:
    return (
        a is not None and b is not None and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    )


def _training_prompts(settings: DistillSettings) -> list[Prompt]:
    if settings.prompts is not None:
        return load_prompts(settings.prompts)
    if settings.stdlib_prompts:
        return stdlib_windows(settings.stdlib_prompts, settings.seed)
    if settings.audit_db:
        return audit_prompts(settings.audit_db, settings.audit_model, settings.audit_since)
    return []  # --data: text, read by `text_chunks`


def split_prompts(settings: DistillSettings) -> tuple[list[Prompt], list[Prompt], str]:
    """Training prompts (empty in --data mode), held-out evaluation prompts, and a line saying how
    they were split. A training prompt whose text is an evaluation prompt's is always dropped."""
    source = eval_file(settings)
    if settings.no_eval:
        evaluation, eval_source = [], ""
    elif source is None:  # no shared prompt set beside this checkout: held-out stdlib text, on every machine
        evaluation = stdlib_windows(32, seed=3, lines=40, held_out=True)
        eval_source = "standard-library windows of the held-out q/r/s modules"
    else:
        evaluation, eval_source = load_prompts(source), str(source)
    training = _training_prompts(settings)
    if _same_file(settings.prompts, source) or any(_same_file(d, source) for d in settings.data):
        held = settings.eval_limit or SPLIT_EVAL_LIMIT
        if held >= len(evaluation):
            raise UserError(
                f"training and evaluation prompts share {source}: --eval-limit {held} "
                f"leaves no training prompt of {len(evaluation)}"
            )
        evaluation, training = evaluation[-held:], training[:-held]
        note = f"training and evaluation share {source}: the last {held} prompts are held out for evaluation"
    else:
        evaluation = evaluation[: settings.eval_limit] if settings.eval_limit else evaluation
        if settings.stdlib_prompts:
            note = f"{settings.stdlib_prompts} stdlib windows (q/r/s modules left out)"
        elif settings.audit_db:
            note = f"{len(training)} distinct prompts of served requests from the audit trail"
        else:
            note = "training data"
        if evaluation:
            note += f"; evaluation on {len(evaluation)} prompts of {eval_source}"
    held_out = {p.text for p in evaluation}
    copies = sum(p.text in held_out for p in training)
    if copies:
        training = [p for p in training if p.text not in held_out]
        note += f"; {copies} training prompts identical to evaluation prompts left out"
        if not training:
            raise UserError(
                "every training prompt is also an evaluation prompt; give other --prompts or --eval-prompts"
            )
    return training, evaluation, note


def prompt_ids(
    settings: DistillSettings, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt]
) -> list[list[int]]:
    """On-policy: each prompt's tokens, left-trimmed to leave room for --max-new-tokens in
    --seq-len; prompts that tokenize to nothing are dropped."""
    keep = settings.seq_len - settings.max_new_tokens
    if keep < 8:
        raise UserError(
            f"--seq-len {settings.seq_len} leaves no room for a prompt before {settings.max_new_tokens} new tokens"
        )
    return [ids[-keep:] for ids in (tokenizer(p.text).input_ids for p in prompts) if ids]


def text_chunks(
    settings: DistillSettings, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt]
) -> list[list[int]]:
    """Text mode: the prompts' own text, or the --data documents, each followed by EOS as in
    pre-training, cut into --seq-len chunks; no more of them (chosen by --seed) than the run
    trains on, so the verifier scores none in vain."""
    import torch

    texts = [p.text for p in prompts] if prompts else text_documents(settings.data)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text).input_ids + [eos])
    length = settings.seq_len
    chunks = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]
    if not chunks:
        raise UserError(f"the training text holds {len(stream)} tokens, fewer than --seq-len {length}")
    needed = min(len(chunks), settings.steps * settings.batch_size)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(settings.seed))[
        :needed
    ].tolist()
    return [chunks[i] for i in sorted(order)]
