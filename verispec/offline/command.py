"""`verispec batch INPUT.jsonl --output OUTPUT.jsonl`: the command, and the order of a job.

1. read INPUT (refusing duplicate custom_ids before any model loads);
2. resume: cut a partial last line off OUTPUT and skip the requests it already answers; refuse the
   job if OUTPUT answers a custom_id for another request than INPUT's (with --redo-changed, remove
   those answers and answer the requests again);
3. run the rest locally (`job.py`) or on Ray actors (`ray_job.py`), appending each result line to
   OUTPUT as soon as it is done;
4. print the summary to stderr (and write it as JSON with --summary).

The job exits 0 once every request has its line, refused and failed ones included: the summary
counts them, and their lines carry the reason. It exits 2, answering nothing, when OUTPUT holds
answers to changed requests and --redo-changed is not given.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from verispec.config import (
    BatchSettings,
    ModelSettings,
    ServerSettings,
    Settings,
    SpeculationSettings,
)
from verispec.errors import UserError
from verispec.flags import add_common_flags, add_max_new_tokens_flag, add_settings_flags, settings_from

log = logging.getLogger(__name__)

INPUT_HELP = (
    "JSONL file of requests in the OpenAI Batch API's format, one per line: "
    '{"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {"model": "any", "prompt": "def f(", '
    '"max_tokens": 64}}; url /v1/completions or /v1/chat/completions. The body is checked as `verispec serve` checks '
    "a request (its model is not: answers name this job's model). A line that names no custom_id (not valid JSON, "
    'say) is answered with "custom_id": null and "line": N, its 1-based line number'
)


class BatchJobSettings(BaseModel):
    """One batch job: where requests come from and go, and how the work is spread."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Path = Field(description="JSONL file of requests")
    output: Path = Field(
        description="JSONL file of results, appended to: run the same command again to finish a job that was cut short"
    )
    summary: Path | None = Field(None, description="also write the job's summary as JSON to this file")
    redo_changed: bool = Field(
        False,
        description="answer again the requests whose custom_id OUTPUT answers for another request (an edited "
        "prompt, other sampling settings) or without a request_digest (an older verispec's output), replacing "
        "those answers; without it such a job is refused, naming them",
    )  # fmt: skip
    max_running: int = ServerSettings.model_fields["max_running"]
    workers: int = Field(1, ge=1, description="with --ray: actors, each loading its own engine")
    ray: bool = Field(False, description="spread the job over a Ray cluster with Ray Data (needs verispec[scale])")
    ray_address: str | None = Field(None, description="with --ray: join the Ray cluster at this address; default: start a local one")
    actor_cpus: float = Field(0.5, gt=0.0, description="with --ray: CPUs each actor reserves (a fraction lets actors share cores)")
    ray_batch_size: int = Field(
        32, ge=1,
        description="with --ray: request lines per Ray Data batch, the unit an actor answers and the driver writes; "
        "a few times --max-running keeps an actor's engine full (a killed job redoes the batches in flight)",
    )  # fmt: skip


def add_batch_command(commands) -> None:

    command = commands.add_parser(
        "batch", help="answer a JSONL file of OpenAI batch requests offline, resumably",
        description="Answer every request of a JSONL file in the OpenAI Batch API's format and append one result "
        "line per request to OUTPUT, in the order they finish (not the input's), as OpenAI's batch output does. "
        "Run the same command again after a crash or a kill: requests OUTPUT already answers are skipped, and "
        "every custom_id ends up in OUTPUT exactly once. A request edited since OUTPUT answered it (same "
        "custom_id) refuses the job, naming it; --redo-changed answers it again. Requests run batched, "
        "--max-running at a time, in one verifier pass per step; with --ray they are spread over Ray Data actors.",
    )  # fmt: skip
    command.add_argument("input", type=Path, metavar="INPUT", help=INPUT_HELP)
    add_settings_flags(command, BatchJobSettings, skip=("input",))
    add_settings_flags(command, ModelSettings)
    add_settings_flags(command, SpeculationSettings)
    add_settings_flags(command, BatchSettings)
    add_max_new_tokens_flag(command)
    add_common_flags(command)
    command.set_defaults(run=_run)


class BatchCommandSettings(BatchJobSettings, Settings):
    """Everything `verispec batch` reads: the job's own settings and the engine's, from one config
    file, `VERISPEC_*` variables and flags."""


def job_settings(args: argparse.Namespace) -> tuple[Settings, BatchJobSettings]:

    loaded = settings_from(args, BatchCommandSettings)
    job = loaded.part(BatchJobSettings)
    if job.output.resolve() == job.input.resolve():
        raise UserError("--output must not be the input file")
    return loaded.part(Settings), job


def _run(args: argparse.Namespace) -> int:
    from verispec.offline.jsonl import changed, describe_changed, forget, read_input, resume
    from verispec.offline.summary import Tally, render, write_summary

    settings, job = job_settings(args)
    lines = read_input(job.input)
    done = resume(job.output)
    redo = changed(lines, done)
    if redo and not job.redo_changed:
        raise UserError(describe_changed(redo, done, job.output))
    if redo:
        keys = {line.key for line in redo}
        log.warning("answering %d changed request(s) again: %s", len(redo), ", ".join(line.name for line in redo[:5]))
        forget(job.output, keys)
        done = {key: digest for key, digest in done.items() if key not in keys}
    pending = [line for line in lines if line.key not in done]
    tally = Tally(total=len(lines), skipped=len(lines) - len(pending))
    if len(done) > tally.skipped:
        log.warning("%s answers %d requests that %s does not hold; they are left as they are",
                    job.output, len(done) - tally.skipped, job.input)  # fmt: skip
    described = _described(settings, job)
    load_s, wall_s = 0.0, 0.0
    if pending:
        if job.ray:
            from verispec.offline.ray_job import preflight

            preflight(settings)
        load_s, wall_s, described["runner"] = _answer(pending, settings, job, tally)
    summary = tally.summary(wall_s, load_s, described)
    print(render(summary, job.output), file=sys.stderr)
    if job.summary is not None:
        write_summary(summary, job.summary)
    return 0


def _answer(pending: list, settings: Settings, job: BatchJobSettings, tally) -> tuple[float | None, float, str]:
    """Answer the pending lines into OUTPUT: the models' load time (None on Ray: the actors load
    theirs while the job runs), the time answering took, and what ran them (the local engine's
    scheduler, batched or interleaved, or ray)."""
    from verispec.offline.jsonl import OutputWriter
    from verispec.offline.summary import Progress

    with OutputWriter(job.output) as writer:
        progress = Progress(len(pending), tally)

        def emit(result) -> None:
            writer.write(result.line)
            tally.add(result)
            progress.update()

        try:
            if job.ray:
                from verispec.offline.ray_job import run_ray

                started = time.perf_counter()
                run_ray(pending, settings, job.max_running, job.workers, job.actor_cpus, job.ray_batch_size, job.ray_address, emit)
                return None, time.perf_counter() - started, "ray"
            from verispec.offline.job import Worker

            t0 = time.perf_counter()
            worker = Worker(settings, job.max_running)
            started = time.perf_counter()
            progress.begin()
            try:
                worker.run(pending, emit)
            finally:
                worker.close()
            return started - t0, time.perf_counter() - started, worker.scheduler
        finally:
            progress.close()


def _described(settings: Settings, job: BatchJobSettings) -> dict:
    """What produced the figures: the job's and the engine's settings."""
    parts = (ModelSettings, SpeculationSettings, BatchSettings)
    names = {name for part in parts for name in part.model_fields} | {"max_new_tokens"}
    return {**job.model_dump(mode="json"), **settings.model_dump(mode="json", include=names)}
