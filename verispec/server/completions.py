"""The OpenAI generation routes: `/v1/completions` and `/v1/chat/completions`, plain or streamed.

A request is checked (`Serving.ready`; `Intake`: model, prompt, budget, sampling, rate limit;
`Safety`: provisional text), queued on the scheduler as a `Job` (`Serving.submit`), answered
from its `Reply` (verified text only, through the policy gate) as one JSON body or as server-sent
events ending in `data: [DONE]` once its audit record is committed (`Records.conclude`)."""

from __future__ import annotations

import asyncio
import functools
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import PreTrainedTokenizerBase

from verispec.audit.outcomes import Outcome
from verispec.audit.records import utc_now
from verispec.core.grammar import compiled
from verispec.core.rounds import Delta
from verispec.errors import UserError
from verispec.server.errors import APIError, bad_request
from verispec.server.intake import Intake
from verispec.server.job import Job
from verispec.server.logprobs import LogprobFormat
from verispec.server.metrics import ServerMetrics
from verispec.server.openapi import CHAT_RESPONSES, COMPLETION_RESPONSES
from verispec.server.protocol import ChatCompletionRequest, CompletionRequest, Shape
from verispec.server.records import Records
from verispec.server.reply import ClientGone, Provisional, Reply
from verispec.server.safety import Safety
from verispec.server.service import Service
from verispec.server.serving import Serving
from verispec.server.underway import Underway
from verispec.server.worker import CpuWorker
from verispec.stats import speculation_stats
from verispec.tool_calls import Reader, constraint, render


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
        return await _generate(request, service, body, prompt_ids, text, body.max_tokens, key_id, chat=False)

    @router.post("/v1/chat/completions", responses=CHAT_RESPONSES)
    async def chat(body: ChatCompletionRequest, request: Request, key_id: str = Depends(authorize)) -> Response:
        service = serving.ready()
        intake.check_model(body)
        body.refuse_unsupported()
        tokenizer = service.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise bad_request(
                f"model '{intake.model_name}' has no chat template, so it cannot take messages; use /v1/completions with a prompt",
                param="messages", code="no_chat_template",
            )
        messages = [m.turn() for m in body.messages]
        functions, choice = body.functions(), body.tool_choice_name
        try:
            text = await worker.run(render, tokenizer, messages, functions, choice)
        except Exception as exc:  # templates raise on conversations they do not support
            raise bad_request(f"the model's chat template refused these messages: {exc}", param="messages") from None
        reader = None
        if choice != "none":
            parallel = body.parallel_tool_calls is not False and choice in ("auto", "required")  # a named function: one call
            fmt = constraint(tokenizer, functions, choice, parallel)
            if fmt is not None:  # compiled here, so that a schema it cannot follow is the tools' 400
                try:
                    await worker.run(compiled, fmt, tokenizer, service.engine.target.vocab_size)
                except UserError as exc:
                    raise bad_request(f"the tools' parameter schemas cannot be followed: {exc}", param="tools") from None
                body.constrain_to(fmt)
            reader = Reader(tokenizer, functions, parallel)
        prompt_ids = await intake.tokenize(tokenizer, text, add_special_tokens=False)
        return await _generate(request, service, body, prompt_ids, text, body.token_limit, key_id, chat=True, reader=reader)

    async def _generate(
        request: Request, service: Service, body, prompt_ids: list[int], prompt_text: str, max_tokens: int | None,
        key_id: str, chat: bool, reader: Reader | None = None,
    ) -> Response:
        if not prompt_ids:
            raise bad_request("the prompt is empty", param="prompt")
        params = await intake.admit(request, service, body, prompt_ids, max_tokens, key_id)
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
        job = Job(
            request_id, prompt_ids, params, body.depth, deadline, asyncio.get_running_loop(), key_id=key_id,
            drafter=service.router.proposers[proposer], proposer=proposer, route_key=routing_key, pinned=pinned,
            guarded=not service.router.on_trial(proposer), provisional=bool(body.provisional),
            inspect=random.random() < records.audit.mismatch_sample_rate, keep_rounds=records.telemetry.enabled,
        )  # its ask is fixed from here on: the engine thread reads it
        metrics.proposer_requests(job.proposer).inc()
        operation = "chat" if chat else "text_completion"
        span = records.telemetry.start_request(operation, request.headers, {
            "gen_ai.request.max_tokens": params.max_new_tokens, "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p, "gen_ai.request.top_k": params.top_k or None,
            "gen_ai.request.seed": params.seed, "gen_ai.request.stop_sequences": list(params.stop) or None,
            "gen_ai.response.id": request_id, "verispec.request_id": request_id, "verispec.api_key_id": key_id,
            "verispec.inspected": job.inspect, "verispec.provisional": job.provisional or None,
        })
        request.state.audited = True  # the record is this handler's from here on
        underway = Underway(request_id, key_id, request.url.path, operation, job, prompt_ids, prompt_text, params, span, utc_now())
        finish = functools.partial(records.conclude, underway)
        await serving.submit(service, underway)
        request.state.job = job
        reply = Reply(underway, request, safety.gate(context=prompt_text), metrics, service.tokenizer)
        logprobs = None if params.logprobs is None else LogprobFormat(chat, service.tokenizer)
        shape = Shape(chat, ("chatcmpl-" if chat else "cmpl-") + request_id, intake.model_name, logprobs)
        with_stats = body.speculation_stats if body.speculation_stats is not None else serving.server.speculation_stats
        headers = getattr(request.state, "extra_headers", {})
        try:
            first = await reply.next()  # errors before the first token keep their status
        except ClientGone:
            await finish("cancelled", 499, error="client disconnected")
            return Response(status_code=499)  # nobody reads it; the log and metrics record the departure
        except APIError as exc:
            job.cancel()
            await finish(_outcome_of(exc), exc.status, error=exc.message)
            raise
        except BaseException:
            job.cancel()
            raise
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = _sse(reply, shape, first, with_stats, include_usage, finish, records, worker, reader)
            return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        delta = first
        try:
            while delta.finish_reason is None:
                delta = await reply.next_verified()
        except ClientGone:
            await finish("cancelled", 499, text=reply.released, error="client disconnected")
            return Response(status_code=499)
        except APIError as exc:
            await finish(_outcome_of(exc), exc.status, text=reply.released, error=exc.message)
            raise
        finally:
            job.cancel()  # a no-op once finished; frees the slot if the client left
        if not await finish(_outcome_of_finish(delta), 200, delta, reply.released, wait=True):  # acknowledged only once recorded
            raise records.unacknowledged()
        text, calls = reply.released, None
        if reader is not None:
            content, _ = reader.feed(text)
            rest, _ = reader.finish()
            text, calls = content + rest, reader.calls
        finish_reason = "tool_calls" if calls and delta.finish_reason == "stop" else delta.finish_reason
        body = shape.full(text, finish_reason, delta.stats, with_stats, job.proposer, reply.released_logprobs, calls)
        return JSONResponse(body, headers=headers)

    return router


async def _sse(
    reply: Reply, shape: Shape, first: Delta | Provisional, with_stats: bool, include_usage: bool, finish, records: Records,
    worker: CpuWorker, reader: Reader | None = None,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: verified tokens only, then `data: [DONE]`. A
    client that asked for provisional text also gets named events (which OpenAI's clients never
    see, as they never ask): `event: provisional` with a round's drafts as soon as they are made,
    and `event: verdict` with the verifier's answer, just before the round's verified chunk. With
    tools (`reader`), text that may be a call is held back and each call is sent whole once read."""

    def event(body: dict, name: str | None = None) -> str:
        head = f"event: {name}\n" if name else ""
        return f"{head}data: {json.dumps(body, separators=(',', ':'))}\n\n"

    job = reply.job
    concluded = False
    tokens: list[int] = list(job.prompt_ids[-_DRAFT_CONTEXT:])  # verified context for decoding drafts
    rounds = 0
    try:
        item = first
        if shape.chat:
            yield event(shape.chunk(None, role=True))
        while True:
            if isinstance(item, Provisional):
                text = await worker.run(_draft_text, reply.tokenizer, tokens, item.token_ids)
                yield event({"id": shape.id, "round": rounds, "token_ids": item.token_ids, "text": text}, "provisional")
            else:
                delta = item
                if job.provisional and delta.round is not None:
                    verdict = {"id": shape.id, "round": rounds, "proposed": delta.round.proposed, "accepted": delta.round.accepted}
                    yield event(verdict, "verdict")
                    rounds += 1
                if job.provisional:  # the context the next round's drafts are decoded after
                    tokens = (tokens + delta.token_ids)[-_DRAFT_CONTEXT:]
                text, calls = delta.text, []
                if reader is not None:
                    called = len(reader.calls)
                    text, new = reader.feed(delta.text)
                    if delta.finish_reason is not None:
                        rest, _ = reader.finish()
                        text += rest
                    calls = list(enumerate(new, called))
                if text or delta.logprobs or calls:
                    yield event(shape.chunk(text, logprobs=delta.logprobs, tool_calls=calls))
                if delta.finish_reason is not None:
                    break
            try:
                item = await reply.next()
            except APIError as exc:  # the stream has begun: the error goes in-band
                concluded = True
                await finish(_outcome_of(exc), exc.status, text=reply.released, error=exc.message)
                yield event(exc.body())
                yield "data: [DONE]\n\n"
                return
            except ClientGone:
                return
        called = reader is not None and reader.calls
        final = shape.chunk(None, "tool_calls" if called and delta.finish_reason == "stop" else delta.finish_reason)
        if with_stats:
            final["speculation_stats"] = speculation_stats(delta.stats, job.proposer)
        yield event(final)
        if include_usage:
            yield event(shape.usage_chunk(delta.stats))
        concluded = True
        if await finish(_outcome_of_finish(delta), 200, delta, reply.released, wait=True):  # [DONE] acknowledges: recorded first
            yield "data: [DONE]\n\n"
        else:  # not recorded: an error instead of [DONE], so the client knows it was not acknowledged
            yield event(records.unacknowledged().body())
    finally:
        job.cancel()  # client gone or done: the engine thread drops the job at its next round
        if not concluded:  # the client left mid-stream
            await asyncio.shield(finish("cancelled", 499, text=reply.released, error="client disconnected"))


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
