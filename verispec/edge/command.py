"""`verispec edge PROMPT --url URL`: continue a prompt with a local proposer against a remote verifier.

Its settings come, like every command's, from flags, `VERISPEC_*` environment variables and a
config file (`EdgeSettings`); the API key, for one, from VERISPEC_API_KEY.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from verispec.config import CommandSettings, SamplingParams, command_config, shared_env
from verispec.errors import UserError
from verispec.flags import add_common_flags, add_settings_flags, settings_from


class EdgeSettings(CommandSettings):
    """The verifying server, the local proposer, and the request's decoding settings."""

    model_config = command_config("edge")

    url: str = Field("http://127.0.0.1:8000", description="the verifying server")
    draft: str | None = Field(
        None, description="draft model to propose with (its tokenizer must be the server's); default: n-gram lookup"
    )
    tokenizer: str | None = Field(
        None, description="with the n-gram lookup: the server's tokenizer; default: none, the server tokenizes"
    )
    api_key: SecretStr | None = Field(
        None, validation_alias=shared_env("VERISPEC_EDGE_API_KEY", "VERISPEC_API_KEY"),
        description="API key, if the server wants one (env: VERISPEC_API_KEY)",
    )
    model: str | None = Field(None, description="model name; default: the server's")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; default: the server's")
    temperature: float = SamplingParams.model_fields["temperature"]
    top_p: float = SamplingParams.model_fields["top_p"]
    top_k: int = SamplingParams.model_fields["top_k"]
    seed: int | None = SamplingParams.model_fields["seed"]
    depth: int | Literal["auto", "server"] = Field(
        "auto",
        description="drafts per round: a positive whole number; auto: priced by the measured round trips; server: the "
        "server's hint, the least verifier time per token",
    )
    stats: bool = Field(False, description="print round trips, bytes and acceptance after the text")

    @field_validator("depth", mode="before")
    @classmethod
    def _depth(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() in ("auto", "server"):
            return value.strip()
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError("give a positive whole number, auto or server")
        return value


def add_edge_command(commands) -> None:

    command = commands.add_parser(
        "edge", help="continue a prompt with a local proposer against a remote verifier (the server's verify API)"
    )
    command.add_argument("prompt", metavar="PROMPT", help="text to continue; - reads standard input")
    add_settings_flags(command, EdgeSettings)
    add_common_flags(command)
    command.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import httpx

    from verispec.edge import EdgeClient, EdgeError

    settings = settings_from(args, EdgeSettings)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
    http = httpx.Client(base_url=settings.url, headers=headers, timeout=120.0)
    try:
        model = settings.model or http.get("/v1/models").raise_for_status().json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise UserError(
            f"cannot ask {settings.url} for its model ({exc}); is `verispec serve` running there? (or pass --model)"
        ) from None
    if settings.draft:
        client = EdgeClient.with_draft(settings.url, settings.draft, model=model, depth=settings.depth, http=http)
    else:
        tokenizer = None
        if settings.tokenizer:
            from verispec.models import load_tokenizer

            tokenizer = load_tokenizer(settings.tokenizer)
        client = EdgeClient.with_ngram(settings.url, model=model, tokenizer=tokenizer, depth=settings.depth, http=http)
    try:
        for text in client.stream(prompt, max_tokens=settings.max_tokens, temperature=settings.temperature,
                                  top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed):  # fmt: skip
            print(text, end="", flush=True)
    except EdgeError as exc:
        raise UserError(f"the server refused the round: {exc}") from None
    except httpx.HTTPError as exc:
        raise UserError(f"lost the server at {settings.url}: {exc}") from None
    print()
    if settings.stats:
        last = client.last
        rate = f"{last.acceptance_rate:.2f}" if last.acceptance_rate is not None else "-"
        print(
            f"{len(last.token_ids)} tokens in {last.round_trips} round trips, acceptance {rate}, "
            f"{last.bytes_per_round:.0f} bytes per round, finish: {last.finish_reason}", file=sys.stderr,
        )  # fmt: skip
    return 0
