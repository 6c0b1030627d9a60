"""Settings of the server: HTTP and admission, routing among proposers, the audit trail, scale-out
and telemetry."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from verispec.config.values import comma_list, strings
from verispec.proposers.names import PROPOSER_NAMES, VERIFIER_ONLY


class ServerSettings(BaseModel):
    """`verispec serve`: where it listens, whom it admits, how it protects the verifier."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    served_model_name: str | None = Field(None, description="model name clients send; default: the target's folder name")
    api_keys: SecretStr | None = Field(
        None, description="comma-separated API keys, each 'KEY' or 'ID:KEY'; none = no authentication (env: VERISPEC_API_KEYS)"
    )
    api_keys_file: Path | None = Field(None, description="file of API keys, one 'KEY' or 'ID:KEY' per line")
    max_running: int = Field(8, ge=1, description="requests generating at once (one verifier pass for all of them when batched)")
    max_waiting: int = Field(16, ge=0, description="requests queued beyond --max-running; past it: 503 at once")
    deadline_s: float = Field(300.0, ge=0.0, description="longest a request may take, queue included (0 = none); 504 past it")
    rate_limit_rpm: int = Field(0, ge=0, description="requests per minute per API key (0 = unlimited)")
    rate_limit_tpm: int = Field(0, ge=0, description="prompt + max tokens per minute per API key (0 = unlimited)")
    redis_url: str | None = Field(
        None,
        description="Redis URL (redis://HOST:PORT/DB) for limits shared by all replicas: per-key rate limits; "
        "none = in-process limits, per replica",
    )
    speculation_stats: bool = Field(False, description="add speculation statistics to every response (else opt-in per request)")
    playground: Literal["auto", "on", "off"] = Field(
        "auto", description="the web page at /playground that streams drafts and verdicts as they happen: on, off, or "
        "auto (on unless API keys are configured, so that no deployment shows it by surprise)",
    )
    policy: Path | None = Field(
        None, description="rules file (YAML) of the policy gate on verified text: blocked terms, regular expressions, "
        "checkers (module:function); see deploy/policy/rules.example.yaml",
    )
    verify_idle_s: float = Field(
        30.0, gt=0.0, description="verify API: a session idle this long between rounds expires (its KV is freed)"
    )
    verify_max_drafts: int = Field(16, ge=1, le=64, description="verify API: most draft tokens a client may send in one round")
    verify_max_sessions: int = Field(
        4, ge=1, description="verify API: most sessions one API key may hold open at once; past it: 429 until one ends"
    )
    verify_client_probs: bool = Field(
        True, description="verify API: take the draft distributions clients report (draft_probs); off: greedy and "
        "point-mass drafts only, so that no acceptance rests on a client's word",
    )
    breaker_min_acceptance: float = Field(
        0.1, ge=0.0, le=1.0, description="circuit breaker: turn speculation off when the rolling acceptance rate falls below this"
    )
    breaker_window: int = Field(256, ge=8, description="circuit breaker: draft tokens the rolling acceptance rate covers")
    breaker_max_failures: int = Field(
        5, ge=1, description="circuit breaker: proposer failures or timeouts within the last 64 rounds that turn speculation off"
    )
    breaker_cooldown_s: float = Field(30.0, gt=0.0, description="circuit breaker: seconds off before speculation is probed again")
    load_depth_from: float = Field(
        0.5, ge=0.0, le=1.0, description="load (queued + running over capacity) from which speculation depth shrinks"
    )
    load_depth_off: float = Field(1.0, ge=0.0, le=1.0, description="load at which speculation turns off")
    grace_s: float = Field(30.0, ge=0.0, description="on shutdown, time in-flight requests get to finish before they are cancelled")
    slo_ttft_s: float = Field(0.5, gt=0.0, description="time-to-first-token objective: a histogram bucket bound")
    slo_itl_s: float = Field(0.05, gt=0.0, description="inter-token latency objective: a histogram bucket bound")
    slo_e2e_s: float = Field(10.0, gt=0.0, description="end-to-end latency objective: a histogram bucket bound")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="server log level")
    max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="largest request body accepted, in bytes; larger bodies get 413"
    )
    header_timeout_s: float = Field(
        10.0, gt=0.0, description="a connection must send a request's complete headers within this many seconds, else it is closed"
    )
    body_timeout_s: float = Field(
        30.0, gt=0.0, description="a request's whole body must arrive within this many seconds of its headers, else 408"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or value.lower() == "none":  # `--redis-url none` overrides a config file's URL
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in ("redis", "rediss", "unix"):
            raise ValueError("give a Redis URL: redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or unix:///PATH/TO/SOCKET")
        database = rest.partition("?")[0].partition("/")[2].replace("/", "") if scheme.lower() != "unix" else ""
        if database and not database.isdigit():  # redis-py would silently use database 0
            raise ValueError("the database after the host must be a number, as in redis://HOST:PORT/0")
        return value

    @field_validator("load_depth_off")
    @classmethod
    def _off_after_start(cls, value: float, info: Any) -> float:
        start = info.data.get("load_depth_from")
        if start is not None and value < start:
            raise ValueError(f"must be at least --load-depth-from ({start})")
        return value


class RoutingSettings(BaseModel):
    """Several proposers behind one verifier: per-request choice and canary rollouts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    proposers: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description=f"choose per request among these proposers ({', '.join((*PROPOSER_NAMES, VERIFIER_ONLY))}; "
        "comma-separated or repeated) by observed throughput",
    )
    route_key: Literal["none", "user", "task"] = Field(
        "none", description="keep the per-request choice's figures per value of this request field (user, or the task extension)"
    )
    canary_draft: str | None = Field(
        None, description="candidate draft model (or draft head) to canary beside the current proposer"
    )
    canary_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of requests the canary candidate serves")
    canary_min_requests: int = Field(30, ge=5, description="requests per side before the canary is judged")
    canary_alpha: float = Field(0.05, gt=0.0, lt=0.5, description="significance level of the canary's tests")
    canary_margin: float = Field(
        0.05, ge=0.0, le=1.0, description="roll back only when the candidate's median acceptance is lower by more than this"
    )

    @field_validator("proposers", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return comma_list(strings(value), (*PROPOSER_NAMES, VERIFIER_ONLY), "proposer")  # --proposers a,b or repeated


class AuditSettings(BaseModel):
    """The audit trail: one record per request, redacted before it reaches any sink."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    audit_url: str = Field(
        default_factory=lambda: default_audit_url(),
        description="where audit records go: sqlite:///PATH (embedded), postgresql://HOST/DB, or none; "
        "default: audit.sqlite3 in the per-user data folder (~/.local/share/verispec on Linux)",
    )
    audit_content: bool = Field(False, description="also store prompts and outputs (redacted); default: metadata only")
    audit_redaction: Literal["redact", "hash"] = Field(
        "redact", description="stored content: PII and secrets replaced by placeholders, or a keyed hash only"
    )
    audit_hash_key: SecretStr | None = Field(
        None, description="key of the HMAC that --audit-redaction hash stores (env: VERISPEC_AUDIT_HASH_KEY); unset: plain sha256"
    )
    redact_patterns: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="extra regular expressions to redact (repeatable; several in a variable: a JSON list)"
    )
    audit_retention_days: float = Field(30.0, ge=0.0, description="delete records older than this (0 = keep forever)")
    audit_queue: int = Field(1024, ge=1, description="records buffered for the background writer")
    audit_ack_timeout_s: float = Field(
        10.0, gt=0.0,
        description="longest a response waits for its audit record to commit; past it the client gets 503 instead of "
        "an acknowledgement, and /readyz reports the audit trail unavailable",
    )
    mismatch_sample_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="share of requests inspected: drift metrics and proposer/verifier mismatch samples"
    )

    @field_validator("redact_patterns", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:

        value = strings(value)
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {pattern!r} ({exc})") from None
        return value


def default_audit_url() -> str:
    """The embedded audit database in the per-user data folder (XDG_DATA_HOME on Linux), so that
    `verispec audit` finds the server's records from any working directory."""
    from platformdirs import user_data_path

    return f"sqlite:///{user_data_path('verispec') / 'audit.sqlite3'}"


class ScaleSettings(BaseModel):
    """`verispec serve` on Ray Serve: replicas behind one endpoint, each with its own engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    replicas: int | None = Field(
        None, ge=1, description="serve with this many replicas on Ray Serve (none = one process, no Ray)"
    )
    autoscale: str | None = Field(
        None, description="MIN,MAX: replicas on Ray Serve, scaled by ongoing requests per replica (instead of --replicas)"
    )
    ray_address: str | None = Field(
        None, description="join this Ray cluster (e.g. 10.0.0.5:6379 or auto); default: start a local Ray instance"
    )
    replica_cpus: float = Field(1.0, gt=0.0, description="CPUs Ray reserves for each replica")
    upscale_delay_s: float = Field(10.0, ge=0.0, description="autoscaling: seconds of excess load before a replica is added")
    downscale_delay_s: float = Field(60.0, ge=0.0, description="autoscaling: seconds of idleness before a replica is removed")

    @field_validator("autoscale")
    @classmethod
    def _bounds(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = [p.strip() for p in value.split(",")]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError("give the replica bounds as MIN,MAX, e.g. 1,4")
        low, high = int(parts[0]), int(parts[1])
        if high < 1 or low > high:
            raise ValueError("need MIN <= MAX and MAX >= 1, e.g. 1,4")
        return f"{low},{high}"

    @model_validator(mode="after")
    def _one_way(self):
        if self.replicas is not None and self.autoscale is not None:
            raise ValueError("give --replicas N or --autoscale MIN,MAX, not both")
        return self

    @property
    def autoscale_bounds(self) -> tuple[int, int] | None:
        if self.autoscale is None:
            return None
        low, high = self.autoscale.split(",")
        return int(low), int(high)

    @property
    def on_ray(self) -> bool:
        return self.replicas is not None or self.autoscale is not None


class TelemetrySettings(BaseModel):
    """Traces, logs and the cost model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP collector base URL for traces and metrics, e.g. http://127.0.0.1:4318; none = no export"
    )
    log_format: Literal["json", "text"] = Field("json", description="server logs: JSON lines with request IDs, or text")
    log_content: bool = Field(False, description="put prompts and outputs (redacted) into logs and traces")
    cost_verifier_per_hour: float = Field(1.0, ge=0.0, description="cost of the verifier's hardware per hour, in dollars")
    cost_proposer_per_hour: float = Field(
        0.0, ge=0.0, description="cost of the proposer's hardware per hour (0 when it shares the verifier's)"
    )
