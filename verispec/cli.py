"""`verispec` command line: generate, check, bench, serve (one process, or replicas on Ray Serve), edge, batch, loadtest, audit, train, distill.

Flags are generated from the pydantic settings (config.py), so each default lives in one place.
Errors a user can cause print one line and exit 2.

Nothing here imports torch or transformers at module level, and neither do the modules the parser
is built from: they cost seconds, and `--help`, `audit` and `loadtest` never load a model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from verispec.config import (
    AuditSettings,
    BatchSettings,
    Loaded,
    ModelSettings,
    RoutingSettings,
    SamplingParams,
    ScaleSettings,
    ServerSettings,
    Settings,
    SpeculationSettings,
    TelemetrySettings,
    load_settings,
)
from verispec.errors import UserError

# The sample prompt set that ships in the package, written for the built-in demo pair.
DEMO_PROMPTS = Path(__file__).resolve().parent / "demo" / "prompts.jsonl"
PROMPTS_HELP = (
    'JSONL file, one object per line with a "prompt" string and an optional "id", e.g. '
    '{"id": "fib", "prompt": "def fibonacci(n):\\n"} '
    f"(default: {str(DEMO_PROMPTS).replace('%', '%%')}, a sample written for the built-in demo pair)"
)
# Commands that load models: only these pay for importing transformers to silence its logging.
MODEL_COMMANDS = frozenset({"generate", "check", "bench", "serve", "distill", "train", "batch", "edge"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"verispec: error: {message} (see `{self.prog} --help`)\n")


def add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a settings model. The parser keeps (model, skip) in `settings_models`,
    from which the docs' CLI reference is generated."""
    if not hasattr(parser, "settings_models"):
        parser.settings_models = []
    parser.settings_models.append((model, skip))
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        # A default made at run time (default_factory) is described by the field's own help text.
        default = field.default if field.default not in (None, (), PydanticUndefined) else None
        help_text = (field.description or "") + (f" (default: {default})" if default is not None else "")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if field.annotation == tuple[str, ...]:  # repeatable: --stop A --stop B
            kwargs.update(action="append", metavar="TEXT")
        elif field.annotation is bool and field.default:  # on by default: --name / --no-name
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif field.annotation is bool:
            kwargs.update(action="store_const", const=True)
        else:
            kwargs.update(metavar=name.upper())
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def add_max_new_tokens_flag(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens for commands that take OpenAI requests (serve, batch): the budget of a request naming none."""
    parser.add_argument(
        "--max-new-tokens", dest="max_new_tokens", type=int, default=argparse.SUPPRESS, metavar="N",
        help=f"max_tokens for requests that send none (default: {SamplingParams.model_fields['max_new_tokens'].default})",
    )


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML, YAML or JSON file of settings (flags and VERISPEC_* env vars override it)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")


def _prompt_set_command(commands, name: str, help_text: str, depth_flag: str, depth_help: str) -> argparse.ArgumentParser:
    """A greedy run over a JSONL prompt set at a list of depths (check, bench)."""
    command = commands.add_parser(name, help=help_text)
    command.add_argument("--prompts", type=Path, default=DEMO_PROMPTS, help=PROMPTS_HELP)
    command.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    # dest 'depths': the list must not collide with the settings field `depth`.
    command.add_argument(depth_flag, dest="depths", default=argparse.SUPPRESS, metavar="DEPTHS", help=depth_help)
    add_settings_flags(command, ModelSettings)
    add_settings_flags(command, SpeculationSettings, skip=("depth",))
    add_settings_flags(command, SamplingParams, skip=("temperature", "top_k", "top_p", "seed", "stop"))
    add_common_flags(command)
    return command


def _depth_list(args: argparse.Namespace, flag: str) -> list[str] | None:
    if not hasattr(args, "depths"):
        return None
    depths = [d.strip() for d in args.depths.split(",") if d.strip()]
    if not depths:
        raise UserError(f"{flag} needs at least one depth, e.g. {flag} 4 or {flag} 2,4,auto")
    return depths


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="verispec", description="Exact speculative decoding for Hugging Face causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="continue a prompt, streaming verified tokens")
    generate.add_argument("prompt", metavar="PROMPT", help="text to continue; - reads standard input")
    add_settings_flags(generate, ModelSettings)
    add_settings_flags(generate, SpeculationSettings)
    add_settings_flags(generate, SamplingParams)
    generate.add_argument(
        "--chat", action="store_true",
        help="treat PROMPT as a user message and apply the model's chat template (as /v1/chat/completions does)",
    )  # fmt: skip
    generate.add_argument("--system", default=None, help="with --chat: a system message before PROMPT")
    generate.add_argument("--stats", action="store_true", help="print speculation statistics after the text")
    add_common_flags(generate)
    generate.set_defaults(run=_run_generate)

    check = _prompt_set_command(
        commands, "check", "greedy-decode every prompt verifier-only and speculatively; exit 1 on any difference",
        depth_flag="--depth", depth_help="comma-separated depths to check, e.g. 2,4,auto (default: the configured depth)",
    )
    check.add_argument("--report", type=Path, default=None, help="also write the results as JSON to this file")
    check.set_defaults(run=_run_check)

    bench = _prompt_set_command(
        commands, "bench", "time verispec (verifier-only, draft at each depth, n-gram) and transformers on the same prompts",
        depth_flag="--depths", depth_help="comma-separated draft-model depths to bench (default: 1,2,4,6,8,auto)",
    )
    # Defaults of the bench's own options live in run_bench's signature: SUPPRESS passes only what was given.
    bench.add_argument("--repeats", type=int, default=argparse.SUPPRESS, help="passes over the prompts (default: 1)")
    bench.add_argument("--out", type=Path, default=argparse.SUPPRESS, help="output folder (default: bench-out)")
    bench.add_argument(
        "--no-peers", dest="peers", action="store_false", default=argparse.SUPPRESS, help="skip the transformers generate() peers"
    )
    bench.set_defaults(run=_run_bench)

    serve = commands.add_parser("serve", help="serve the OpenAI API (completions, chat completions) over HTTP")
    add_settings_flags(serve, ModelSettings)
    add_settings_flags(serve, SpeculationSettings)
    add_settings_flags(serve, ServerSettings)
    add_settings_flags(serve, BatchSettings)
    add_settings_flags(serve, RoutingSettings)
    add_settings_flags(serve, AuditSettings)
    add_settings_flags(serve, TelemetrySettings)
    add_settings_flags(serve, ScaleSettings)
    add_max_new_tokens_flag(serve)
    add_common_flags(serve)
    serve.set_defaults(run=_run_serve)

    edge = commands.add_parser(
        "edge", help="continue a prompt with a local proposer against a remote verifier (the server's verify API)"
    )
    edge.add_argument("prompt", metavar="PROMPT", help="text to continue; - reads standard input")
    edge.add_argument("--url", default="http://127.0.0.1:8000", help="the verifying server (default: %(default)s)")
    edge.add_argument("--draft", default=None, help="draft model to propose with (its tokenizer must be the server's); default: n-gram lookup")
    edge.add_argument("--tokenizer", default=None, help="with the n-gram lookup: the server's tokenizer (default: none; the server tokenizes)")
    edge.add_argument("--api-key", default=os.environ.get("VERISPEC_API_KEY"), help="API key (env: VERISPEC_API_KEY)")
    edge.add_argument("--model", default=None, help="model name (default: the server's)")
    edge.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (default: the server's)")
    edge.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    edge.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s)")
    edge.add_argument("--top-k", type=int, default=0, help="0 = off (default: %(default)s)")
    edge.add_argument("--seed", type=int, default=None, help="seed of a sampled generation")
    edge.add_argument(
        "--depth", default="auto",
        help="drafts per round; auto: priced by the measured round trips; server: the server's hint, the least verifier "
        "time per token (default: %(default)s)",
    )  # fmt: skip
    edge.add_argument("--stats", action="store_true", help="print round trips, bytes and acceptance after the text")
    edge.add_argument("-v", "--verbose", action="store_true", help="log more")
    edge.set_defaults(run=_run_edge)

    from verispec.offline.command import add_batch_command
    from verispec.tools.loadtest import add_loadtest_command

    add_loadtest_command(commands)
    add_batch_command(commands)

    from verispec.audit.query import add_audit_command
    from verispec.training.distill import add_distill_command
    from verispec.training.train import add_train_command

    add_audit_command(commands)
    add_distill_command(commands)
    add_train_command(commands)
    return parser


def settings_from(args: argparse.Namespace, cls: type[Loaded] = Settings) -> Loaded:
    """The command's settings from its parsed flags (given ones only), `--config` and the environment."""
    flags = {name: value for name, value in vars(args).items() if name in cls.model_fields}
    return load_settings(flags, getattr(args, "config", None), cls)


def _run_generate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from verispec.assemble import build_engine
    from verispec.text import chat_prompt
    from verispec.tools.report import stats_table

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty; give some text to continue")
    if args.system is not None and not args.chat:
        raise UserError("--system needs --chat")
    settings = settings_from(args)
    engine = build_engine(settings)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        try:
            _, prompt = chat_prompt(engine.tokenizer, messages)
        except ValueError as exc:
            raise UserError(f"--chat: {exc}; give a plain prompt to continue instead") from None
    delta = None
    for delta in engine.stream(prompt, settings.part(SamplingParams)):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats and delta is not None and delta.stats is not None:
        proposer = engine.proposer.name if engine.proposer is not None else "none"
        Console(stderr=True).print(stats_table(delta.stats, title=f"finish: {delta.finish_reason}", proposer=proposer))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from verispec.tools.check import run_check

    depths = _depth_list(args, "--depth")
    return run_check(settings_from(args), args.prompts, depths=depths, limit=args.limit, report=args.report)


def _run_bench(args: argparse.Namespace) -> int:
    import shlex

    from verispec.tools.bench import run_bench

    options = {name: getattr(args, name) for name in ("repeats", "out", "peers") if hasattr(args, name)}
    depths = _depth_list(args, "--depths")
    if depths is not None:
        options["depths"] = depths
    command = shlex.join(["verispec", *sys.argv[1:]])
    return run_bench(settings_from(args), args.prompts, limit=args.limit, command=command, **options)


def _run_edge(args: argparse.Namespace) -> int:
    import httpx

    from verispec.edge import EdgeClient, EdgeError

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    depth = args.depth if args.depth in ("auto", "server") else _positive(args.depth, "--depth")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    http = httpx.Client(base_url=args.url, headers=headers, timeout=120.0)
    try:
        model = args.model or http.get("/v1/models").raise_for_status().json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise UserError(f"cannot ask {args.url} for its model ({exc}); is `verispec serve` running there? (or pass --model)") from None
    if args.draft:
        client = EdgeClient.with_draft(args.url, args.draft, model=model, depth=depth, http=http)
    else:
        tokenizer = None
        if args.tokenizer:
            from verispec.models import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        client = EdgeClient.with_ngram(args.url, model=model, tokenizer=tokenizer, depth=depth, http=http)
    try:
        for text in client.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed):  # fmt: skip
            print(text, end="", flush=True)
    except EdgeError as exc:
        raise UserError(f"the server refused the round: {exc}") from None
    except httpx.HTTPError as exc:
        raise UserError(f"lost the server at {args.url}: {exc}") from None
    print()
    if args.stats:
        last = client.last
        rate = f"{last.acceptance_rate:.2f}" if last.acceptance_rate is not None else "-"
        print(
            f"{len(last.token_ids)} tokens in {last.round_trips} round trips, acceptance {rate}, "
            f"{last.bytes_per_round:.0f} bytes per round, finish: {last.finish_reason}", file=sys.stderr,
        )
    return 0


def _positive(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{flag} takes a positive whole number, auto or server, not {text!r}")
    return int(text)


def _run_serve(args: argparse.Namespace) -> int:
    from verispec.server.serve import serve

    return serve(settings_from(args))


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server_like = args.command == "serve"
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if server_like else "verispec: %(levelname)s: %(message)s",
    )
    try:
        if args.command in MODEL_COMMANDS:
            _quiet_libraries()
        return args.run(args)
    except UserError as exc:
        print(f"verispec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("verispec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
