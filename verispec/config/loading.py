"""Where settings come from: built-in defaults < a config file (TOML, YAML or JSON) < `VERISPEC_*`
environment variables < flags, for `Settings` (the engine's and the server's concerns, flat) or a
command's own settings class."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ValidationError,
)
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict, SettingsError

from verispec.config.engine import BatchSettings, ModelSettings, SamplingParams, SpeculationSettings
from verispec.config.serving import (
    AuditSettings,
    RoutingSettings,
    ScaleSettings,
    ServerSettings,
    TelemetrySettings,
)
from verispec.config.values import also_named
from verispec.errors import UserError

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
    or another command's settings. A setting's other names (`AlsoNamed`) count as its own in the
    file and the environment. Bad values raise UserError."""
    file_values = _field_names(_read_config_file(config_file), cls, f"config file {config_file}") if config_file else {}
    env_values = _other_names_in_environment(cls)

    class _Layered(cls):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
            by_other_names = InitSettingsSource(settings_cls, env_values)  # VERISPEC_MAX_TOKENS and the like
            return (init_settings, env_settings, by_other_names, InitSettingsSource(settings_cls, file_values))

    try:
        layered = _Layered(**flags)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, cls)) from None
    except SettingsError as exc:  # a variable that is not the JSON its field's type needs
        raise UserError(f"{exc}; check the VERISPEC_* environment variables") from None
    return cls.model_construct(**layered.model_dump())


def describe_validation_error(exc: ValidationError, cls: type[BaseModel] | None = None) -> str:
    """One message per bad field, named as a flag (env vars and config keys map to flags one to one;
    with `cls`, a field's first other name, the one --help shows first), in the user's terms: a
    union's branches merged into the forms it takes (see `validation.py`)."""
    from verispec.validation import problems

    parts = []
    for problem in problems(exc):
        field = ".".join(str(p) for p in problem.location if not isinstance(p, int)) or "value"
        if cls is not None and field in cls.model_fields:
            field = (*also_named(cls.model_fields[field]), field)[0]
        parts.append(f"--{field.replace('_', '-')}: {problem.message} (got {problem.input!r})")
    return "; ".join(parts)


def _field_names(values: dict[str, Any], cls: type[BaseModel], where: str) -> dict[str, Any]:
    """`values` with each setting given by another of its names (`AlsoNamed`) under its field's name."""
    out = dict(values)
    for name, field in cls.model_fields.items():
        for other in also_named(field):
            if other in out:
                if name in out:
                    raise UserError(f"{where}: {other} and {name} name the same setting; give one")
                out[name] = out.pop(other)
    return out


def _other_names_in_environment(cls: type[BaseModel]) -> dict[str, str]:
    """The settings given in the environment by another of their names (`VERISPEC_MAX_TOKENS`), by
    field name. Both names set is refused: which one wins would be a guess."""
    prefix = (cls.model_config.get("env_prefix") or "").upper()
    environment = {key.upper(): value for key, value in os.environ.items()}
    values = {}
    for name, field in cls.model_fields.items():
        for other in also_named(field):
            variable, own = prefix + other.upper(), prefix + name.upper()
            if variable in environment:
                if own in environment:
                    raise UserError(f"{variable} and {own} name the same setting; set one")
                values[name] = environment[variable]
    return values


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
