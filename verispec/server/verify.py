"""The verify API: an edge client proposes, this server verifies.

A client far from the server (a laptop, a phone-class device, a CPU pool near its users) runs the
proposer; the server runs only the verifier. One `POST /v1/verify` is one round:

- the first call opens a session: the prompt (text or token ids), the sampling settings, and the
  drafts the client made from the prompt;
- later calls send the session id, the client's verified length (`position`) and up to
  `--verify-max-drafts` new drafts, with the distributions they were drawn from when sampling
  (`draft_probs`, sparse: the ids and probabilities of each distribution's support);
- each answer gives the accepted count and the tokens that extend the verified context (the
  accepted drafts and the recovered or bonus token), decided by the engine's own acceptance rule.

Between rounds a session is parked: it holds no running slot (its next round queues for one like
any request) and keeps its KV while memory allows. One API key holds at most
`--verify-max-sessions` open sessions, and every round counts against the key's rate limits (one
request, and its drafts as tokens). A session expires after `--verify-idle-s` without a round and
leaves one audit record when it ends, however it ends, with the tokens the client received.

Retries are safe: a round whose answer was lost on the way (a timeout, a hang-up) can be sent
again, and the same position and drafts get the same answer without a second round; an opening
sent with an `Idempotency-Key` header and lost on the way gets the same session back.

Sampled drafts with `draft_probs` are accepted by the distributions the client reports: a client
that misreports them biases the output, which the server cannot see. The session's record says
that acceptance relied on client-reported probabilities, and `--no-verify-client-probs` refuses
them (greedy and point-mass drafts only: those are exact whatever the client does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, StrictFloat, StrictInt

from verispec.audit.records import utc_now
from verispec.proposers.base import Proposal
from verispec.proposers.remote import RemoteDrafts
from verispec.scale.sessions import new_session_id
from verispec.server.errors import APIError, bad_request
from verispec.server.job import Job
from verispec.server.logprobs import LogprobFormat
from verispec.server.openapi import VERIFY_RESPONSES
from verispec.server.protocol import _Part, _Request
from verispec.server.reply import Reply
from verispec.server.sessions import Opening, Session, Sessions
from verispec.server.underway import Underway
from verispec.stats import speculation_stats, usage

if TYPE_CHECKING:
    from verispec.server.intake import Intake
    from verispec.server.metrics import ServerMetrics
    from verispec.server.records import Records
    from verispec.server.safety import Safety
    from verispec.server.service import Service
    from verispec.server.serving import Serving

log = logging.getLogger("verispec.server")

_FIXED = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs")
_IDEMPOTENCY_KEY = "idempotency-key"


class DraftDistribution(_Part):
    """The distribution a draft was drawn from, as its support: token ids and their probabilities."""

    ids: list[StrictInt] = Field(min_length=1)
    probs: list[StrictFloat | StrictInt] = Field(min_length=1)


class VerifyRequest(_Request):
    session_id: str | None = Field(None, max_length=64)
    prompt: str | list[StrictInt] | None = None  # opens a session
    position: StrictInt | None = Field(None, ge=1)  # the client's verified length: prompt + accepted tokens
    drafts: list[StrictInt] = Field(default_factory=list)
    draft_probs: list[DraftDistribution] | None = None
    close: bool = False  # end the session now (the client stopped early)
    logprobs: int | None = Field(None, ge=0, le=20)  # each round's verified tokens' logprobs, as completions give them

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


def verify_routes(
    *, serving: Serving, intake: Intake, safety: Safety, records: Records, metrics: ServerMetrics, authorize,
) -> APIRouter:
    router = APIRouter()
    sessions = Sessions(serving.server.verify_idle_s, serving.server.verify_max_sessions)  # this router's alone

    @router.post("/v1/verify", responses=VERIFY_RESPONSES)
    async def verify(body: VerifyRequest, request: Request, key_id: str = Depends(authorize)) -> Response:
        service = serving.ready()
        intake.check_model(body)
        body.refuse_unsupported()
        if body.stream:
            raise bad_request("the verify API answers each round in one response; leave stream unset", param="stream")
        if body.n != 1:
            raise bad_request("a verify session is one sequence: n must be 1; open a session per sample", param="n")
        for name in ("depth", "proposer", "provisional"):
            if getattr(body, name) is not None:
                raise bad_request(f"{name} is not used by the verify API: the client drafts, as deep as it likes", param=name)
        safety.allow_verify()
        size = len(await request.body())
        if body.session_id is None:
            if body.prompt is None:
                raise bad_request("send a prompt to open a session, or a session_id to continue one", param="prompt")
            idempotency = request.headers.get(_IDEMPOTENCY_KEY)
            if idempotency is None:
                return _with_limits(await _open(body, request, service, key_id, size), request)
            return _with_limits(await _open_once(body, request, service, key_id, size, idempotency), request)
        if request.headers.get(_IDEMPOTENCY_KEY) is not None:
            raise bad_request("Idempotency-Key is for openings; a round is made safe to retry by its position", param=_IDEMPOTENCY_KEY)
        if given := [name for name in _FIXED if getattr(body, name) is not None]:
            verb = "is" if len(given) == 1 else "are"
            raise bad_request(f"{', '.join(given)} {verb} fixed when a session opens; send only drafts with a session_id", param=given[0])
        if (answer := sessions.replay(body.session_id, key_id, body.position, tuple(body.drafts))) is not None:
            request.state.audited = True  # the session's record covers its rounds
            return JSONResponse(answer)  # a round sent again: its answer was lost on the way
        session = sessions.get(body.session_id, key_id)
        if session.lock.locked():
            raise APIError(409, "a round of this session is in flight; send the next one after its answer", code="round_in_flight")
        async with session.lock:
            return _with_limits(await _continue(session, body, request, service, size), request)

    async def _open_once(body: VerifyRequest, request: Request, service: Service, key_id: str, size: int, idempotency: str) -> Response:
        """An opening that may be a retry: the same key and body get the first opening's answer,
        never a second session."""
        if not 0 < len(idempotency) <= 128 or not idempotency.isprintable():
            raise bad_request("Idempotency-Key must be 1 to 128 printable characters", param=_IDEMPOTENCY_KEY)
        key = (key_id, idempotency)
        digest = body.model_dump_json(exclude={"close"})
        while (earlier := sessions.openings.get(key)) is not None:
            if earlier.body != digest:
                raise APIError(
                    422, "this Idempotency-Key opened a session with a different body; use a new key for a new session",
                    code="idempotency_key_reused", param=_IDEMPOTENCY_KEY,
                )
            answer = await asyncio.shield(earlier.answered)
            if answer is not None:
                request.state.audited = True  # the first opening's record covers it
                return JSONResponse(answer)
            if sessions.openings.get(key) is earlier:  # it failed: this call opens in its place
                del sessions.openings[key]
        opening = Opening(digest, asyncio.get_running_loop().create_future())
        sessions.remember(key, opening)
        try:
            response = await _open(body, request, service, key_id, size, opening)
        finally:
            if not opening.answered.done():
                opening.answered.set_result(None)
        return response

    async def _open(body: VerifyRequest, request: Request, service: Service, key_id: str, size: int, opening: Opening | None = None) -> Response:
        with sessions.claim(key_id):  # the key's cap on open sessions
            return await _open_session(body, request, service, key_id, size, opening)

    async def _open_session(body: VerifyRequest, request: Request, service: Service, key_id: str, size: int, opening: Opening | None) -> Response:
        prompt_ids, prompt_text = await intake.prompt(service, body.prompt)
        if not prompt_ids:
            raise bad_request("the prompt is empty", param="prompt")
        if body.position is not None and body.position != len(prompt_ids):
            raise APIError(409, f"the prompt has {len(prompt_ids)} tokens here, not {body.position}: tokenize it with the server's tokenizer", code="position_mismatch", param="position")
        try:
            greedy = body.sampling(1).greedy
        except ValueError as exc:
            raise bad_request(f"invalid sampling settings: {exc}") from None
        proposal = _proposal(body, service, greedy)  # checked before the rate limits take from the key
        params = await intake.admit(request, service, body, prompt_ids, body.max_tokens, key_id)
        request_id = request.state.request_id
        deadline = serving.deadline()
        job = Job(
            request_id, prompt_ids, params, None, deadline, asyncio.get_running_loop(), key_id=key_id,
            remote=RemoteDrafts(proposal), proposer="edge", pinned=True, guarded=False, keep_rounds=records.telemetry.enabled,
        )  # its ask is fixed from here on: the engine thread reads it
        cluster = serving.cluster
        session_id = new_session_id(cluster.replica if cluster is not None else None)  # routable to this replica
        span = records.telemetry.start_request("verify", request.headers, {
            "gen_ai.request.max_tokens": params.max_new_tokens, "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p, "gen_ai.request.top_k": params.top_k or None, "gen_ai.request.seed": params.seed,
            "gen_ai.response.id": session_id, "verispec.request_id": request_id, "verispec.api_key_id": key_id,
            "verispec.edge.session_id": session_id,
        })
        request.state.audited = True
        underway = Underway(request_id, key_id, "/v1/verify", "verify", job, prompt_ids, prompt_text, params, span, utc_now(), edge={})
        await serving.submit(service, underway)
        gate = safety.gate(context=prompt_text)
        session = Session(session_id, key_id, underway, Reply(underway, None, gate, metrics, service.tokenizer), len(prompt_ids))
        if params.logprobs is not None:
            session.logprobs = LogprobFormat(False, service.tokenizer)
        session.client_prob_rounds += proposal.probs is not None
        sessions.add(session)
        metrics.verify_sessions.inc()
        opened = {"prompt_token_ids": prompt_ids} if isinstance(body.prompt, str) else {}  # a client without the tokenizer
        async with session.lock:
            response = await _round(session, proposal, size, opened)
            if opening is not None:
                opening.answered.set_result(session.last[2])
            if body.close and session.id in sessions.open:  # one round, then closed: nothing left parked
                session.job.cancel()
                await _end(session, "closed", "cancelled", 200)
            return response

    async def _continue(session: Session, body: VerifyRequest, request: Request, service: Service, size: int) -> Response:
        if body.position is not None and body.position != session.position:
            raise APIError(
                409, f"the session is at position {session.position}, this round was made at {body.position}; "
                "continue from the last answer's position", code="position_mismatch", param="position",
            )
        if session.id not in sessions.open:  # ended while this call waited for the lock
            sessions.get(session.id, session.key_id)
        if body.close and not body.drafts:
            request.state.audited = True
            session.job.cancel()
            await _end(session, "closed", "cancelled", 200)
            return JSONResponse({"object": "verify.round", "session_id": session.id, "finish_reason": "closed", "position": session.position})
        proposal = _proposal(body, service, session.underway.params.greedy)
        await intake.charge(request, session.key_id, len(proposal.tokens))  # a round is a request of its key
        request.state.audited = True  # the session's record covers its rounds
        if proposal.probs is not None:
            session.client_prob_rounds += 1
        service.scheduler.offer(session.job, proposal)
        response = await _round(session, proposal, size)
        if body.close and session.id in sessions.open:  # the client's last round: answered, then closed
            session.job.cancel()
            await _end(session, "closed", "cancelled", 200)
        return response

    async def _round(session: Session, proposal: Proposal, size: int, extra: dict | None = None) -> Response:
        """Wait for the round the drafts are in, and answer it."""
        before = session.position
        try:
            delta = await session.reply.next_verified()
        except APIError as exc:
            outcome = {504: "deadline", 410: "expired", 503: "cancelled"}.get(exc.status, "error")
            await _end(session, outcome, outcome, exc.status, error=exc.message)
            raise
        finally:
            session.last_active = time.monotonic()
        round_ = delta.round
        blocked = delta.finish_reason == "content_filter"
        token_ids = [] if blocked else delta.token_ids
        session.position += len(token_ids)
        session.rounds += 1
        proposed = round_.proposed if round_ is not None else 0
        accepted = round_.accepted if round_ is not None else 0
        metrics.client_drafts(session.key_id).inc(proposed)
        answer: dict[str, Any] = {"object": "verify.round", "session_id": session.id, "round": session.rounds, "proposed": proposed}
        if blocked:
            # The gate stopped the text: nothing past the released text, not even how many of the
            # drafts the verifier would have kept (that would confirm what the gate blocked).
            answer.update(token_ids=[], text=delta.text, position=session.position, finish_reason="content_filter")
        else:
            metrics.client_accepted(session.key_id).inc(accepted)
            answer.update(accepted=accepted, token_ids=token_ids, text=delta.text, position=session.position, finish_reason=delta.finish_reason)
            if session.logprobs is not None:  # those of the tokens whose text the gate released
                answer["logprobs"] = session.logprobs.render(delta.logprobs or [])
        answer.update(extra or {})
        if delta.finish_reason is None and session.job.remote.hint is not None:
            answer["depth_hint"] = session.job.remote.hint  # what pays best for the verifier
        if delta.finish_reason is not None:
            answer["usage"] = usage(delta.stats)  # a blocked round's stats count the tokens sent only
            if not blocked:
                answer["speculation_stats"] = speculation_stats(delta.stats, "edge")
        body = json.dumps(answer, separators=(",", ":"))
        session.bytes += size + len(body)
        metrics.verify_round_bytes.observe(size + len(body))
        session.last = (before, tuple(proposal.tokens), answer)
        if delta.finish_reason is not None:
            outcome = "content_filter" if blocked else "ok"
            if not await _end(session, "finished", outcome, 200, delta=delta, wait=True):
                raise records.unacknowledged()  # the answer that ends a session is its acknowledgement
        return Response(body, media_type="application/json")

    async def _end(session: Session, why: str, outcome: str, status: int, delta=None, error: str | None = None, wait: bool = False) -> bool:
        """Close the session and conclude it as one request: span, log line, audit record."""
        if not sessions.end(session, why):
            return True
        metrics.verify_sessions.dec()
        metrics.verify_round_trips.observe(session.rounds)
        rounds, sent = session.rounds, session.bytes
        session.underway.edge.update(round_trips=rounds, bytes=sent, bytes_per_round=round(sent / rounds) if rounds else 0)
        if session.client_prob_rounds:
            # Acceptance in these rounds rested on distributions the client reported, which the
            # server cannot check: the record must not vouch for the text as the verifier's alone.
            session.underway.edge.update(acceptance="client_reported_probs", client_prob_rounds=session.client_prob_rounds)
        return await records.conclude(session.underway, outcome, status, delta, session.reply.released, error=error, wait=wait)

    async def sweep() -> None:
        """Expire idle sessions: their slots and KV go to others."""
        for session in sessions.idle():
            log.info("verify session %s expired after %.0fs idle", session.id, sessions.idle_s)
            session.job.cancel("expired")
            await _end(session, "expired", "expired", 410, error=f"idle for more than {sessions.idle_s:g}s")

    async def close_all() -> None:
        """Shutdown: every open session ends, and is recorded."""
        for session in list(sessions.open.values()):
            session.job.cancel()
            await _end(session, "shutdown", "cancelled", 503, error="the server shut down")

    router.sweep = sweep  # the app's lifespan runs these
    router.close_all = close_all
    return router


def _with_limits(response: Response, request: Request) -> Response:
    """The key's rate-limit headers on a round's answer, as on any response that took from them."""
    response.headers.update(getattr(request.state, "extra_headers", {}))
    return response


def _proposal(body: VerifyRequest, service: Service, greedy: bool) -> Proposal:
    """The client's drafts as the acceptance rule takes them; a 400 for anything it cannot take.
    Distributions that are point masses on their drafts are taken as no distributions: acceptance
    then needs nothing of the client's word."""
    drafts = body.drafts
    target = service.engine.target
    vocab = target.vocab_size
    server = service.scheduler.server
    limit = server.verify_max_drafts
    if len(drafts) > limit:
        raise bad_request(f"{len(drafts)} drafts in one round; this server takes at most {limit} (--verify-max-drafts)", param="drafts")
    if any(not 0 <= t < vocab for t in drafts):
        raise bad_request(f"draft token ids must lie in [0, {vocab})", param="drafts")
    if body.draft_probs is None:
        # Greedy needs no distributions; sampled drafts without them are taken as a deterministic
        # guess (exact for an n-gram table, biased for drafts that were themselves sampled).
        return Proposal(list(drafts))
    if len(body.draft_probs) != len(drafts):
        raise bad_request(f"{len(body.draft_probs)} draft distributions for {len(drafts)} drafts; send one per draft", param="draft_probs")
    if greedy or not drafts:
        return Proposal(list(drafts))
    probs = torch.zeros(len(drafts), vocab, dtype=torch.float32)
    for i, (token, dist) in enumerate(zip(drafts, body.draft_probs, strict=True)):
        where = f"draft_probs[{i}]"
        if len(dist.ids) != len(dist.probs):
            raise bad_request(f"{where}: {len(dist.ids)} ids but {len(dist.probs)} probabilities", param="draft_probs")
        if len(set(dist.ids)) != len(dist.ids) or any(not 0 <= t < vocab for t in dist.ids):
            raise bad_request(f"{where}: ids must be distinct token ids in [0, {vocab})", param="draft_probs")
        values = torch.tensor([float(p) for p in dist.probs], dtype=torch.float64)
        if not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any():
            raise bad_request(f"{where}: probabilities must lie in [0, 1]", param="draft_probs")
        total = float(values.sum())
        if abs(total - 1.0) > 1e-3:
            raise bad_request(f"{where}: probabilities sum to {total:.6f}, not 1; send the whole distribution the draft was drawn from", param="draft_probs")
        row = dict(zip(dist.ids, values.tolist(), strict=True))
        if row.get(token, 0.0) <= 0.0:
            raise bad_request(f"{where}: the draft token {token} has no probability in its own distribution", param="draft_probs")
        probs[i, torch.tensor(dist.ids)] = (values / total).float()
    if bool((probs.max(dim=-1).values >= 1.0 - 1e-6).all()):  # point masses: the same as sending none
        return Proposal(list(drafts))
    if not server.verify_client_probs:
        raise bad_request(
            "this server takes no client-reported draft distributions (--no-verify-client-probs): send the drafts "
            "without draft_probs (each is then taken as a point mass, which is exact whatever the client does)",
            param="draft_probs", code="client_probs_refused",
        )
    return Proposal(list(drafts), probs.to(target.device))
