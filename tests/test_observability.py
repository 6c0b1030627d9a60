"""A request end to end through a real server process: its trace (exported over OTLP/HTTP to a
collector the test runs), its JSON log lines and its audit record, with planted PII that must
reach none of them."""

from __future__ import annotations

import gzip
import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.serving import ServerProcess, free_port
from tests.test_server import LONG_PROMPT

KEY = "sk-ops-7Hq2xPz9LmN4vB8cR1tY"
PLANTED = {
    "email": "grace.hopper@navy.example.org",
    "phone": "+1 (415) 555-0132",
    "card": "4111 1111 1111 1111",
    "ip": "10.20.30.40",
    "openai key": "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t",
    "aws key": "AKIAIOSFODNN7EXAMPLE",
    "password": "hunter2-correct-horse",
    "employee id": "EMP-482913",
}
PII_PROMPT = (
    f"{LONG_PROMPT} # contact {PLANTED['email']} or {PLANTED['phone']}, card {PLANTED['card']}, "
    f"host {PLANTED['ip']}, OPENAI_API_KEY={PLANTED['openai key']} aws={PLANTED['aws key']} "
    f"password={PLANTED['password']} badge {PLANTED['employee id']}"
)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector:
    """A minimal OTLP/HTTP receiver: keeps what arrives on /v1/traces and /v1/metrics."""

    def __init__(self):
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    collector.traces.append(ExportTraceServiceRequest.FromString(body))
                elif self.path == "/v1/metrics":
                    collector.metrics.append(ExportMetricsServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list:
        return [span for request in self.traces for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]

    def metric_names(self) -> set[str]:
        return {m.name for request in self.metrics for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def attributes(span) -> dict:
    out = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        out[kv.key] = [v.string_value for v in value.array_value.values] if kind == "array_value" else getattr(value, kind)
    return out


@pytest.fixture(scope="module")
def observed(tiny_models, tmp_path_factory):
    """One server with everything on; the test's requests; then the server stopped (flushing telemetry)."""
    root = tmp_path_factory.mktemp("observability")
    collector = Collector()
    database = root / "audit.sqlite3"
    proc = ServerProcess(
        ["--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"], "--depth", "2",
         "--audit-url", f"sqlite:///{database}", "--audit-content", "--log-content", "--mismatch-sample-rate", "1",
         "--redact-patterns", r"EMP-\d{6}", "--otlp-endpoint", f"http://127.0.0.1:{collector.port}"],
        log_dir=root, env={"VERISPEC_API_KEYS": f"ops:{KEY}"},
    ).wait_ready()
    headers = {"Authorization": f"Bearer {KEY}", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    body = {"model": "llama", "prompt": PII_PROMPT, "max_tokens": 12, "temperature": 0}
    plain = httpx.post(proc.url + "/v1/completions", json=body, headers=headers, timeout=60)
    streamed = []
    with httpx.stream("POST", proc.url + "/v1/completions", json={**body, "stream": True}, headers=headers, timeout=60) as r:
        streamed_id = r.headers["x-request-id"]
        streamed = [line for line in r.iter_lines() if line]
    refused = httpx.post(proc.url + "/v1/completions", json={**body, "model": "nope"}, headers=headers, timeout=60)
    proc.stop_gracefully()
    yield {
        "collector": collector, "database": database, "log": proc.log(), "plain": plain, "streamed_id": streamed_id,
        "streamed": streamed, "refused": refused,
    }
    collector.server.shutdown()


def test_the_trace_continues_the_callers_and_holds_the_rounds(observed):
    assert observed["plain"].status_code == 200
    request_id = observed["plain"].headers["x-request-id"]
    spans = observed["collector"].spans()
    request_spans = [s for s in spans if s.name == "text_completion llama"]
    assert len(request_spans) == 2
    span = next(s for s in request_spans if attributes(s)["verispec.request_id"] == request_id)
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID  # traceparent honoured
    attrs = attributes(span)
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.request.model"] == "llama" and attrs["gen_ai.request.max_tokens"] == 12
    assert attrs["gen_ai.usage.output_tokens"] == 12
    assert attrs["gen_ai.usage.input_tokens"] == observed["plain"].json()["usage"]["prompt_tokens"]
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert attrs["verispec.proposer.name"].startswith("draft:")
    assert attrs["verispec.proposer.version"].startswith("sha256:")

    rounds = [s for s in spans if s.name == "speculation round" and s.parent_span_id == span.span_id]
    assert len(rounds) == attrs["verispec.verifier_calls"] >= 1
    for r in rounds:
        children = sorted((s for s in spans if s.parent_span_id == r.span_id), key=lambda s: s.start_time_unix_nano)
        assert [c.name for c in children] == ["propose", "verify", "accept"]
        assert r.start_time_unix_nano <= children[0].start_time_unix_nano <= children[-1].end_time_unix_nano <= r.end_time_unix_nano
    assert sum(attributes(r)["verispec.round.accepted"] for r in rounds) == attrs["verispec.accepted"]


def test_genai_metrics_are_exported(observed):
    names = observed["collector"].metric_names()
    assert {"gen_ai.server.request.duration", "gen_ai.server.time_to_first_token", "gen_ai.server.time_per_output_token"} <= names


def test_logs_are_json_with_request_ids(observed):
    lines = [json.loads(line) for line in observed["log"].splitlines() if line.startswith("{")]
    assert lines, observed["log"][:2000]
    mine = [entry for entry in lines if entry.get("request_id") == observed["plain"].headers["x-request-id"]]
    messages = [entry["message"] for entry in mine]
    assert "text_completion ok" in messages or "text_completion fallback" in messages
    assert "POST /v1/completions 200" in messages
    finished = next(entry for entry in mine if entry["message"].startswith("text_completion"))
    assert finished["completion_tokens"] == 12 and finished["key_id"] == "ops"
    assert "<EMAIL>" in finished["prompt"]  # --log-content: present, and redacted


def test_every_request_has_its_audit_record(observed):
    db = sqlite3.connect(observed["database"])
    db.row_factory = sqlite3.Row
    rows = {r["request_id"]: dict(r) for r in db.execute("select * from verispec_audit_records")}
    plain = rows[observed["plain"].headers["x-request-id"]]
    assert plain["outcome"] in ("ok", "fallback") and plain["status"] == 200 and plain["key_id"] == "ops"
    assert plain["completion_tokens"] == 12 and plain["model"] == "llama"
    assert plain["model_version"].startswith("sha256:") and plain["proposer_version"].startswith("sha256:")
    assert json.loads(plain["sampling"])["temperature"] == 0.0
    assert json.loads(plain["speculation"])["verifier_calls"] >= 1
    assert plain["output"] == observed["plain"].json()["choices"][0]["text"]  # tiny-model words: nothing to redact
    for placeholder in ("<EMAIL>", "<PHONE>", "<CREDIT_CARD>", "<IP_ADDRESS>", "<SECRET>", "<CUSTOM>"):
        assert placeholder in plain["prompt"], (placeholder, plain["prompt"])
    assert rows[observed["streamed_id"]]["outcome"] in ("ok", "fallback")
    refused = rows[observed["refused"].headers["x-request-id"]]
    assert (refused["outcome"], refused["status"], refused["key_id"]) == ("rejected", 400, "ops")
    assert "unknown model" in refused["error"]
    # Every request is inspected (--mismatch-sample-rate 1): one sample per corrected round, each tied to its record.
    samples = db.execute("select * from verispec_audit_mismatches").fetchall()
    corrected = sum((json.loads(r["speculation"] or "null") or {}).get("recovered", 0) for r in rows.values())
    assert corrected >= 1 and len(samples) == corrected
    records = {r["record_id"] for r in rows.values()}
    assert all(s["record_id"] in records and 0.0 <= s["verifier_prob"] <= 1.0 for s in samples)


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_planted_pii_reaches_no_sink(observed, kind):
    value = PLANTED[kind]
    dump = "\n".join(sqlite3.connect(observed["database"]).iterdump())
    assert value not in dump, f"{kind} reached the database"
    assert value not in observed["log"], f"{kind} reached the logs"
    for span in observed["collector"].spans():
        assert value not in str(attributes(span)), f"{kind} reached a trace"
    assert KEY not in dump and KEY not in observed["log"]  # nor the API key itself
