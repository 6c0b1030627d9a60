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
from dataclasses import dataclass, field

from verispec.assemble import build_engine, resolve_models
from verispec.config import ModelSettings, Settings
from verispec.core.rounds import Delta, TokenLogprob
from verispec.errors import UserError
from verispec.models.loading import model_name
from verispec.offline.jsonl import InputLine, error_line, result_line
from verispec.offline.prepare import Context, Prepared, prepare
from verispec.offline.summary import Result
from verispec.server.errors import APIError, bad_request
from verispec.server.protocol import Answer, answer, echoed_logprobs
from verispec.stats import RequestStats
from verispec.tool_calls import Reader

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
        requests finish, not the input's). A line of `n` choices is `n` requests of the engine,
        answered together once all have finished (or with the first one's error)."""
        pending = iter(lines)
        running: dict[object, _Choice] = {}
        exhausted = False
        while True:
            while not exhausted and len(running) < self.max_running:
                line = next(pending, None)
                if line is None:
                    exhausted = True
                    break
                try:
                    prepared = prepare(line, self.context)
                    answers = _Answers(prepared)
                    for index in range(prepared.n):
                        handle = self.engine.add(
                            f"{line.custom_id}/{index}" if prepared.n > 1 else line.custom_id, prepared.prompt_ids,
                            prepared.choice(index), self.engine.speculation, self.engine.proposer, depth=prepared.depth,
                        )  # fmt: skip
                        running[handle] = _Choice(answers, index, prepared.tools() if prepared.tools else None)
                except APIError as exc:
                    emit(Result(line.name, error_line(line, exc), exc.status))
                    continue
                except UserError as exc:  # the core's own check of the prompt
                    for handle in [h for h, c in running.items() if c.answers.prepared.line is line]:
                        self.engine.abort(handle)
                        del running[handle]
                    emit(Result(line.name, error_line(line, bad_request(str(exc))), 400))
                    continue
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
                choice = running[handle]
                answers = choice.answers
                if isinstance(outcome, Exception):  # the line's answer is this error: its other choices end too
                    for other in [h for h, c in running.items() if c.answers is answers]:
                        del running[other]
                        self.engine.abort(other)
                    emit(self._failed(answers.prepared, outcome))
                    continue
                choice.take(outcome)
                if outcome.finish_reason is not None:
                    del running[handle]
                    answers.done[choice.index] = choice.answer(outcome, self.proposer_name)
                    if len(answers.done) == answers.prepared.n:
                        emit(self._done(answers))

    def _done(self, answers: _Answers) -> Result:
        prepared = answers.prepared
        done = [answers.done[i] for i in range(prepared.n)]
        body = prepared.shape.full_many(done, prepared.with_stats)
        stats: list[RequestStats] = [a.stats for a in done]
        return Result(
            name=prepared.line.name,
            line=result_line(prepared.line, 200, body),
            status=200,
            prompt_tokens=stats[0].prompt_tokens,
            completion_tokens=sum(s.generated_tokens for s in stats),
            proposed=sum(s.proposed for s in stats),
            accepted=sum(s.accepted for s in stats),
            busy_s=sum(s.prefill_s + s.propose_s + s.verify_s for s in stats),
            verifier_only_s=sum(s.generated_tokens * self.token_s() + s.prefill_s for s in stats),
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


@dataclass(eq=False)
class _Answers:
    """A line's finished choices, by index."""

    prepared: Prepared
    done: dict[int, Answer] = field(default_factory=dict)


@dataclass(eq=False)
class _Choice:
    """One running choice of a line: its text and logprobs so far."""

    answers: _Answers
    index: int
    reader: Reader | None
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None

    def take(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.logprobs += delta.logprobs or []
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs

    def answer(self, last: Delta, proposer: str) -> Answer:
        prepared = self.answers.prepared
        echo = None
        if prepared.echo is not None:
            echo = (prepared.echo[0], echoed_logprobs(prepared.echo[1], self.prompt_logprobs))
        return answer("".join(self.text), last, proposer, self.logprobs, self.reader, echo)
