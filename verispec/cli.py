"""`verispec` command line: generate, check, bench, serve (one process, or replicas on Ray Serve), edge, batch, loadtest, audit, train, distill.

Flags are generated from pydantic settings models, so each default lives in one place: config.py's
for the engine and the server, and each command's own beside its code (tools/settings.py for check
and bench, tools/loadtest/settings.py, edge/command.py, audit/query.py, offline/command.py), read
from flags, `VERISPEC_*` environment variables and a --config file (`settings_from`).
Errors a user can cause print one line and exit 2.

Nothing here imports torch or transformers at module level, and neither do the modules the parser
is built from: they cost seconds, and `--help`, `audit` and `loadtest` never load a model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, NoReturn

from pydantic import BaseModel

from verispec.config import (
    AuditSettings,
    BatchSettings,
    ModelSettings,
    RoutingSettings,
    SamplingParams,
    ScaleSettings,
    ServerSettings,
    SpeculationSettings,
    TelemetrySettings,
)
from verispec.errors import UserError
from verispec.flags import (  # noqa: F401 - commands once imported these from here
    add_common_flags,
    add_max_new_tokens_flag,
    add_settings_flags,
    flag_names,
    quiet_libraries,
    settings_from,
)
from verispec.tools.settings import (
    DEMO_PROMPTS,  # noqa: F401 - scripts and tests import it from here
    BenchOptions,
    BenchSettings,
    CheckOptions,
    CheckSettings,
)

# Commands that load models: only these pay for importing transformers to silence its logging.
MODEL_COMMANDS = frozenset({"generate", "check", "bench", "serve", "distill", "train", "batch", "edge"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"verispec: error: {message} (see `{self.prog} --help`)\n")


def _prompt_set_command(commands, name: str, help_text: str, options: type[BaseModel], **flags: Any) -> argparse.ArgumentParser:
    """A greedy run over a JSONL prompt set at a list of depths (check, bench): the field `depths`
    (check's flag for it is also --depth, its older name). The engine's own `depth` is no flag here."""
    command = commands.add_parser(name, help=help_text)
    add_settings_flags(command, options, **flags)
    add_settings_flags(command, ModelSettings)
    add_settings_flags(command, SpeculationSettings, skip=("depth",))
    add_settings_flags(command, SamplingParams, skip=("temperature", "top_k", "top_p", "seed", "stop"))
    add_common_flags(command)
    return command


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
        CheckOptions, aliases={"depths": ("--depth",)},
    )  # fmt: skip
    check.set_defaults(run=_run_check)

    bench = _prompt_set_command(
        commands, "bench", "time verispec (verifier-only, draft or head at each depth, n-gram) and transformers on the same prompts",
        BenchOptions,
    )  # fmt: skip
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

    from verispec.edge.command import add_edge_command
    from verispec.offline.command import add_batch_command
    from verispec.tools.loadtest import add_loadtest_command

    add_edge_command(commands)
    add_loadtest_command(commands)
    add_batch_command(commands)

    from verispec.audit.query import add_audit_command
    from verispec.training.distill import add_distill_command
    from verispec.training.train import add_train_command

    add_audit_command(commands)
    add_distill_command(commands)
    add_train_command(commands)
    return parser


def _run_generate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from verispec.assemble import build_engine
    from verispec.text import chat_prompt
    from verispec.tools.report import logprobs_table, stats_table

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
    delta, logprobs, prompt_logprobs = None, [], []
    for delta in engine.stream(prompt, settings.part(SamplingParams)):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        logprobs += delta.logprobs or []
        prompt_logprobs += delta.prompt_logprobs or []  # on the first delta only
    sys.stdout.write("\n")
    if settings.prompt_logprobs is not None:
        title = "prompt logprobs (verifier, after the request's bias)"  # position 0 has none
        Console(stderr=True).print(logprobs_table(prompt_logprobs, engine.tokenizer, title, first=1))
    if settings.logprobs is not None:
        Console(stderr=True).print(logprobs_table(logprobs, engine.tokenizer))
    if args.stats and delta is not None and delta.stats is not None:
        proposer = engine.proposer.name if engine.proposer is not None else "none"
        Console(stderr=True).print(stats_table(delta.stats, title=f"finish: {delta.finish_reason}", proposer=proposer))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from verispec.tools.check import run_check

    settings = settings_from(args, CheckSettings)
    return run_check(
        settings, settings.prompts, depths=settings.depths or None, limit=settings.limit, report=settings.report,
        sampled=settings.sampled,
    )


def _run_bench(args: argparse.Namespace) -> int:
    import shlex

    from verispec.tools.bench import run_bench

    settings = settings_from(args, BenchSettings)
    return run_bench(
        settings, settings.prompts, depths=settings.depths, repeats=settings.repeats, limit=settings.limit,
        out=settings.out, peers=settings.peers, command=shlex.join(["verispec", *sys.argv[1:]]), head=settings.head,
    )  # fmt: skip


def _run_serve(args: argparse.Namespace) -> int:
    from verispec.server.serve import serve

    return serve(settings_from(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server_like = args.command == "serve"
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if server_like else "verispec: %(levelname)s: %(message)s",
    )
    try:
        if args.command in MODEL_COMMANDS:
            quiet_libraries()
        return args.run(args)
    except UserError as exc:
        print(f"verispec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("verispec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
