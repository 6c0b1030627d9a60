"""Traces and GenAI metrics, OpenTelemetry, following its GenAI semantic conventions.

A request is one span, `text_completion {model}` or `chat {model}`, continuing the caller's trace
when a `traceparent` header came in. Its children are the speculation rounds, each with a
`propose`, `verify` and `accept` child. Rounds run on the engine thread; their spans are made when
the request ends, from the timestamps each round carries, so the engine knows nothing of tracing.
The `gen_ai.server.*` histograms use the buckets the conventions give.

Nothing is exported unless `--otlp-endpoint` names a collector (OTLP over HTTP); then traces go to
ENDPOINT/v1/traces and metrics to ENDPOINT/v1/metrics. No global provider is installed: each app
owns its providers, so tests can run several.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from verispec.config import TelemetrySettings
from verispec.core.rounds import Round

log = logging.getLogger(__name__)

REQUEST_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]


class Telemetry:
    def __init__(self, settings: TelemetrySettings, model_name: str):
        self.model_name = model_name
        self.enabled = settings.otlp_endpoint is not None
        self._providers: list[Any] = []
        if self.enabled:
            tracer_provider, meter_provider = _otlp_providers(settings.otlp_endpoint.rstrip("/"))
            self._providers = [tracer_provider, meter_provider]
            self.tracer = tracer_provider.get_tracer("verispec")
            meter = meter_provider.get_meter("verispec")
        else:
            self.tracer = trace.NoOpTracer()
            meter = NoOpMeterProvider().get_meter("verispec")
        self.duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="Generative AI server request duration.",
            explicit_bucket_boundaries_advisory=REQUEST_DURATION_BUCKETS,
        )
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", description="Time to generate the first token.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s", description="Time per output token after the first.",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
        )

    def start_request(self, operation: str, headers: Mapping[str, str], attributes: dict[str, Any]) -> Span:
        """The request's span, continuing the caller's trace (W3C traceparent) if there is one."""
        context = propagate.extract(dict(headers))
        attributes = {"gen_ai.operation.name": operation, "gen_ai.provider.name": "verispec",
                      "gen_ai.request.model": self.model_name, **{k: v for k, v in attributes.items() if v is not None}}
        return self.tracer.start_span(f"{operation} {self.model_name}", context=context, kind=SpanKind.SERVER, attributes=attributes)

    def end_request(
        self, span: Span, rounds: Sequence[Round], attributes: dict[str, Any], error: str | None,
        operation: str, latency_s: float | None, ttft_s: float | None, tpot_s: float | None,
    ) -> None:
        if self.enabled:
            parent = trace.set_span_in_context(span)
            for i, r in enumerate(rounds):
                _round_spans(self.tracer, parent, i, r)
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
            span.set_attribute("error.type", error.split(":")[0][:64])
        span.end()
        common = {"gen_ai.operation.name": operation, "gen_ai.provider.name": "verispec",
                  "gen_ai.request.model": self.model_name, "gen_ai.response.model": self.model_name}
        if latency_s is not None:
            self.duration.record(latency_s, {**common, **({"error.type": "error"} if error else {})})
        if ttft_s is not None:
            self.ttft.record(ttft_s, common)
        if tpot_s is not None:
            self.tpot.record(tpot_s, common)

    def shutdown(self) -> None:
        for provider in self._providers:
            try:
                provider.shutdown()  # flushes what is batched
            except Exception as exc:
                log.warning("telemetry shutdown: %s", exc)


def _round_spans(tracer, parent, index: int, r: Round) -> None:
    start, end = r.started_ns, r.ended_ns
    attrs = {"verispec.round.index": index, "verispec.round.depth": r.depth, "verispec.round.proposed": r.proposed,
             "verispec.round.accepted": r.accepted, "verispec.round.proposer_failed": r.proposer_failed}
    span = tracer.start_span("speculation round", context=parent, start_time=start, attributes=attrs)
    inside = trace.set_span_in_context(span)
    propose_end = start + int(r.propose_s * 1e9)
    verify_end = min(end, propose_end + int(r.verify_s * 1e9))
    tracer.start_span("propose", context=inside, start_time=start, attributes={"verispec.proposed": r.proposed}).end(end_time=propose_end)
    tracer.start_span("verify", context=inside, start_time=propose_end, attributes={"verispec.tokens_scored": r.proposed + 1}).end(end_time=verify_end)
    tracer.start_span("accept", context=inside, start_time=verify_end, attributes={"verispec.accepted": r.accepted}).end(end_time=end)
    span.end(end_time=end)


def _otlp_providers(endpoint: str):
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": "verispec"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"), schedule_delay_millis=500))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"), export_interval_millis=5000)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    return tracer_provider, meter_provider
