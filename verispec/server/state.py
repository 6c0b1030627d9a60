"""The app's services, one set per app (no module globals), each with one job:

- `Intake` (intake.py): the API keys and rate limits, and the checks a request passes before it
  is queued (model, prompt, token budget, sampling);
- `Safety` (safety.py): the policy gate and what a blocking rule forbids;
- `Records` (records.py): what a request leaves behind: the audit trail and its redactor, the
  traces, the conclusion of each request;
- `Serving` (serving.py): the engine side: the loaded `Service`, its circuit breaker, readiness,
  submission and draining;

with what they share: the settings, the served model's name, the metrics and the CPU worker
(`CpuWorker`). The handlers take the services they use (`completion_routes`, `verify_routes`,
`RequestContext`); `State` only builds them and closes them.
"""

from __future__ import annotations

from verispec.assemble import resolve_models
from verispec.config import ModelSettings, ServerSettings, Settings
from verispec.models.loading import model_name
from verispec.server.intake import Intake
from verispec.server.metrics import ServerMetrics
from verispec.server.records import Records
from verispec.server.safety import Safety
from verispec.server.service import Cluster, EngineFactory
from verispec.server.serving import Serving
from verispec.server.startup import ColdStart
from verispec.server.worker import CpuWorker

API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/verify")


def served_model_name(settings: Settings) -> str:
    """The name the API serves under: --served-model-name, else the target model's."""
    return settings.part(ServerSettings).served_model_name or model_name(
        resolve_models(settings.part(ModelSettings)).target
    )


class State:
    """The app's services (see the module's docstring)."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory, cluster: Cluster | None = None):
        self.settings = settings
        self.server = settings.part(ServerSettings)
        self.model_name = served_model_name(settings)
        max_depth = settings.max_depth if settings.depth == "auto" else max(1, int(settings.depth))
        self.metrics = ServerMetrics(self.model_name, self.server, max_depth)
        self.worker = CpuWorker()
        self.intake = Intake(self.server, self.model_name, settings.max_new_tokens, self.metrics, self.worker)
        cold_start = ColdStart(self.metrics)
        self.records = Records(settings, self.model_name, self.metrics, self.worker, cold_start)
        self.safety = Safety(self.server.policy, self.metrics)
        self.serving = Serving(
            settings, engine_factory, cluster, self.model_name, self.metrics, self.records, cold_start
        )
        self.metrics.precreate(tuple(path for path in API_PATHS if path != "/v1/models"))
        self.metrics.cost_rate("verifier").set(self.records.telemetry_settings.cost_verifier_per_hour)
        self.metrics.cost_rate("proposer").set(self.records.telemetry_settings.cost_proposer_per_hour)

    async def close(self) -> None:
        """At shutdown, once the engine is drained: background records, the audit writer, the
        traces, the CPU worker."""
        await self.records.close()
        self.worker.shutdown()
