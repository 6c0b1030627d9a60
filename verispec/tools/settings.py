"""Settings of `verispec check` and `verispec bench`: a prompt set and the depths to run it at.

Each command's own options are a small model (`CheckOptions`, `BenchOptions`); the command reads
them together with everything `Settings` holds (models, speculation, sampling), as one class
(`CheckSettings`, `BenchSettings`), so that one config file and one set of `VERISPEC_*` variables
serve both. No torch here: the CLI's parser is built from this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import NoDecode

from verispec.config import Depth, Settings, SpeculationSettings, comma_list

# The sample prompt set that ships in the package, written for the built-in demo pair.
DEMO_PROMPTS = Path(__file__).resolve().parents[1] / "demo" / "prompts.jsonl"

# Comma-separated in a flag, an environment variable or a config file's string; a list in a config file.
DepthList = Annotated[tuple[Depth, ...], NoDecode]


def depth_list(value: Any) -> tuple[Depth, ...]:
    if value == ():  # check's default (settings validate defaults too): the configured depth
        return ()
    depths = comma_list(value)
    if not depths:
        raise ValueError("give at least one depth, e.g. 4 or 2,4,auto")
    parsed = []
    for depth in depths:
        try:
            parsed.append(SpeculationSettings(depth=depth).depth)
        except ValueError:  # pydantic's ValidationError is one
            raise ValueError(f"{depth!r} is not a depth; use integers >= 0 or auto, e.g. 2,4,auto") from None
    return tuple(parsed)


class PromptSetOptions(BaseModel):
    """A greedy run over a JSONL prompt set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: Path = Field(
        DEMO_PROMPTS,
        description='JSONL file, one object per line with a "prompt" string and an optional "id", e.g. '
        '{"id": "fib", "prompt": "def fibonacci(n):\\n"}; the default is a sample written for the built-in demo pair',
    )
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")

    @field_validator("depths", mode="before", check_fields=False)  # each command's own depths field
    @classmethod
    def _depths(cls, value: Any) -> tuple[Depth, ...]:
        return depth_list(value)


class CheckOptions(PromptSetOptions):
    """`verispec check`: the prompt set, the depths to check, the report."""

    depths: DepthList = Field(
        (),
        description="comma-separated depths to check, e.g. 2,4,auto (the flag is also --depth); default: the depth "
        "setting (config key depth, VERISPEC_DEPTH)",
    )
    report: Path | None = Field(None, description="also write the results as JSON to this file")
    sampled: bool = Field(
        True,
        description="also decode each prompt sampled (temperature 1, a seed per prompt) and check the text is the "
        "verifier-only sample at every depth (the coupled acceptance rule reproduces it)",
    )


class BenchOptions(PromptSetOptions):
    """`verispec bench`: the prompt set, the draft model's depths, passes, the output folder, peers."""

    depths: DepthList = Field((1, 2, 4, 6, 8, "auto"), description="comma-separated draft-model depths to bench")
    repeats: int = Field(1, ge=1, description="passes over the prompts")
    out: Path = Field(Path("bench-out"), description="output folder")
    peers: bool = Field(True, description="also time transformers' generate() (plain, assisted, prompt lookup) as peers")
    head: str | None = Field(
        None, description="also bench this draft head (a folder made by verispec distill --head) at the same depths"
    )


class CheckSettings(CheckOptions, Settings):
    """Everything `verispec check` reads (`Settings`' variables and config keys)."""


class BenchSettings(BenchOptions, Settings):
    """Everything `verispec bench` reads (`Settings`' variables and config keys)."""
