"""The loaded service behind the API: the engine, the scheduler, the router with its canary and the
proposers it routes to, and the names and weights hashes of the models that answer.

`Service.load` runs once, in the background (or, on a Ray replica, before the replica is routed
to): it loads the models, measures the step costs, runs one warm-up request, and starts the
engine thread. Until it returns the API answers 503 (`Serving.ready`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from verispec.assemble import build_proposers, resolve_models
from verispec.audit.records import Identity
from verispec.config import ModelSettings, RoutingSettings, SamplingParams, Settings
from verispec.core.engine import Engine
from verispec.models.loading import numeric_model, weights_digest
from verispec.proposers.base import Proposer
from verispec.server.breaker import CircuitBreaker
from verispec.server.job import Job
from verispec.server.metrics import ServerMetrics
from verispec.server.routing import Canary, Decision, ProposerBandit, Router
from verispec.server.scheduler import CostModel, Scheduler

log = logging.getLogger("verispec.server")

EngineFactory = Callable[[Settings], Engine]


@dataclass(frozen=True)
class Cluster:
    """What a replica of a Ray Serve deployment shares with the others (`verispec/scale/`); a
    single-process server has none. The app loads its models before it starts (the replica is
    routed to only once it is warm), its /metrics carries every replica's series with a `replica`
    label, and its canary's verdict is the deployment's."""

    replica: str
    metrics: Callable[[bytes], bytes]  # this replica's exposition -> every replica's, labelled
    canary: Callable[..., Canary]  # builds the deployment-wide canary (Canary's arguments)


@dataclass
class Service:
    """What the API needs once the models are loaded."""

    engine: Engine
    scheduler: Scheduler
    router: Router
    identity: Identity  # the server's default models
    identities: dict[str, Identity] = field(default_factory=dict)  # per proposer name, and "edge"
    paths: dict[str, dict] = field(default_factory=dict)  # per model role: its kernel-step report

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @classmethod
    def load(
        cls, settings: Settings, engine_factory: EngineFactory, model_name: str, metrics: ServerMetrics,
        breaker: CircuitBreaker, cluster: Cluster | None,
    ) -> Service:
        """Load, calibrate, warm up and start the engine thread (minutes on a large model)."""
        started = time.perf_counter()
        engine = engine_factory(settings)
        models = resolve_models(settings.part(ModelSettings))
        router = _router(engine, models.proposer, settings, metrics, cluster)
        # Pass and draft costs, measured now rather than during the first request: depth auto needs
        # them, and the cost model prices the verifier-only counterfactual with the one-token step.
        engine.prepare(list(router.proposers.values()))
        token_s = engine.costs().verify(1) if engine.proposer is not None else None
        warm_prompt = engine.tokenizer("def main():").input_ids or [0]
        engine.generate(warm_prompt, SamplingParams(max_new_tokens=4), depth=0)  # the verifier's kernels; no proposer call
        model_version = weights_digest(models.target) + numeric_model(models.weights_dtype, models.activations)
        identities = {name: _identity(p, model_name, model_version, settings) for name, p in router.proposers.items()}
        identities["edge"] = Identity(model_name, model_version, "edge", "client")  # verify-API sessions
        cost = CostModel(settings.cost_verifier_per_hour, settings.cost_proposer_per_hour, token_s)
        scheduler = Scheduler(engine, settings, breaker, metrics, cost)
        # The default proposer's identity is already among them (its weights are hashed once).
        service = cls(engine, scheduler, router, identities[models.proposer], identities)
        scheduler.on_finished = service._routed(metrics)
        scheduler.start()
        roles = {"target": engine.target, "draft": getattr(engine.proposer, "lm", None)}
        for role, lm in roles.items():
            report = getattr(lm, "path_report", None)  # the lean backend reports its kernel step
            if report is not None:
                service.paths[role] = report()
                metrics.observe_path(role, service.paths[role])
        log.info(
            "ready: %s loaded and warmed in %.1fs", model_name, time.perf_counter() - started,
            extra={"model_version": model_version, "proposer": service.identity.proposer,
                   "proposer_version": service.identity.proposer_version},
        )  # fmt: skip
        return service

    def _routed(self, metrics: ServerMetrics) -> Callable[[Job], None]:
        """Feedback from a finished request to the per-request choice and the canary (engine thread)."""

        def finished(job: Job) -> None:
            if job.pinned:
                return
            stats, router = job.stats, self.router
            failures = stats.proposer_failures + stats.proposer_timeouts
            # job.engine_s: the whole cost of its rounds, other requests' rounds not counted
            router.finished(job.proposer, job.route_key, stats.proposed, stats.accepted, stats.generated_tokens, job.engine_s, failures)
            if router.bandit is not None:
                for name, mean in router.bandit.means().items():
                    metrics.proposer_throughput(name).set(mean)
            if router.canary is not None:
                for arm, figures in router.canary.arms.items():
                    if figures.acceptance:
                        metrics.canary_acceptance(arm).set(sum(figures.acceptance) / len(figures.acceptance))

        return finished


def _router(engine: Engine, configured: str, settings: Settings, metrics: ServerMetrics, cluster: Cluster | None) -> Router:
    """The proposers a request may be routed to, the per-request choice among them, and the canary."""
    routing = settings.part(RoutingSettings)
    proposers = build_proposers(engine, settings)
    for name in proposers:
        metrics.proposer_requests(name)
    bandit = ProposerBandit(list(routing.proposers)) if len(routing.proposers) > 1 else None
    canary = None
    if routing.canary_draft:

        def state(decision: Decision) -> None:
            metrics.canary_state.set(2 if decision.verdict == "promote" else 3)

        def decided(decision: Decision) -> None:
            metrics.canary_decisions(decision.verdict).inc()
            state(decision)

        figures = (routing.canary_fraction, routing.canary_min_requests, routing.canary_alpha, routing.canary_margin)
        if cluster is None:
            canary = Canary(*figures, on_decision=decided)
        else:  # judged once for the deployment; a verdict reached on another replica is adopted, not counted
            canary = cluster.canary(*figures, on_decision=decided, on_adopted=state)
        metrics.canary_state.set(1)
        for verdict in ("promote", "rollback"):
            metrics.canary_decisions(verdict)
    default = configured if bandit is None else routing.proposers[0]
    return Router(proposers, default, bandit, canary, "canary" if canary else None)


def _identity(proposer: Proposer | None, model_name: str, model_version: str, settings: Settings) -> Identity:
    """Names and versions of the models behind a proposer: weights hashes, or the n-gram settings."""
    proposer = proposer.name if proposer is not None else "none"
    if proposer.startswith("draft:"):
        version = weights_digest(proposer.removeprefix("draft:"))
    elif proposer.startswith("ngram"):
        version = f"ngram:{settings.ngram_min}-{settings.ngram_max}"
    else:
        version = proposer
    return Identity(model_name, model_version, proposer, version)
