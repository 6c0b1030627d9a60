"""One typed configuration source.

Each concern is a small frozen pydantic model (`engine.py`: models, speculation, sampling,
batching; `serving.py`: server, routing, audit, scale-out, telemetry); `Settings` combines them
and reads, in rising precedence, built-in defaults, a config file (TOML, YAML or JSON), `VERISPEC_*`
environment variables and CLI flags (`loading.py`). A command with options of its own has its own
settings class on `CommandSettings`. The CLI's flags are generated from these fields (see
`cli.py`), and so is the docs' CLI reference, so a default is written once, here.
"""

from verispec.config.engine import (
    BatchSettings,
    ModelSettings,
    ResponseFormat,
    SamplingParams,
    SpeculationSettings,
)
from verispec.config.loading import (
    CommandSettings,
    Loaded,
    Settings,
    command_config,
    describe_validation_error,
    load_settings,
    shared_env,
)
from verispec.config.serving import (
    AuditSettings,
    RoutingSettings,
    ScaleSettings,
    ServerSettings,
    TelemetrySettings,
    default_audit_url,
)
from verispec.config.values import AlsoNamed, Depth, also_named, comma_list, parse_bytes, strings

__all__ = [
    "AlsoNamed",
    "AuditSettings",
    "BatchSettings",
    "CommandSettings",
    "Depth",
    "Loaded",
    "ModelSettings",
    "ResponseFormat",
    "RoutingSettings",
    "SamplingParams",
    "ScaleSettings",
    "ServerSettings",
    "Settings",
    "SpeculationSettings",
    "TelemetrySettings",
    "also_named",
    "comma_list",
    "command_config",
    "default_audit_url",
    "describe_validation_error",
    "load_settings",
    "parse_bytes",
    "shared_env",
    "strings",
]
