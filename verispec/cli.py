"""`verispec` command line: generate, check, bench.

Flags are generated from the pydantic settings (config.py), so each default lives in one place.
Errors a user can cause print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel

from verispec.config import ModelSettings, SamplingParams, Settings, SpeculationSettings, load_settings
from verispec.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"verispec: error: {message} (see `{self.prog} --help`)\n")


def _add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        default = field.default if field.default not in (None, ()) else None
        help_text = (field.description or "") + (f" (default: {default})" if default is not None else "")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if name == "stop":
            kwargs.update(action="append", metavar="TEXT")
        elif field.annotation is bool:
            kwargs.update(action="store_const", const=True)
        else:
            kwargs.update(metavar=name.upper())
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML or JSON file of settings (flags and VERISPEC_* env vars override it)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="verispec", description="Exact speculative decoding for Hugging Face causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="continue a prompt, streaming verified tokens")
    generate.add_argument("prompt", metavar="PROMPT", help="text to continue; - reads standard input")
    _add_settings_flags(generate, ModelSettings)
    _add_settings_flags(generate, SpeculationSettings)
    _add_settings_flags(generate, SamplingParams)
    generate.add_argument("--stats", action="store_true", help="print speculation statistics after the text")
    _common_flags(generate)
    generate.set_defaults(run=_run_generate)

    check = commands.add_parser(
        "check", help="greedy-decode every prompt verifier-only and speculatively; exit 1 on any difference"
    )
    check.add_argument("--prompts", type=Path, required=True, help="JSONL file, one object with a 'prompt' field per line")
    check.add_argument("--limit", type=int, default=None, help="check only the first N prompts")
    check.add_argument(
        "--depth", dest="depths", default=None, metavar="DEPTHS", help="comma-separated depths to check, e.g. 2,4,auto (default: the configured depth)"
    )
    check.add_argument("--report", type=Path, default=None, help="also write the results as JSON to this file")
    _add_settings_flags(check, ModelSettings)
    _add_settings_flags(check, SpeculationSettings, skip=("depth",))
    _add_settings_flags(check, SamplingParams, skip=("temperature", "top_k", "top_p", "seed", "stop"))
    _common_flags(check)
    check.set_defaults(run=_run_check)

    bench = commands.add_parser(
        "bench", help="time verispec (verifier-only, draft at each depth, n-gram) and transformers on the same prompts"
    )
    bench.add_argument("--prompts", type=Path, required=True, help="JSONL file, one object with a 'prompt' field per line")
    bench.add_argument("--limit", type=int, default=None, help="bench only the first N prompts")
    # Defaults of the bench's own options live in run_bench's signature: SUPPRESS passes only what was given.
    bench.add_argument(
        "--depths", dest="depths", default=argparse.SUPPRESS, metavar="DEPTHS",
        help="comma-separated draft-model depths to bench (default: 1,2,4,6,8,auto)",
    )
    bench.add_argument("--repeats", type=int, default=argparse.SUPPRESS, help="passes over the prompts (default: 1)")
    bench.add_argument("--out", type=Path, default=argparse.SUPPRESS, help="output folder (default: bench-out)")
    bench.add_argument(
        "--no-peers", dest="peers", action="store_false", default=argparse.SUPPRESS, help="skip the transformers generate() peers"
    )
    _add_settings_flags(bench, ModelSettings)
    _add_settings_flags(bench, SpeculationSettings, skip=("depth",))
    _add_settings_flags(bench, SamplingParams, skip=("temperature", "top_k", "top_p", "seed", "stop"))
    _common_flags(bench)
    bench.set_defaults(run=_run_bench)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    flags = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return load_settings(flags, args.config)


def _run_generate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from verispec.assemble import build_engine
    from verispec.report import stats_table

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty; give some text to continue")
    settings = settings_from(args)
    engine = build_engine(settings)
    delta = None
    for delta in engine.stream(prompt, settings.part(SamplingParams)):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats and delta is not None and delta.stats is not None:
        Console(stderr=True).print(stats_table(delta.stats, title=f"finish: {delta.finish_reason}"))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from verispec.check import run_check

    depths = None
    if args.depths is not None:
        depths = [d.strip() for d in args.depths.split(",") if d.strip()]
        if not depths:
            raise UserError("--depth needs at least one depth, e.g. --depth 4 or --depth 2,4,auto")
    return run_check(settings_from(args), args.prompts, depths=depths, limit=args.limit, report=args.report)


def _run_bench(args: argparse.Namespace) -> int:
    import shlex

    from verispec.bench import run_bench

    options = {name: getattr(args, name) for name in ("repeats", "out", "peers") if hasattr(args, name)}
    if hasattr(args, "depths"):
        options["depths"] = [d.strip() for d in args.depths.split(",") if d.strip()]
        if not options["depths"]:
            raise UserError("--depths needs at least one depth, e.g. --depths 4 or --depths 1,2,4,auto")
    command = shlex.join(["verispec", *sys.argv[1:]])
    return run_bench(settings_from(args), args.prompts, limit=args.limit, command=command, **options)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="verispec: %(levelname)s: %(message)s"
    )
    try:
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
