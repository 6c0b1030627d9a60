"""One typed configuration source.

Each concern is a small frozen pydantic model; `Settings` combines them and reads, in rising
precedence, built-in defaults, a config file (TOML or JSON), `VERISPEC_*` environment variables
and CLI flags. The CLI's flags are generated from these fields (see `cli.py`), so a default is
written once, here.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

from verispec.errors import UserError

Depth = int | Literal["auto"]


class ModelSettings(BaseModel):
    """Which models verify and propose, and where they run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str | None = Field(
        None, description="verifier (target) model: local path or hub id; default: the reference pair in ../shared/models"
    )
    draft: str | None = Field(None, description="draft model for --proposer draft: local path or hub id")
    proposer: Literal["auto", "draft", "ngram", "none"] = Field(
        "auto", description="proposer: draft model, ngram (prompt lookup), none (verifier only); auto = draft if --draft is given, else ngram"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    backend: Literal["auto", "lean", "transformers"] = Field(
        "auto", description="forward pass: lean (own Llama-family implementation) where supported, else transformers"
    )
    compile: bool = Field(False, description="compile the lean backend's decode/verify step with torch.compile")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights dtype; auto = float32 (exact greedy, see README for reduced precision)"
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
    stop: tuple[str, ...] = Field((), description="stop when the output contains this string (repeatable)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = (value,)
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return tuple(value)


Part = TypeVar("Part", bound=BaseModel)


class Settings(ModelSettings, SpeculationSettings, SamplingParams, BaseSettings):
    """Everything a `verispec` command reads, flat so that flags and env vars stay short."""

    model_config = SettingsConfigDict(env_prefix="VERISPEC_", frozen=True, extra="forbid")

    def part(self, cls: type[Part]) -> Part:
        """The fields of one concern, as its own frozen model."""
        return cls.model_validate(self.model_dump(include=set(cls.model_fields)))


def load_settings(flags: dict[str, Any], config_file: Path | None = None) -> Settings:
    """Defaults < config file < VERISPEC_* environment < flags. Bad values raise UserError."""
    file_values = _read_config_file(config_file) if config_file else {}

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    try:
        layered = _Layered(**flags)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc)) from None
    return Settings.model_construct(**layered.model_dump())


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad field, named as the user wrote it (a flag or an env var)."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"] if not isinstance(p, int)) or "value"
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"--{field.replace('_', '-')}: {message} (got {error.get('input')!r})")
    return "; ".join(parts)


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a table of settings")
    return {key.replace("-", "_"): value for key, value in values.items()}
