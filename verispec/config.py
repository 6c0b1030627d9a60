"""One typed configuration source.

Each concern is a small frozen pydantic model; `Settings` combines them and reads, in rising
precedence, built-in defaults, a config file (TOML, YAML or JSON), `VERISPEC_*` environment variables
and CLI flags. The CLI's flags are generated from these fields (see `cli.py`), so a default is
written once, here.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, InitSettingsSource, NoDecode, SettingsConfigDict, SettingsError

from verispec.errors import UserError
from verispec.proposers.names import PROPOSER_NAMES, VERIFIER_ONLY, described

Depth = int | Literal["auto"]


def strings(value: Any) -> Any:
    """A repeatable text setting as a tuple: a flag's list, a config file's list, or one variable's
    text, which holds one value, or several as a JSON list (`VERISPEC_STOP='["\\n\\n", "END"]'`)."""
    if isinstance(value, str):
        if value.startswith("["):
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                return (value,)
            return tuple(decoded) if isinstance(decoded, list) else (value,)
        return (value,)
    return tuple(value) if isinstance(value, list | tuple) else value


class ModelSettings(BaseModel):
    """Which models verify and propose, and where they run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str | None = Field(
        None, description="verifier (target) model: local path or hub id; default: the built-in demo pair (a small Python code model and its distilled draft)"
    )
    draft: str | None = Field(None, description="draft model for --proposer draft: local path or hub id")
    proposer: Literal[("auto", *PROPOSER_NAMES, VERIFIER_ONLY)] = Field(  # the names: verispec/proposers/names.py
        "auto", description=f"proposer: {described()}; auto = draft if --draft is given, else ngram"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    backend: Literal["auto", "lean", "transformers"] = Field(
        "auto", description="forward pass: lean (own Llama/Mistral/Qwen2/GPT-2 implementation) where supported, else transformers"
    )
    compile: bool = Field(False, description="compile the lean backend's decode/verify step with torch.compile")
    cpu_kernel: bool = Field(
        True,
        description="lean backend on CPU: keep weights that 16 bits hold exactly in 16 bits and widen them "
        "in verispec's compiled kernel (float32 arithmetic on the same values, half the bytes per step)",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="compute dtype; auto = float32 (exact greedy, see README for reduced precision)"
    )
    weights_dtype: Literal["auto", "float16", "bfloat16", "q8_0"] = Field(
        "auto",
        description="storage of float weight matrices on the lean backend: auto = as stored; float16, bfloat16 or "
        "q8_0 round or quantize them so a float32 checkpoint runs on the CPU kernel step (a change of model: "
        "outputs are exact for the converted model, not the original)",
    )


class SpeculationSettings(BaseModel):
    """How far and how safely to speculate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    depth: Depth = Field("auto", description="draft tokens per round: an integer (0 = verifier only) or auto")
    max_depth: int = Field(8, ge=1, le=64, description="upper bound for --depth auto")
    draft_confidence: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="with --depth auto, stop drafting when the draft's top probability falls below this (0 = off)",
    )
    proposer_timeout_s: float = Field(
        1.0, gt=0.0, description="a proposal slower than this is dropped and the round runs verifier-only"
    )
    max_proposer_failures: int = Field(
        3, ge=1, description="consecutive proposer failures after which a request continues verifier-only"
    )
    ngram_max: int = Field(5, ge=1, description="longest context suffix the n-gram proposer matches")
    ngram_min: int = Field(
        2, ge=1, description="shortest context suffix the n-gram proposer matches (a single shared token predicts little)"
    )

    @field_validator("depth", mode="before")
    @classmethod
    def _parse_depth(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, int) and value < 0:
            raise ValueError("depth must be 0 or more, or 'auto'")
        return value


class SamplingParams(BaseModel):
    """Per-request decoding settings. Temperature 0 means greedy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy; > 0 samples")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1 = off)")
    seed: int | None = Field(None, ge=0, description="random seed; the same seed reproduces the same output")
    max_new_tokens: int = Field(128, ge=1, description="stop after this many new tokens")
    stop: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="stop when the output contains this string (repeatable; several in a variable or file: a JSON list)"
    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        value = strings(value)
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return tuple(value)


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
    policy: Path | None = Field(
        None, description="rules file (YAML) of the policy gate on verified text: blocked terms, regular expressions, "
        "checkers (module:function); see deploy/policy/rules.example.yaml",
    )
    verify_idle_s: float = Field(
        30.0, gt=0.0, description="verify API: a session idle this long between rounds expires (its slot and KV are freed)"
    )
    verify_max_drafts: int = Field(16, ge=1, le=64, description="verify API: most draft tokens a client may send in one round")
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


class BatchSettings(BaseModel):
    """The batched engine: how many rows a verifier pass may take, and the KV cache it owns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: Literal["auto", "batched", "interleaved"] = Field(
        "auto",
        description="batched: every running request in one verifier pass per step (lean backend only); "
        "interleaved: one request's round per pass, in turn (the transformers backend always runs this way); "
        "auto = batched where the backend supports it",
    )
    kv_cache_memory: str = Field(
        "1GiB",
        description="memory for the verifier's paged KV cache, in bytes or with a unit (512MiB, 2GiB); "
        "it bounds the tokens all running requests and the prefix cache hold together",
    )
    kv_block_size: int = Field(16, ge=8, le=256, multiple_of=8, description="positions per KV cache block")
    max_pass_tokens: int = Field(
        128, ge=16, description="rows one verifier pass may take: every running request's round, then prompt chunks up to this"
    )
    prefill_slowdown: float = Field(
        2.0, ge=1.0,
        description="chunked prefill: while requests are generating, a pass with a prompt chunk may take at most this many "
        "times as long as their rounds alone (measured pass costs set the chunk), so a long prompt never stalls their streams",
    )
    prefix_cache: bool = Field(True, description="keep full KV blocks by a hash of their tokens and reuse them for a shared prefix")

    @field_validator("kv_cache_memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        parse_bytes(value)
        return value

    @property
    def kv_cache_bytes(self) -> int:
        return parse_bytes(self.kv_cache_memory)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str | int) -> int:
    """'1GiB', '512MiB', '2e9' or 1073741824 -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError("give bytes as a number with an optional unit: 1073741824, 512MiB, 2GiB, 1.5GB")
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ValueError("must be more than 0 bytes")
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
    canary_draft: str | None = Field(None, description="candidate draft model to canary beside the current proposer")
    canary_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of requests the canary candidate serves")
    canary_min_requests: int = Field(30, ge=5, description="requests per side before the canary is judged")
    canary_alpha: float = Field(0.05, gt=0.0, lt=0.5, description="significance level of the canary's tests")
    canary_margin: float = Field(
        0.05, ge=0.0, le=1.0, description="roll back only when the candidate's median acceptance is lower by more than this"
    )

    @field_validator("proposers", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        value = tuple(v.strip() for item in strings(value) for v in item.split(",") if v.strip())  # --proposers a,b or repeated
        choices = (*PROPOSER_NAMES, VERIFIER_ONLY)
        unknown = [v for v in value if v not in choices]
        if unknown:
            raise ValueError(f"unknown proposer {unknown[0]!r}; choose among {', '.join(choices)}")
        if len(set(value)) != len(value):
            raise ValueError("each proposer once")
        return value


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
        import re

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


Part = TypeVar("Part", bound=BaseModel)


class CommandSettings(BaseSettings):
    """The base of every command's settings: frozen, read from `VERISPEC_*` environment variables,
    a config file and flags (see `load_settings`); unknown keys are refused. A command whose options
    are its own (edge, loadtest, audit, distill, train) reads them from `VERISPEC_<COMMAND>_*`
    (`command_config`), so a variable exported for one command never changes another."""

    model_config = SettingsConfigDict(env_prefix="VERISPEC_", frozen=True, extra="forbid")


def command_config(command: str) -> SettingsConfigDict:
    """The settings config of a command with options of its own: `VERISPEC_<COMMAND>_*` variables."""
    return SettingsConfigDict(env_prefix=f"VERISPEC_{command.upper()}_", frozen=True, extra="forbid", populate_by_name=True)


def shared_env(*names: str) -> AliasChoices:
    """Extra environment names of a field that several commands share (`VERISPEC_API_KEY`); the
    field's own name still works as a flag and a config key."""
    return AliasChoices(*(name.lower() for name in names))


Loaded = TypeVar("Loaded", bound=CommandSettings)


class Settings(
    ModelSettings,
    SpeculationSettings,
    SamplingParams,
    ServerSettings,
    BatchSettings,
    RoutingSettings,
    AuditSettings,
    TelemetrySettings,
    ScaleSettings,
    CommandSettings,
):
    """Everything a `verispec` command reads, flat so that flags and env vars stay short."""

    model_config = SettingsConfigDict(env_prefix="VERISPEC_", frozen=True, extra="forbid")

    def part(self, cls: type[Part]) -> Part:
        """The fields of one concern, as its own frozen model."""
        return cls.model_validate(self.model_dump(include=set(cls.model_fields)))


def load_settings(flags: dict[str, Any], config_file: Path | None = None, cls: type[Loaded] = Settings) -> Loaded:
    """Defaults < config file < VERISPEC_* environment < flags, for `Settings` (generate, serve, ...)
    or another command's settings. Bad values raise UserError."""
    file_values = _read_config_file(config_file) if config_file else {}

    class _Layered(cls):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    try:
        layered = _Layered(**flags)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc)) from None
    except SettingsError as exc:  # a variable that is not the JSON its field's type needs
        raise UserError(f"{exc}; check the VERISPEC_* environment variables") from None
    return cls.model_construct(**layered.model_dump())


def describe_validation_error(exc: ValidationError) -> str:
    """One message per bad field, named as a flag (env vars and config keys map to flags one to one),
    in the user's terms: a union's branches merged into the forms it takes (see `validation.py`)."""
    from verispec.validation import problems

    parts = []
    for problem in problems(exc):
        field = ".".join(str(p) for p in problem.location if not isinstance(p, int)) or "value"
        parts.append(f"--{field.replace('_', '-')}: {problem.message} (got {problem.input!r})")
    return "; ".join(parts)


_CONFIG_FORMATS = {
    ".toml": ("TOML", tomllib.loads),
    ".yaml": ("YAML", yaml.safe_load),
    ".yml": ("YAML", yaml.safe_load),
    ".json": ("JSON", json.loads),
}


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text()
    kind, parse = _CONFIG_FORMATS.get(path.suffix.lower(), ("JSON", json.loads))
    try:
        values = parse(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"config file {path} is not valid {kind}: {exc}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a table of settings")
    return {key.replace("-", "_"): value for key, value in values.items()}
