"""The OpenAI generation routes: `/v1/completions` and `/v1/chat/completions`, plain or streamed.

A request is checked (`Serving.ready`; `Intake`: model, prompt, budget, sampling, rate limit;
`Safety`: provisional text), queued on the scheduler as a `Job` (`Serving.submit`), answered
from its `Reply` (verified text only, through the policy gate) as one JSON body or as server-sent
events ending in `data: [DONE]` once its audit record is committed (`Records.conclude`).

A request of `n` choices is `n` jobs (`Choice`), each with its own seed (`choice_params`) and
record; the first starts alone, so that the others find the prompt's KV in the prefix cache. A
chat request with tools reads its calls out of each choice's text (`tool_calls.Reader`); `echo`
puts the prompt, and its logprobs, before a choice's output."""

from __future__ import annotations

import asyncio
import functools
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import PreTrainedTokenizerBase

from verispec.audit.outcomes import Outcome
from verispec.audit.records import utc_now
from verispec.core.rounds import Delta, TokenLogprob
from verispec.server.errors import APIError, bad_request
from verispec.server.intake import Intake
from verispec.server.job import Job
from verispec.server.logprobs import LogprobFormat
from verispec.server.metrics import ServerMetrics
from verispec.server.openapi import CHAT_RESPONSES, COMPLETION_RESPONSES
from verispec.server.protocol import (
    Answer,
    ChatCompletionRequest,
    CompletionRequest,
    Shape,
    answer,
    chat_prompt_text,
    echoed_logprobs,
)
from verispec.server.protocol import choice_params as choice_params_of
from verispec.server.records import Records
from verispec.server.reply import ClientGone, Provisional, Reply
from verispec.server.safety import Safety
from verispec.server.service import Service
from verispec.server.serving import Serving
from verispec.server.underway import Underway
from verispec.server.worker import CpuWorker
from verispec.stats import speculation_stats
from verispec.tool_calls import Reader, ToolCall


def completion_routes(
    *, serving: Serving, intake: Intake, safety: Safety, records: Records, worker: CpuWorker, metrics: ServerMetrics,
    authorize: Callable[[Request], Awaitable[str]],
) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions", responses=COMPLETION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request, key_id: str = Depends(authorize)) -> Response:
        service = serving.ready()
        intake.check_model(body)
        body.refuse_unsupported()
        prompt_ids, text = await intake.prompt(service, body.single_prompt())
        return await _generate(request, service, body, prompt_ids, text, body.max_tokens, key_id, chat=False, echo=body.echo)

    @router.post("/v1/chat/completions", responses=CHAT_RESPONSES)
    async def chat(body: ChatCompletionRequest, request: Request, key_id: str = Depends(authorize)) -> Response:
        service = serving.ready()
        intake.check_model(body)
        body.refuse_unsupported()
        tokenizer = service.tokenizer
        text, tools = await worker.run(chat_prompt_text, body, tokenizer, service.engine.target.vocab_size, intake.model_name)
        prompt_ids = await intake.tokenize(tokenizer, text, add_special_tokens=False)
        return await _generate(request, service, body, prompt_ids, text, body.token_limit, key_id, chat=True, tools=tools)

    async def _generate(
        request: Request, service: Service, body, prompt_ids: list[int], prompt_text: str, max_tokens: int | None,
        key_id: str, chat: bool, tools: Callable[[], Reader] | None = None, echo: bool = False,
    ) -> Response:
        if not prompt_ids:
            raise bad_request("the prompt is empty", param="prompt")
        params = await intake.admit(request, service, body, prompt_ids, max_tokens, key_id, choices=body.n)
        if body.provisional:
            safety.allow_provisional(body)
        request_id = request.state.request_id
        deadline = serving.deadline()
        routing_key = {"user": body.user, "task": body.task}.get(serving.settings.route_key)
        if body.proposer is not None:
            if body.proposer not in service.router.proposers:
                names = ", ".join(sorted(service.router.proposers))
                raise bad_request(f"unknown proposer '{body.proposer}'; this server has: {names}", param="proposer")
            proposer, pinned = body.proposer, True
        else:
            proposer, pinned = service.router.choose(routing_key), False
        operation = "chat" if chat else "text_completion"
        request.state.audited = True  # the records are this handler's from here on

        async def start(index: int) -> Choice:
            """Choice `index`: its job queued, with its own record (the request's id, its own seed)."""
            choice_params = choice_params_of(params, index)
            job = Job(
                request_id, prompt_ids, choice_params, body.depth, deadline, asyncio.get_running_loop(), key_id=key_id,
                drafter=service.router.proposers[proposer], proposer=proposer, route_key=routing_key, pinned=pinned,
                guarded=not service.router.on_trial(proposer), provisional=bool(body.provisional),
                inspect=random.random() < records.audit.mismatch_sample_rate, keep_rounds=records.telemetry.enabled,
            )  # its ask is fixed from here on: the engine thread reads it
            metrics.proposer_requests(job.proposer).inc()
            span = records.telemetry.start_request(operation, request.headers, {
                "gen_ai.request.max_tokens": params.max_new_tokens, "gen_ai.request.temperature": params.temperature,
                "gen_ai.request.top_p": params.top_p, "gen_ai.request.top_k": params.top_k or None,
                "gen_ai.request.seed": choice_params.seed, "gen_ai.request.stop_sequences": list(params.stop) or None,
                "gen_ai.request.choice.count": body.n if body.n > 1 else None,
                "gen_ai.response.id": request_id, "verispec.request_id": request_id, "verispec.api_key_id": key_id,
                "verispec.inspected": job.inspect, "verispec.provisional": job.provisional or None,
            })
            underway = Underway(
                request_id, key_id, request.url.path, operation, job, prompt_ids, prompt_text, choice_params, span, utc_now()
            )
            reply = Reply(underway, request, safety.gate(context=prompt_text), metrics, service.tokenizer)
            choice = Choice(
                index, job, reply, functools.partial(records.conclude, underway), tools() if tools else None,
                echo=(prompt_text, prompt_ids[0]) if echo else None,
            )
            await serving.submit(service, underway)  # a full queue: 503, this choice concluded
            return choice

        logprobs = None if params.logprobs is None else LogprobFormat(chat, service.tokenizer)
        shape = Shape(chat, ("chatcmpl-" if chat else "cmpl-") + request_id, intake.model_name, logprobs)
        with_stats = body.speculation_stats if body.speculation_stats is not None else serving.server.speculation_stats
        headers = getattr(request.state, "extra_headers", {})
        choices: list[Choice] = []
        try:
            for index in range(body.n):
                choices.append(await start(index))  # a full queue: 503, that choice concluded, the others below
                if index == 0 and body.n > 1:  # its prompt's KV is in the prefix cache once it has a token:
                    choices[0].first = await choices[0].reply.next()  # the other choices start from there
            for choice in choices:
                if choice.first is None:
                    choice.first = await choice.reply.next()  # errors before the first token keep their status
        except ClientGone:
            await _abandon(choices, "cancelled", 499, "client disconnected")
            return Response(status_code=499)  # nobody reads it; the log and metrics record the departure
        except APIError as exc:
            await _abandon(choices, _outcome_of(exc), exc.status, exc.message)
            raise
        except BaseException:
            for choice in choices:
                choice.job.cancel()
            raise
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            if len(choices) == 1:
                events = _sse(choices[0], shape, with_stats, include_usage, records, worker)
            else:
                events = _sse_many(choices, shape, with_stats, include_usage, records)
            return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        outcomes = await asyncio.gather(*(choice.complete() for choice in choices), return_exceptions=True)
        for choice in choices:
            choice.job.cancel()  # a no-op once finished; frees the slot if the client left
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if isinstance(failed, ClientGone):
            await _abandon(choices, "cancelled", 499, "client disconnected")
            return Response(status_code=499)
        if isinstance(failed, APIError):
            await _abandon(choices, _outcome_of(failed), failed.status, failed.message)
            raise failed
        if failed is not None:
            await _abandon(choices, "error", 500, "internal error")
            raise failed
        recorded = await asyncio.gather(*(c.finish(_outcome_of_finish(d), 200, d, c.reply.released, wait=True)
                                          for c, d in zip(choices, outcomes, strict=True)))  # fmt: skip
        if not all(recorded):  # acknowledged only once recorded
            raise records.unacknowledged()
        answers = [choice.answer(delta) for choice, delta in zip(choices, outcomes, strict=True)]
        return JSONResponse(shape.full_many(answers, with_stats), headers=headers)

    return router


async def _sse(
    choice: Choice, shape: Shape, with_stats: bool, include_usage: bool, records: Records, worker: CpuWorker,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: verified tokens only, then `data: [DONE]`. A
    client that asked for provisional text also gets named events (which OpenAI's clients never
    see, as they never ask): `event: provisional` with a round's drafts as soon as they are made,
    and `event: verdict` with the verifier's answer, just before the round's verified chunk. With
    tools (`reader`), text that may be a call is held back and each call is sent whole once read."""

    reply, finish, reader, first = choice.reply, choice.finish, choice.reader, choice.first
    job = reply.job
    concluded = False
    tokens: list[int] = list(job.prompt_ids[-_DRAFT_CONTEXT:])  # verified context for decoding drafts
    rounds = 0
    try:
        item = first
        if shape.chat:
            yield _event(shape.chunk(None, role=True))
        while True:
            if isinstance(item, Provisional):
                text = await worker.run(_draft_text, reply.tokenizer, tokens, item.token_ids)
                yield _event({"id": shape.id, "round": rounds, "token_ids": item.token_ids, "text": text}, "provisional")
            else:
                delta = item
                if job.provisional and delta.round is not None:
                    verdict = {"id": shape.id, "round": rounds, "proposed": delta.round.proposed, "accepted": delta.round.kept_drafts}
                    yield _event(verdict, "verdict")
                    rounds += 1
                if job.provisional:  # the context the next round's drafts are decoded after
                    tokens = (tokens + delta.token_ids)[-_DRAFT_CONTEXT:]
                if (echoed := choice.echoed()) is not None:
                    yield _event(shape.chunk(echoed[0], logprobs=echoed[1]))
                text, calls = _read(reader, delta)
                if text or delta.logprobs or calls:
                    yield _event(shape.chunk(text, logprobs=delta.logprobs, tool_calls=calls))
                if delta.finish_reason is not None:
                    break
            try:
                item = await reply.next()
            except APIError as exc:  # the stream has begun: the error goes in-band
                concluded = True
                await finish(_outcome_of(exc), exc.status, text=reply.released, error=exc.message)
                yield _event(exc.body())
                yield "data: [DONE]\n\n"
                return
            except ClientGone:
                return
        final = shape.chunk(None, _finish_reason(reader, delta))
        if with_stats:
            final["speculation_stats"] = speculation_stats(delta.stats, job.proposer)
        yield _event(final)
        if include_usage:
            yield _event(shape.usage_chunk(delta.stats))
        concluded = True
        if await finish(_outcome_of_finish(delta), 200, delta, reply.released, wait=True):  # [DONE] acknowledges: recorded first
            yield "data: [DONE]\n\n"
        else:  # not recorded: an error instead of [DONE], so the client knows it was not acknowledged
            yield _event(records.unacknowledged().body())
    finally:
        job.cancel()  # client gone or done: the engine thread drops the job at its next round
        if not concluded:  # the client left mid-stream
            await asyncio.shield(finish("cancelled", 499, text=reply.released, error="client disconnected"))


async def _sse_many(
    choices: list[Choice], shape: Shape, with_stats: bool, include_usage: bool, records: Records,
) -> AsyncIterator[str]:
    """The stream of a request with `n` > 1: each choice's verified chunks as they come, with its
    index, and its final chunk when it ends; usage (of all) and `[DONE]` once every choice ended
    and all their records are committed. An error in one choice ends the stream in-band."""
    queue: asyncio.Queue[tuple[Choice, Delta | Provisional | Exception]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        item = choice.first
        try:
            while True:
                await queue.put((choice, item))
                if isinstance(item, Delta) and item.finish_reason is not None:
                    return
                item = await choice.reply.next()
        except (APIError, ClientGone) as exc:
            await queue.put((choice, exc))

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    ended: dict[int, Delta] = {}
    concluded = False
    try:
        if shape.chat:
            for choice in choices:
                yield _event(shape.chunk(None, role=True, index=choice.index))
        while len(ended) < len(choices):
            choice, item = await queue.get()
            if isinstance(item, ClientGone):
                return
            if isinstance(item, APIError):  # the stream has begun: the error goes in-band
                concluded = True
                await _abandon(choices, _outcome_of(item), item.status, item.message)
                yield _event(item.body())
                yield "data: [DONE]\n\n"
                return
            if not isinstance(item, Delta):
                continue  # provisional drafts are for n=1 streams only
            if (echoed := choice.echoed()) is not None:
                yield _event(shape.chunk(echoed[0], logprobs=echoed[1], index=choice.index))
            text, calls = _read(choice.reader, item)
            if text or item.logprobs or calls:
                yield _event(shape.chunk(text, logprobs=item.logprobs, tool_calls=calls, index=choice.index))
            if item.finish_reason is not None:
                ended[choice.index] = item
                final = shape.chunk(None, _finish_reason(choice.reader, item), index=choice.index)
                if with_stats:
                    final["speculation_stats"] = speculation_stats(item.stats, choice.job.proposer)
                yield _event(final)
        if include_usage:
            yield _event(shape.usage_chunk(*(ended[c.index].stats for c in choices)))
        concluded = True
        recorded = await asyncio.gather(*(
            c.finish(_outcome_of_finish(ended[c.index]), 200, ended[c.index], c.reply.released, wait=True) for c in choices
        ))  # fmt: skip
        if all(recorded):  # [DONE] acknowledges: recorded first
            yield "data: [DONE]\n\n"
        else:
            yield _event(records.unacknowledged().body())
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            choice.job.cancel()
        if not concluded:  # the client left mid-stream
            await asyncio.shield(_abandon(choices, "cancelled", 499, "client disconnected"))


@dataclass(eq=False)
class Choice:
    """One of a request's `n` choices: its job, what its client may see, how it is concluded."""

    index: int
    job: Job
    reply: Reply
    finish: Callable[..., Awaitable[bool]]  # `records.conclude` of its record
    reader: Reader | None = None  # its tool calls, where the request has tools
    echo: tuple[str, int] | None = None  # the prompt's text and first token, to send before the output (`echo`)
    first: Delta | Provisional | None = None
    _echoed: bool = False

    def echoed(self) -> tuple[str, list[TokenLogprob] | None] | None:
        """Once, where the request asked for `echo`: the prompt's text, with its logprobs where asked
        for. Called with the first verified delta at hand."""
        if self.echo is None or self._echoed:
            return None
        self._echoed = True
        text, first = self.echo
        return text, echoed_logprobs(first, self.reply.prompt_logprobs)

    async def complete(self) -> Delta:
        delta = self.first
        while delta.finish_reason is None:
            delta = await self.reply.next_verified()
        return delta

    def answer(self, last: Delta) -> Answer:
        released = self.reply.released
        return answer(released, last, self.job.proposer, self.reply.released_logprobs, self.reader, self.echoed())


async def _abandon(choices: list[Choice], outcome: Outcome, status: int, error: str) -> None:
    """End every choice without an answer for the client: jobs stopped, records concluded with what
    each client was sent."""
    for choice in choices:
        choice.job.cancel()
    await asyncio.gather(*(c.finish(outcome, status, text=c.reply.released, error=error) for c in choices))


def _read(reader: Reader | None, delta: Delta) -> tuple[str, list[tuple[int, ToolCall]]]:
    """A delta's text as content, and the tool calls it completes with their indices."""
    if reader is None:
        return delta.text, []
    called = len(reader.calls)
    text, new = reader.feed(delta.text)
    if delta.finish_reason is not None:
        text += reader.finish()[0]
    return text, list(enumerate(new, called))


def _finish_reason(reader: Reader | None, last: Delta) -> str:
    return "tool_calls" if reader is not None and reader.calls and last.finish_reason == "stop" else last.finish_reason


def _event(body: dict, name: str | None = None) -> str:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(body, separators=(',', ':'))}\n\n"


_DRAFT_CONTEXT = 8  # verified tokens decoded before a round's drafts, so their text joins up right


def _draft_text(tokenizer: PreTrainedTokenizerBase, context: list[int], drafts: list[int]) -> str:
    """The text drafts add after the verified context (for display: the verified text is final)."""
    before = tokenizer.decode(context)
    after = tokenizer.decode(context + drafts)
    return after[len(before):] if after.startswith(before) else tokenizer.decode(drafts)


def _outcome_of_finish(delta: Delta) -> Outcome:
    return "content_filter" if delta.finish_reason == "content_filter" else "ok"


def _outcome_of(exc: APIError) -> Outcome:
    return {504: "deadline", 503: "cancelled"}.get(exc.status, "error")
