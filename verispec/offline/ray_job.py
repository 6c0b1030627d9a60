"""`verispec batch --ray`: the pending request lines spread over Ray Data actors.

`ray.data.from_items(lines).map_batches(BatchActor, ...)`: each actor loads the engine once and
runs its batches of lines through the same `Worker` as a local job (the engine, up to
`--max-running` requests at a time); the driver iterates the results and is the only writer of the
output, so the resume guarantee is the local job's. A killed job loses at most the batches in
flight (`--ray-batch-size` lines each), which the next run answers again.

The actors import verispec from the environment they run in (on one machine: this one); a cluster
across machines needs verispec installed on every node, or a `runtime_env`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

from verispec.config import (
    BatchSettings,
    ModelSettings,
    SamplingParams,
    Settings,
    SpeculationSettings,
    load_settings,
)
from verispec.errors import UserError
from verispec.offline.jsonl import InputLine, parse_line
from verispec.offline.summary import Result

log = logging.getLogger(__name__)


def worker_settings(settings: Settings) -> dict:
    """The settings a worker reads, as a plain dict: every one given, so no worker's environment
    or config file can change them (see `load_settings`)."""
    names = {*ModelSettings.model_fields, *SpeculationSettings.model_fields, *BatchSettings.model_fields,
             *SamplingParams.model_fields, "max_running"}  # fmt: skip
    from verispec.assemble import portable_model_refs

    return portable_model_refs(settings.model_dump(include=names))


class BatchActor:
    """A Ray Data map_batches callable: one engine per actor, a batch of lines in, results out."""

    def __init__(self, settings: dict, max_running: int):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import transformers

        from verispec.offline.job import Worker

        transformers.utils.logging.set_verbosity_error()
        self.worker = Worker(load_settings(settings), max_running)

    def __call__(self, batch: dict) -> dict:
        lines = [parse_line(int(number), bytes(raw)) for number, raw in zip(batch["number"], batch["raw"], strict=True)]
        results: list[Result] = []
        self.worker.run(lines, results.append)
        return {name: [getattr(r, name) for r in results] for name in Result.__dataclass_fields__}


def preflight(settings: Settings) -> None:
    """Refuse, before any actor starts, what no actor could do: run without Ray, or load these
    models (a missing path, tokenizers that differ). An actor's failure reads far worse."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError("--ray needs Ray Data: install verispec[scale] (pip install 'verispec[scale]')") from None
    from verispec.assemble import check_models

    check_models(settings)


def run_ray(
    lines: list[InputLine], settings: Settings, max_running: int, workers: int, actor_cpus: float, batch_size: int,
    address: str | None, emit: Callable[[Result], None],
) -> None:  # fmt: skip
    """Answer every line on Ray actors, calling `emit` on the driver with each result as it arrives
    (call `preflight` first)."""
    import ray
    import ray.data

    try:
        local = {} if address else {"include_dashboard": False}  # options for starting a cluster, not for joining one
        ray.init(address=address, logging_level=logging.WARNING, **local)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise UserError(f"--ray: could not start or join {where}: {exc}") from None
    if not log.isEnabledFor(logging.INFO):  # Ray Data's plan and timing lines, at -v only
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job's own bar counts the lines
        items = [{"number": line.number, "raw": line.raw} for line in lines]
        dataset = ray.data.from_items(items).map_batches(
            BatchActor,
            fn_constructor_kwargs={"settings": worker_settings(settings), "max_running": max_running},
            compute=ray.data.ActorPoolStrategy(size=workers),
            batch_size=batch_size,
            num_cpus=actor_cpus,
        )
        for row in _rows(dataset):
            emit(Result.from_row(row))
    finally:
        ray.shutdown()


def _rows(dataset) -> Iterator[dict]:
    """The dataset's rows; a worker's UserError (a model that does not load) as the driver's own."""
    try:
        yield from dataset.iter_rows()
    except Exception as exc:
        # Ray wraps an actor's exception, in its creation task only as text: the traceback's last line.
        marker = f"{UserError.__module__}.{UserError.__name__}: "
        for line in reversed(str(exc).splitlines()):
            if line.startswith(marker):
                raise UserError(f"a Ray actor failed: {line.removeprefix(marker)}") from None
        raise
