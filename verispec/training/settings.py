"""What `verispec train` and `verispec distill` share in their settings: how a run runs (device,
threads, resume, the saved weights' dtype), a check's error placed at the flag it concerns, and
the one flag the generated ones cannot shape (--data).

Each command's settings class (`TrainSettings`, `DistillSettings`) subclasses `RunSettings`, so
one class reads defaults < config file < `VERISPEC_*` environment < flags (`verispec.config`), and
its flags are generated from its fields (`verispec.flags.add_settings_flags`).
"""

from __future__ import annotations

import argparse
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from verispec.config import CommandSettings


class RunSettings(CommandSettings):
    """How a training run runs: device, threads, resume and the saved weights' dtype."""

    save_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16",
        description="storage of the final weights: float16 keeps the model on the lean backend's CPU kernel step; "
        "they load as float32 on the CPU either way",
    )
    resume: bool = Field(False, description="continue from the last checkpoint in --out")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    # On 2 cores shared with other busy processes, one thread decoded several times faster than
    # two: small matrix products stall waiting for a descheduled second thread.
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch (default: torch's choice; on busy shared cores 1 can be much faster)",
    )

    def apply_threads(self) -> None:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)


def field_error(field: str, message: str, value: Any) -> ValidationError:
    """A check over several fields, failed, placed at the one field it concerns: `verispec` then
    says `--field: message`, where a model validator's own ValueError would name no flag."""
    error = PydanticCustomError("settings", "{reason}", {"reason": message})
    return ValidationError.from_exception_data(
        "settings", [InitErrorDetails(type=error, loc=(field,), input=value)]
    )


def one_of(settings: CommandSettings, fields: tuple[str, ...], what: str) -> None:
    """Refuse settings that give none or several of `fields` (mutually exclusive sources)."""
    flags = ["--" + name.replace("_", "-") for name in fields]
    given = [name for name in fields if getattr(settings, name) not in (None, (), False)]
    if not given:
        raise field_error(fields[0], f"give {what}: {', '.join(flags[:-1])} or {flags[-1]}", None)
    if len(given) > 1:
        named = ["--" + name.replace("_", "-") for name in given]
        raise field_error(
            given[-1],
            f"give {what}, not {', '.join(named[:-1])} and {named[-1]} together",
            getattr(settings, given[-1]),
        )


def add_data_flag(command: argparse.ArgumentParser, model: type[CommandSettings]) -> None:
    """--data PATH [PATH ...], repeatable, the paths adding up: a shape `add_settings_flags` does not make."""
    command.add_argument(
        "--data", dest="data", default=argparse.SUPPRESS, nargs="+", action="extend", metavar="PATH",
        help=model.model_fields["data"].description,
    )
