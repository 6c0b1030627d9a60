"""`verispec loadtest`'s settings: the clients' options and the `--table` mode's, read like every
command's from flags, `VERISPEC_*` environment variables and a config file.

Lists (--levels, --proposers, ...) are comma-separated in a flag, an environment variable or a
config file's string; a repeated flag or a config file's list works too. Without --prompts the
clients send `default_prompts()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from verispec.config import CommandSettings, comma_list, command_config, parse_bytes, shared_env
from verispec.errors import UserError
from verispec.prompts import Prompt, load_prompts, stdlib_windows
from verispec.proposers.names import PROPOSER_NAMES, VERIFIER_ONLY, described

SCHEDULERS = ("batched", "interleaved")
# In the table's row order, the verifier-only baseline first. The suffix cache is left out unless
# named: the table sends the same prompts to every cell, so it would draft a cell's requests from
# the cells before it, a speed no single cell's traffic has. A draft head needs a head checkpoint
# (--draft), so it too is left out unless named (any proposer may be named).
PROPOSERS = (VERIFIER_ONLY, *(name for name in PROPOSER_NAMES if name not in ("suffix", "head")))
SCENARIOS = ("prefix", "chunked")
# The shared prompt set, where this checkout sits beside it (../shared).
DEFAULT_PROMPTS = Path(__file__).resolve().parents[4] / "shared" / "prompts" / "code-completion.jsonl"

Names = Annotated[tuple[str, ...], NoDecode]


def default_prompts() -> list[Prompt]:
    """The shared prompt set where this checkout sits beside it, else text every machine has."""
    if DEFAULT_PROMPTS.is_file():
        return load_prompts(DEFAULT_PROMPTS)
    return stdlib_windows(64, seed=7, lines=30, held_out=True)


def split_levels(value: Any) -> list[int]:
    items = comma_list(value)
    try:
        levels = [int(x) for x in items]
    except ValueError:
        raise ValueError("give comma-separated integers, e.g. 1,2,4,8") from None
    if not levels or min(levels) < 1:
        raise ValueError("give one or more concurrency levels, each 1 or more")
    return levels


def parse_list(text: str, what: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """`comma_list` for a flag: a bad value is a UserError that names it."""
    try:
        return list(comma_list(text, allowed))
    except ValueError as exc:
        raise UserError(f"--{what}: {exc} (got {text!r})") from None


def parse_levels(text: str) -> list[int]:
    try:
        return split_levels(text)
    except ValueError as exc:
        raise UserError(f"--levels: {exc} (got {text!r})") from None


class ClientOptions(BaseModel):
    """Concurrent streaming clients against a running `verispec serve`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field("http://127.0.0.1:8000", description="server base URL")
    prompts: Path | None = Field(
        None,
        description="JSONL prompt set; default: the shared prompts where present, else 64 windows of the standard "
        "library's q/r/s modules, which the demo pair never trained on",
    )
    concurrency: int = Field(4, ge=1, description="concurrent clients")
    requests: int | None = Field(
        None, ge=1, description="requests per configuration (default: 32); with --table per cell (default: 4 per client, at least 8)"
    )
    max_tokens: int | None = Field(None, ge=1, description="max_tokens per request (default: 64; with --table 128)")
    api_key: SecretStr | None = Field(
        None, validation_alias=shared_env("VERISPEC_LOADTEST_API_KEY", "VERISPEC_API_KEY"),
        description="API key, if the server wants one (env: VERISPEC_API_KEY)",
    )
    compare_speculation: bool = Field(False, description="alternate speculative and verifier-only phases")
    provisional: bool = Field(
        False,
        description="ask for drafts before their verdict (the `provisional` extension) and report the time to the first "
        "draft token beside the time to the first verified one",
    )
    rounds: int = Field(2, ge=1, description="with --compare-speculation: A/B alternations")
    warmup: int = Field(2, ge=0, description="requests per configuration before timing; with --table per server and proposer")
    wait_s: float | None = Field(None, ge=0.0, description="wait this long for the server to be ready (default: 60; with --table 600)")
    out: Path | None = Field(None, description="also write the report as JSON to this file")


class TableOptions(BaseModel):
    """--table: one `verispec serve` per scheduler on free loopback ports, and a grid of cells measured on them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: bool = Field(
        False,
        description="measure concurrency x proposer x scheduler cells and the scenarios on servers of its own (--url is not used)",
    )
    target: str | None = Field(None, description="the servers' verifier; default: the servers' own, the demo pair")
    draft: str | None = Field(None, description="the servers' draft model; default: the servers' own")
    levels: Annotated[tuple[int, ...], NoDecode] = Field((1, 2, 4, 8), description="concurrency levels")
    schedulers: Names = Field(SCHEDULERS, description=f"one server each: {', '.join(SCHEDULERS)}")
    proposers: Names = Field(PROPOSERS, description=f"pinned per request: {described()}")
    repeats: int = Field(
        1, ge=1,
        description="runs of every cell, the proposers taking turns in an order reversed at every run; a cell's figures "
        "are the median of its runs, its ratio to verifier-only the median of the runs' ratios",
    )
    scenarios: Names = Field(
        SCENARIOS, description="prefix (shared-prefix TTFT), chunked (a long prompt among running streams), or none"
    )
    prefix_tokens: int = Field(1000, ge=16, description="prefix scenario: tokens of the shared prefix, about")
    long_tokens: int = Field(1800, ge=16, description="chunked scenario: tokens of the long prompt, about")
    kv_cache_memory: str | None = Field(None, description="passed to the servers; default: theirs")
    serve_args: str | None = Field(
        None,
        description="more `verispec serve` flags for both servers, one string, given last (they override): "
        'e.g. "--load-depth-from 2 --load-depth-off 4"',
    )
    markdown: Path | None = Field(None, description="also write the table and summary to this file")

    @field_validator("levels", mode="before")
    @classmethod
    def _levels(cls, value: Any) -> tuple[int, ...]:
        return tuple(split_levels(value))

    @field_validator("schedulers", "proposers", mode="before")
    @classmethod
    def _names(cls, value: Any, info) -> tuple[str, ...]:
        names = comma_list(value, SCHEDULERS if info.field_name == "schedulers" else (VERIFIER_ONLY, *PROPOSER_NAMES))
        if not names:
            raise ValueError("give one value or more")
        return tuple(names)

    @field_validator("scenarios", mode="before")
    @classmethod
    def _scenarios(cls, value: Any) -> tuple[str, ...]:
        names = comma_list(value)
        return () if [str(n).lower() for n in names] in ([], ["none"]) else comma_list(names, SCENARIOS)

    @field_validator("kv_cache_memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_bytes(value)
        return value


class LoadtestSettings(ClientOptions, TableOptions, CommandSettings):
    """Everything `verispec loadtest` reads."""

    model_config = command_config("loadtest")
