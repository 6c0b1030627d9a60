"""One engine running request lines to result lines, batched as the server batches.

The engine (`core/engine.py`) holds up to `max_running` requests: each step advances all of them
by one round in one verifier pass (on a backend that cannot batch, one after another), and a
finished request's slot takes the next line at once. Greedy output is the verifier's own, token
for token; a sampled request with a `seed` draws from its own generator, so it does not depend on
what shares its passes (with `--depth auto` its depth follows the step costs measured at start,
so only a fixed `--depth` makes it the same in another process).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from verispec.assemble import build_engine, resolve_models
from verispec.config import ModelSettings, Settings
from verispec.core.rounds import Delta, TokenLogprob
from verispec.errors import UserError
from verispec.models.loading import model_name
from verispec.offline.jsonl import InputLine, error_line, result_line
from verispec.offline.prepare import Context, Prepared, prepare
from verispec.offline.summary import Result
from verispec.server.errors import APIError, bad_request
from verispec.stats import RequestStats

log = logging.getLogger(__name__)


class Worker:
    """Loads the engine once and runs request lines through it, `max_running` at a time."""

    def __init__(self, settings: Settings, max_running: int):
        self.engine = engine = build_engine(settings.model_copy(update={"max_running": max_running}))
        self.max_running = max_running
        engine.prepare([engine.proposer])
        self.scheduler = "batched" if engine.runner.batches else "interleaved"
        models = resolve_models(settings.part(ModelSettings))
        self.context = Context(
            tokenizer=engine.tokenizer, window=engine.target.max_positions, vocab_size=engine.target.vocab_size,
            max_new_tokens=settings.max_new_tokens, model=model_name(models.target), proposer=models.proposer,
        )  # fmt: skip
        self.proposer_name = engine.proposer.name if engine.proposer is not None else "none"

    def token_s(self) -> float:
        """The verifier-only counterfactual's price: the one-token step, as the live passes have it
        now (a start-up measurement on a busy machine would inflate every saving)."""
        return self.engine.costs().verify(1)

    def run(self, lines: Iterable[InputLine], emit: Callable[[Result], None]) -> None:
        """Answer every line, calling `emit` with each result as soon as it is done (in the order
        requests finish, not the input's)."""
        pending = iter(lines)
        running: dict[object, tuple[Prepared, list[str], list[TokenLogprob]]] = {}
        exhausted = False
        while True:
            while not exhausted and len(running) < self.max_running:
                line = next(pending, None)
                if line is None:
                    exhausted = True
                    break
                try:
                    prepared = prepare(line, self.context)
                    handle = self.engine.add(
                        line.custom_id, prepared.prompt_ids, prepared.params, self.engine.speculation,
                        self.engine.proposer, depth=prepared.depth,
                    )  # fmt: skip
                except APIError as exc:
                    emit(Result(line.name, error_line(line, exc), exc.status))
                    continue
                except UserError as exc:  # the core's own check of the prompt
                    emit(Result(line.name, error_line(line, bad_request(str(exc))), 400))
                    continue
                running[handle] = (prepared, [], [])
            if not running:
                return
            try:
                outcomes = self.engine.step()
            except Exception as exc:  # noqa: BLE001 (as the server does: the step's requests end, the job goes on)
                log.exception("a batched engine step failed; its %d requests are answered with 500", len(running))
                outcomes = [(handle, exc) for handle in running]
            for handle, outcome in outcomes:
                if handle not in running:
                    continue
                prepared, text, logprobs = running[handle]
                if isinstance(outcome, Exception):
                    del running[handle]
                    self.engine.abort(handle)
                    emit(self._failed(prepared, outcome))
                    continue
                text.append(outcome.text)
                logprobs += outcome.logprobs or []
                if outcome.finish_reason is not None:
                    del running[handle]
                    emit(self._done(prepared, "".join(text), outcome, logprobs))

    def _done(self, prepared: Prepared, text: str, delta: Delta, logprobs: list[TokenLogprob]) -> Result:
        stats: RequestStats = delta.stats
        body = prepared.shape.full(text, delta.finish_reason, stats, prepared.with_stats, self.proposer_name, logprobs)
        return Result(
            name=prepared.line.name,
            line=result_line(prepared.line, 200, body),
            status=200,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.generated_tokens,
            proposed=stats.proposed,
            accepted=stats.accepted,
            busy_s=stats.prefill_s + stats.propose_s + stats.verify_s,
            verifier_only_s=stats.generated_tokens * self.token_s() + stats.prefill_s,
        )

    def _failed(self, prepared: Prepared, exc: Exception) -> Result:
        line = prepared.line
        if isinstance(exc, UserError):
            error = bad_request(str(exc))
        else:
            log.error("request %s failed in the engine: %r", line.name, exc)
            error = APIError(500, f"the engine failed on this request: {exc!r}; the job's log has the details")
        return Result(line.name, error_line(line, error), error.status)

    def close(self) -> None:
        self.engine.close()
