"""`verispec loadtest`: concurrent streaming clients against a running `verispec serve`.

N clients share a fixed count of requests (greedy completions over a prompt set) and each
records what a user would see: time to first token, end-to-end latency, tokens, and the HTTP
status. With `--compare-speculation` the run alternates phases with the server's speculation and
verifier-only phases (the `depth: 0` extension), A B A B ..., against the same server, so that
machine drift hits both alike; figures are then given per configuration. With `--provisional`
the requests also ask for the drafts before their verdict (`event: provisional`), and the report
sets the time to the first draft token beside the time to the first verified one.

With `--table` it starts its own servers instead, one `verispec serve` per scheduler (batched,
interleaved), and measures a grid of cells, concurrency x proposer x scheduler, plus two
scenarios (a shared prefix, and a long prompt arriving among running streams); see `table.py`.

The rooms: `settings.py` (the options), `command.py` (the command), `clients.py` (the streaming
clients and their figures), `report.py` (what is printed), `table.py`, `scenarios.py` and
`servers.py` (the --table mode). Scripts use `loadtest()` and `default_prompts()` (`settings.py`)
from here.
"""

from __future__ import annotations

from verispec.tools.loadtest.clients import (
    Phase,
    Sample,
    _one,
    _percentile,
    itl_gaps,
    loadtest,
    provisional_figures,
    run_phase,
    summarize,
)
from verispec.tools.loadtest.command import add_loadtest_command
from verispec.tools.loadtest.report import (
    print_report,
    render_report,
    render_table,
    summary_lines,
    table_rows,
)
from verispec.tools.loadtest.scenarios import chunked_figures
from verispec.tools.loadtest.servers import serve_args
from verispec.tools.loadtest.settings import (
    DEFAULT_PROMPTS,
    PROPOSERS,
    SCENARIOS,
    SCHEDULERS,
    LoadtestSettings,
    default_prompts,
    parse_levels,
    parse_list,
)
from verispec.tools.loadtest.table import cell_plan, requests_per_cell, run_table

__all__ = [
    "DEFAULT_PROMPTS",
    "PROPOSERS",
    "SCENARIOS",
    "SCHEDULERS",
    "LoadtestSettings",
    "Phase",
    "Sample",
    "_one",
    "_percentile",
    "add_loadtest_command",
    "cell_plan",
    "chunked_figures",
    "default_prompts",
    "itl_gaps",
    "loadtest",
    "parse_levels",
    "parse_list",
    "print_report",
    "provisional_figures",
    "render_report",
    "render_table",
    "requests_per_cell",
    "run_phase",
    "run_table",
    "serve_args",
    "summarize",
    "summary_lines",
    "table_rows",
]
