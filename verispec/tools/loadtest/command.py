"""`verispec loadtest`: the command, its flags generated from `LoadtestSettings`.

Without --table: N clients against a running server (`clients.loadtest`), a rich table of the
figures, exit 1 when any request failed. With --table: see `table.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from verispec.flags import add_common_flags, add_settings_flags, settings_from
from verispec.tools.loadtest.settings import ClientOptions, LoadtestSettings, TableOptions, default_prompts


def add_loadtest_command(commands) -> None:

    command = commands.add_parser(
        "loadtest", help="concurrent streaming clients against a running `verispec serve` (--table: servers of its own)",
        description="Concurrent streaming clients against a running `verispec serve`. With --table it starts one server "
                    "per scheduler itself and measures every concurrency level x proposer x scheduler, then the prefix "
                    "and chunked-prefill scenarios, and prints a markdown table.",
    )  # fmt: skip
    add_settings_flags(command, ClientOptions)
    group = command.add_argument_group(
        "--table", "start one `verispec serve` per scheduler on free loopback ports and measure a grid of cells"
    )
    add_settings_flags(command, TableOptions, group=group)
    add_common_flags(command)
    command.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from verispec.prompts import load_prompts
    from verispec.tools.loadtest.clients import loadtest
    from verispec.tools.loadtest.report import print_report

    settings = settings_from(args, LoadtestSettings)
    if settings.table:
        from verispec.tools.loadtest import table

        return table.run(settings)
    prompts = default_prompts() if settings.prompts is None else load_prompts(settings.prompts)
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    report = asyncio.run(loadtest(
        settings.url.rstrip("/"), prompts, settings.concurrency, 32 if settings.requests is None else settings.requests,
        64 if settings.max_tokens is None else settings.max_tokens, api_key, settings.compare_speculation,
        settings.rounds if settings.compare_speculation else 1, settings.warmup,
        60.0 if settings.wait_s is None else settings.wait_s, settings.provisional,
    ))  # fmt: skip
    print_report(report)
    if settings.out:
        settings.out.parent.mkdir(parents=True, exist_ok=True)
        settings.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = sum(r["requests"] - r["ok"] for r in report["results"])
    return 1 if failed else 0
