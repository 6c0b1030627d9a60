"""Settings in, a ready engine out: resolve defaults, load models, refuse bad pairs, pick the runner."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from verispec.config import BatchSettings, ModelSettings, Settings, SpeculationSettings
from verispec.core.engine import Engine
from verispec.core.rounds import stop_tokens
from verispec.core.runner import ModelRunner, batchable
from verispec.core.session_runner import SessionRunner
from verispec.errors import UserError
from verispec.models import (
    CausalLM,
    check_compatible,
    demo_pair,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from verispec.models.head import is_head, load_head
from verispec.models.loading import DEMO_DRAFT, DEMO_TARGET
from verispec.proposers import ProposerInputs, build_proposer
from verispec.proposers.base import Proposer

log = logging.getLogger(__name__)


def resolve_models(models: ModelSettings) -> ModelSettings:
    """Fill in the built-in demo pair when no target is named, and pick the proposer for 'auto'."""
    target, draft = models.target, models.draft
    if target is None:
        target, demo_draft = demo_pair()
        if draft is None and models.proposer in ("auto", "draft"):
            draft = demo_draft
    proposer = models.proposer
    head = is_head(draft)
    if proposer == "auto":
        proposer = "head" if head else "draft" if draft else "ngram"
    if proposer == "draft" and head:
        raise UserError(f"--draft {draft} is a draft head, not a draft model: use --proposer head (or auto)")
    if proposer == "draft" and not draft:
        raise UserError("--proposer draft needs a draft model: pass --draft PATH (or use --proposer ngram)")
    if proposer == "head" and not head:
        raise UserError("--proposer head needs a draft head: pass --draft PATH, a folder made by verispec distill --head")
    drafts = proposer in ("draft", "head")
    if not drafts and draft and models.draft:
        log.warning("ignoring --draft %s: the proposer is %s", draft, proposer)
    return models.model_copy(update={"target": target, "draft": draft if drafts else None, "proposer": proposer})


def check_models(settings: Settings) -> None:
    """Refuse, before another process starts on them, models that cannot be loaded together: a
    missing path, a draft whose tokenizer differs. A Ray actor's or replica's failure reads far worse."""
    from verispec.config import RoutingSettings

    models = resolve_models(settings.part(ModelSettings))
    tokenizer = load_tokenizer(models.target, role="target")
    for ref, role in ((models.draft, "draft"), (settings.part(RoutingSettings).canary_draft, "canary draft")):
        if ref and not is_head(ref):  # a head has the verifier's tokenizer by construction
            check_compatible(tokenizer, load_tokenizer(ref, role=role))


MODEL_REFS = ("target", "draft", "canary_draft")


def portable_model_refs(values: dict) -> dict:
    """Settings values with local model paths made absolute, for processes whose working folder is
    not this one (Ray actors and replicas); hub ids and absent entries stay as they are."""
    values = dict(values)
    for name in MODEL_REFS:
        ref = values.get(name)
        if ref is not None and Path(ref).expanduser().exists():
            values[name] = str(Path(ref).expanduser().resolve())
    return values


def _load(models: ModelSettings, ref: str, role: str, device: torch.device, dtype: torch.dtype) -> CausalLM:
    return load_model(
        ref, device, dtype, role=role, backend=models.backend, cpu_kernel=models.cpu_kernel, compile=models.compile,
        weights_dtype=models.weights_dtype, activations=models.activations,
    )  # fmt: skip


def build_engine(settings: Settings) -> Engine:
    """The engine over the configured target, with the configured proposer as its default."""
    models = resolve_models(settings.part(ModelSettings))
    speculation = settings.part(SpeculationSettings)
    device, dtype = resolve_device(models.device), resolve_dtype(models.dtype)

    tokenizer = load_tokenizer(models.target, role="target")
    draft_lm = head = None
    if models.draft and not is_head(models.draft):
        check_compatible(tokenizer, load_tokenizer(models.draft, role="draft"))
        draft_lm = _load(models, models.draft, "draft", device, dtype)
    target_lm = _load(models, models.target, "target", device, dtype)
    if models.draft and is_head(models.draft):
        head = load_head(models.draft, target_lm)
    inputs = ProposerInputs(target=target_lm, draft=draft_lm, speculation=speculation, head=head)
    proposer = build_proposer(models.proposer, inputs)
    runner = _runner(target_lm, settings.part(BatchSettings))
    return Engine(runner, tokenizer, stop_tokens(target_lm, tokenizer), settings.part(BatchSettings), settings.max_running, proposer, speculation)


def _runner(lm: CausalLM, batch: BatchSettings):
    """The batched runner (every running request in one verifier pass) where the backend batches
    and --scheduler allows; else each sequence's round on its own KV session, in turn."""
    why_not = batchable(lm)
    if batch.scheduler == "interleaved" or (why_not and batch.scheduler == "auto"):
        log.info("scheduler: interleaved (%s)", why_not or "--scheduler interleaved")
        return SessionRunner(lm, batch.kv_block_size)
    if why_not:
        raise UserError(f"--scheduler batched is not available: {why_not}; use --scheduler interleaved or the lean backend")
    try:
        runner = ModelRunner(lm, batch.kv_cache_bytes, batch.kv_block_size, batch.prefix_cache)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    log.info(
        "scheduler: batched (%d KV blocks of %d positions, %d rows per pass)",
        runner.pool.num_blocks, runner.pool.block_size, batch.max_pass_tokens,
    )  # fmt: skip
    return runner


def build_proposers(engine: Engine, settings: Settings) -> dict[str, Proposer | None]:
    """The proposers a request may be routed to, by name, all drafting for `engine`'s verifier:
    the configured one (the engine's default), one per name in --proposers, and 'canary' for
    --canary-draft. None is verifier-only."""
    from verispec.config import RoutingSettings

    routing = settings.part(RoutingSettings)
    models = resolve_models(settings.part(ModelSettings))
    speculation = settings.part(SpeculationSettings)
    device, dtype = engine.target.device, resolve_dtype(models.dtype)
    drafts: dict[str, object] = {}

    def draft_lm(ref: str, role: str):
        if ref not in drafts:
            check_compatible(engine.tokenizer, load_tokenizer(ref, role=role))
            drafts[ref] = _load(models, ref, role, device, dtype)
        return drafts[ref]

    proposers: dict[str, Proposer | None] = {models.proposer: engine.proposer}
    for name in routing.proposers:
        if name in proposers:
            continue
        draft = head = None
        if name == "head":
            ref = settings.part(ModelSettings).draft  # as given: --proposer may have set it aside
            if not is_head(ref):
                raise UserError("--proposers head needs a draft head: pass --draft PATH, a folder made by verispec distill --head")
            head = load_head(ref, engine.target)
        elif name == "draft":
            ref = models.draft or (str(DEMO_DRAFT) if models.target == str(DEMO_TARGET) else None)
            if ref is None:
                raise UserError("--proposers draft needs a draft model: pass --draft PATH")
            draft = draft_lm(ref, "draft")
        inputs = ProposerInputs(target=engine.target, draft=draft, speculation=speculation, head=head)
        proposers[name] = build_proposer(name, inputs)
    if routing.canary_draft and is_head(routing.canary_draft):  # a new head on probation
        inputs = ProposerInputs(target=engine.target, draft=None, speculation=speculation, head=load_head(routing.canary_draft, engine.target))
        proposers["canary"] = build_proposer("head", inputs)
    elif routing.canary_draft:
        inputs = ProposerInputs(target=engine.target, draft=draft_lm(routing.canary_draft, "canary draft"), speculation=speculation)
        proposers["canary"] = build_proposer("draft", inputs)
    return proposers
