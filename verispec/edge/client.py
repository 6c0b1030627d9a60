"""The edge client: a local proposer, a remote verifier (the server's verify API).

    from verispec.edge import EdgeClient

    client = EdgeClient.with_draft("http://verifier:8000", "path/to/draft", model="code-model")
    for text in client.stream("def fib(n):", max_tokens=64):
        print(text, end="", flush=True)

Each round the client drafts up to `depth` tokens with its own model (or n-gram table) from the
verified context, sends them, and extends the context with the answer: the accepted drafts and
the verifier's recovered or bonus token. The server decides with the engine's acceptance rule, so
greedy output is exactly the verifier's own, and sampled output is distributed exactly as the
verifier samples: the client sends the distribution each sampled draft was drawn from, truncated to
its `support` most likely tokens, and draws the draft from that same truncated distribution
(speculative sampling is exact for whatever distribution the drafts come from, as long as the one
reported is the one drawn from).

When it pays: the verifier does one pass per round whoever drafts, so an edge proposer saves the
server its proposer's compute and memory (a server that runs no draft model serves more clients),
never latency: every round costs a network round trip, and once that exceeds a verifier step the
client is slower than a server-side proposer. With depth "auto" the client prices each depth with
the round trips it measures, so a slow link drafts deeper; with depth "server" it drafts as deep as
the server's `depth_hint` says pays best for the verifier, which spends the least server time per
token and the most round trips.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import httpx
import torch

from verispec.config import SamplingParams
from verispec.core.depth import AdaptiveDepth, StepCosts
from verispec.core.sampling import request_generator
from verispec.proposers.base import DraftPolicy, Proposer


class EdgeError(Exception):
    """The server refused a round; `status` and `code` are its answer's."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.code = status, code


@dataclass
class EdgeStats:
    """What one generation cost: round trips, bytes, drafts and how many the verifier kept."""

    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    proposed: int = 0
    accepted: int = 0
    propose_s: float = 0.0
    wait_s: float = 0.0  # time in round trips: the network and the server's round
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def bytes_per_round(self) -> float:
        return (self.bytes_sent + self.bytes_received) / self.round_trips if self.round_trips else 0.0


class EdgeClient:
    def __init__(
        self,
        base_url: str,
        proposer: Proposer | None,
        tokenizer,
        model: str,
        api_key: str | None = None,
        depth: int | str = "auto",
        max_depth: int = 8,
        support: int = 64,
        timeout_s: float = 120.0,
        http: httpx.Client | None = None,
    ):
        """`proposer` None sends no drafts (every round is one verifier step); `support`: sampled
        drafts come from the draft's distribution cut to its most likely `support` tokens, which
        is what is sent (0 = the whole vocabulary: exact too, but large)."""
        self.proposer, self.tokenizer, self.model = proposer, tokenizer, model  # tokenizer: the server's, or None
        self.depth, self.max_depth, self.support = depth, max_depth, support
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)
        if http is not None:
            self.http.headers.update(headers)
        self.last: EdgeStats | None = None

    @classmethod
    def with_draft(cls, base_url: str, draft: str, model: str, **kwargs) -> EdgeClient:
        """A client that drafts with the model at `draft` (a path or hub id; its tokenizer must be the server's)."""
        from verispec.models import load_model, load_tokenizer, resolve_device, resolve_dtype
        from verispec.proposers import DraftModelProposer

        device = resolve_device("auto")
        lm = load_model(draft, device, resolve_dtype("auto"), role="draft")
        tokenizer = load_tokenizer(draft, role="draft")
        return cls(base_url, DraftModelProposer(lm, target_vocab_size=len(tokenizer)), tokenizer, model, **kwargs)

    @classmethod
    def with_ngram(cls, base_url: str, model: str, tokenizer=None, ngram_min: int = 1, ngram_max: int = 4, **kwargs) -> EdgeClient:
        """A client that drafts by prompt lookup: no model at the edge at all (without a tokenizer
        its first round sends the prompt as text and drafts nothing)."""
        from verispec.proposers import NgramProposer

        return cls(base_url, NgramProposer(ngram_max, ngram_min), tokenizer, model, **kwargs)

    def close(self) -> None:
        self.http.close()

    # -- generation ---------------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], **sampling) -> str:
        return "".join(self.stream(prompt, **sampling))

    def stream(
        self, prompt: str | Sequence[int], max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
        top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), on_round: Callable[[dict], None] | None = None,
    ) -> Iterator[str]:
        """Verified text as each round's answer arrives; `self.last` holds the figures once done."""
        # Without a tokenizer the prompt goes as text, the first round without drafts, and the
        # server's answer gives its token ids (an n-gram client then needs no model files at all).
        if isinstance(prompt, str) and self.tokenizer is not None:
            prompt = self.tokenizer(prompt).input_ids
        context = [] if isinstance(prompt, str) else list(prompt)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_tokens or 16, stop=tuple(stop))
        generator = None if params.greedy else request_generator(seed if seed is not None else int(torch.seed() % 2**63))
        draft_params = params if params.greedy or not self.support else params.model_copy(
            update={"top_k": min(params.top_k or self.support, self.support)}
        )
        policy = DraftPolicy(sampling=draft_params, generator=generator)
        session = self.proposer.session() if self.proposer is not None else None
        hint: int | None = None  # the server's depth_hint, for depth "server"
        self._auto: AdaptiveDepth | None = None
        self._step_s: float | None = None  # moving average of one draft token's time
        rtt: float | None = None
        stats = self.last = EdgeStats()
        body: dict = {"model": self.model, "prompt": prompt if isinstance(prompt, str) else context,
                      "position": len(context) or None, "temperature": temperature,
                      "top_p": top_p, "top_k": top_k, "seed": seed, "stop": list(stop) or None}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        body = {k: v for k, v in body.items() if v is not None}
        session_id = None
        remaining = max_tokens
        try:
            while True:
                k = self._depth(hint)
                if remaining is not None:
                    k = min(k, max(0, remaining - 1))
                started = time.perf_counter()
                proposal = session.propose(context, k, policy) if session is not None and k > 0 and context else None
                drafting = time.perf_counter() - started
                stats.propose_s += drafting
                body["drafts"] = list(proposal.tokens) if proposal is not None else []
                if proposal is not None and proposal.probs is not None and not params.greedy:
                    body["draft_probs"] = [_support(row) for row in proposal.probs]
                waited = stats.wait_s
                answer = self._round(body, stats)
                session_id = answer["session_id"]
                context += answer.get("prompt_token_ids", [])
                context += answer["token_ids"]
                stats.token_ids += answer["token_ids"]
                if remaining is not None:
                    remaining -= len(answer["token_ids"])
                stats.proposed += answer["proposed"]
                stats.accepted += answer.get("accepted", 0)  # none when the policy gate stopped the text
                hint = answer.get("depth_hint")
                if self.depth == "auto":
                    drafted = len(proposal.tokens) if proposal is not None else 0
                    # The first round's drafting includes the draft reading the whole prompt: not a draft step's price.
                    self._draft_s(drafting / drafted if drafted and stats.round_trips > 1 else None)
                    rtt = self._price(rtt, stats.wait_s - waited, answer)
                if on_round is not None:
                    on_round(answer)
                if answer["text"]:
                    yield answer["text"]
                if answer["finish_reason"] is not None:
                    stats.finish_reason = answer["finish_reason"]
                    return
                body = {"model": self.model, "session_id": session_id, "position": answer["position"]}
        finally:
            if stats.finish_reason is None and session_id is not None:  # the caller stopped early: free the slot now
                try:
                    self.http.post("/v1/verify", json={"model": self.model, "session_id": session_id, "close": True})
                except httpx.HTTPError:
                    pass  # the session expires on its own

    def _round(self, body: dict, stats: EdgeStats) -> dict:
        payload = httpx.Request("POST", "/v1/verify", json=body).content  # the bytes that travel
        headers = {"content-type": "application/json"}
        if "session_id" not in body:  # an opening: its retry gets the same session, never a second
            headers["idempotency-key"] = uuid.uuid4().hex
        started = time.perf_counter()
        for attempt in range(3):  # a call whose answer was lost is sent again: the server answers it once
            try:
                response = self.http.post("/v1/verify", content=payload, headers=headers)
                break
            except httpx.TransportError:
                if attempt == 2:
                    raise
        stats.wait_s += time.perf_counter() - started
        stats.round_trips += 1
        stats.bytes_sent += len(payload)
        stats.bytes_received += len(response.content)
        if response.status_code != 200:
            try:
                error = response.json()["error"]
                raise EdgeError(response.status_code, error["message"], error.get("code"))
            except (ValueError, KeyError, TypeError):
                raise EdgeError(response.status_code, response.text[:200]) from None
        return response.json()

    def _depth(self, hint: int | None) -> int:
        """Drafts for the next round: fixed; "server": the server's hint, what spends the least
        verifier time per token; "auto": priced by this client's own round trips and draft steps."""
        if self.depth == "server":
            return min(self.max_depth, hint) if hint is not None else min(self.max_depth, 4)
        if self.depth == "auto":
            return self._auto.depth() if self._auto is not None else self.max_depth
        return int(self.depth)

    def _draft_s(self, measured: float | None) -> None:
        if measured is not None:
            self._step_s = measured if self._step_s is None else 0.8 * self._step_s + 0.2 * measured

    def _price(self, rtt: float | None, elapsed: float, answer: dict) -> float:
        """Depth auto: a round's cost is the round trip, about the same whatever its depth (the
        verifier's pass widens little, the network not at all), plus the local drafting, priced
        by moving averages of both."""
        rtt = elapsed if rtt is None else 0.8 * rtt + 0.2 * elapsed
        costs = StepCosts(verify_s=tuple(rtt for _ in range(self.max_depth + 1)), draft_s=self._step_s or 0.0)
        if self._auto is None:
            self._auto = AdaptiveDepth(costs, max_depth=self.max_depth)
        self._auto.costs = costs
        self._auto.update(answer["proposed"], answer["accepted"])
        return rtt


def _support(row: torch.Tensor) -> dict:
    """A draft distribution as the verify API takes it: the ids and probabilities of its support.
    Nine significant digits give back every float32 exactly, in about half the characters of
    a float64's shortest form."""
    ids = torch.nonzero(row > 0).flatten()
    return {"ids": ids.tolist(), "probs": [float(f"{p:.9g}") for p in row[ids].tolist()]}
