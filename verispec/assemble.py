"""Settings in, a ready engine out: resolve defaults, load models, refuse bad pairs."""

from __future__ import annotations

import logging

import torch

from verispec.config import ModelSettings, Settings, SpeculationSettings
from verispec.core.engine import SpeculativeEngine
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
from verispec.models.loading import DEMO_DRAFT, DEMO_TARGET
from verispec.proposers import ProposerInputs, build_proposer

log = logging.getLogger(__name__)


def resolve_models(models: ModelSettings) -> ModelSettings:
    """Fill in the built-in demo pair when no target is named, and pick the proposer for 'auto'."""
    target, draft = models.target, models.draft
    if target is None:
        target, demo_draft = demo_pair()
        if draft is None and models.proposer in ("auto", "draft"):
            draft = demo_draft
    proposer = models.proposer
    if proposer == "auto":
        proposer = "draft" if draft else "ngram"
    if proposer == "draft" and not draft:
        raise UserError("--proposer draft needs a draft model: pass --draft PATH (or use --proposer ngram)")
    if proposer != "draft" and draft and models.draft:
        log.warning("ignoring --draft %s: the proposer is %s", draft, proposer)
    return models.model_copy(update={"target": target, "draft": draft if proposer == "draft" else None, "proposer": proposer})


def _load(models: ModelSettings, ref: str, role: str, device: torch.device, dtype: torch.dtype) -> CausalLM:
    return load_model(
        ref, device, dtype, role=role, backend=models.backend, cpu_kernel=models.cpu_kernel, compile=models.compile,
        weights_dtype=models.weights_dtype,
    )  # fmt: skip


def build_engine(settings: Settings) -> SpeculativeEngine:
    models = resolve_models(settings.part(ModelSettings))
    speculation = settings.part(SpeculationSettings)
    device, dtype = resolve_device(models.device), resolve_dtype(models.dtype)

    tokenizer = load_tokenizer(models.target, role="target")
    draft_lm = None
    if models.draft:
        check_compatible(tokenizer, load_tokenizer(models.draft, role="draft"))
        draft_lm = _load(models, models.draft, "draft", device, dtype)
    target_lm = _load(models, models.target, "target", device, dtype)
    proposer = build_proposer(models.proposer, ProposerInputs(target=target_lm, draft=draft_lm, speculation=speculation))
    return SpeculativeEngine(target_lm, tokenizer, proposer, speculation)


def proposer_engines(engine: SpeculativeEngine, settings: Settings) -> dict[str, SpeculativeEngine]:
    """Engines sharing `engine`'s verifier, one per proposer named in --proposers, plus 'canary'
    for --canary-draft. Each keeps its own step costs (a draft's cost differs from an n-gram's)."""
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

    engines: dict[str, SpeculativeEngine] = {}
    for name in routing.proposers:
        if name == models.proposer:
            engines[name] = engine  # the configured one, already built
            continue
        draft = None
        if name == "draft":
            ref = models.draft or (str(DEMO_DRAFT) if models.target == str(DEMO_TARGET) else None)
            if ref is None:
                raise UserError("--proposers draft needs a draft model: pass --draft PATH")
            draft = draft_lm(ref, "draft")
        inputs = ProposerInputs(target=engine.target, draft=draft, speculation=speculation)
        engines[name] = SpeculativeEngine(engine.target, engine.tokenizer, build_proposer(name, inputs), speculation)
    if routing.canary_draft:
        inputs = ProposerInputs(target=engine.target, draft=draft_lm(routing.canary_draft, "canary draft"), speculation=speculation)
        engines["canary"] = SpeculativeEngine(engine.target, engine.tokenizer, build_proposer("draft", inputs), speculation)
    return engines
