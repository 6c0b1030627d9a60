"""Prometheus metrics for `GET /metrics`.

Names follow vLLM's (`vllm:` becomes `verispec:`), so dashboards, alerts and routers built for
vLLM work with a prefix swap; the rest are verispec's own. The engine counts, PromQL derives the
rates (written out in docs/observability.md):

    acceptance rate         rate(verispec:spec_decode_num_accepted_tokens_total[5m])
                              / rate(verispec:spec_decode_num_draft_tokens_total[5m])
    correction rate         rate(verispec:spec_recovered_tokens_total[5m])
                              / rate(verispec:spec_decode_num_drafts_total[5m])
    verifier calls/request  rate(verispec:verifier_calls_total[5m])
                              / rate(verispec:e2e_request_latency_seconds_count[5m])
    mean accepted length    rate(verispec:spec_decode_num_accepted_tokens_total[5m])
                              / rate(verispec:spec_decode_num_drafts_total[5m])

Labels carry nothing per request or per user: only the model name and small fixed sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from verispec.audit.outcomes import OUTCOMES
from verispec.config import ServerSettings
from verispec.core.drift import Inspection
from verispec.core.rounds import Round
from verispec.server.breaker import BreakerState
from verispec.stats import RequestStats

P = "verispec:"

disable_created_metrics()  # no `_created` series: dashboards never read them, they double the scrape

# vLLM's buckets, with our SLO thresholds added so that `le` hits them exactly.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
DRIFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MISMATCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BYTE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144, 1048576, 4194304)
KL_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _with(buckets: tuple[float, ...], *thresholds: float) -> list[float]:
    return sorted(set(buckets) | set(thresholds))


class ServerMetrics:
    """All the server's metrics, in a registry of their own (several apps can share a process)."""

    def __init__(self, model_name: str, server: ServerSettings, max_depth: int):
        self.registry = registry = CollectorRegistry()
        self.model_name = model_name
        self._drift: float | None = None
        self.max_depth = max_depth
        m = ["model_name"]

        def counter(name, doc, labels=()):
            return Counter(P + name, doc, m + list(labels), registry=registry)

        def histogram(name, doc, buckets):
            return Histogram(P + name, doc, m, buckets=buckets, registry=registry).labels(model_name)

        def gauge(name, doc):
            return Gauge(P + name, doc, m, registry=registry).labels(model_name)

        # -- vLLM's names --------------------------------------------------------------------
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _with(TTFT_BUCKETS, server.slo_ttft_s))
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens.", _with(ITL_BUCKETS, server.slo_itl_s))
        self.tpot = histogram(
            "request_time_per_output_token_seconds", "Mean time per output token of a request after the first.",
            _with(ITL_BUCKETS, server.slo_itl_s),
        )
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _with(E2E_BUCKETS, server.slo_e2e_s))
        self.queue_time = histogram("request_queue_time_seconds", "Time a request waited for a slot.", _with(TTFT_BUCKETS))
        self.prompt_len = histogram("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.output_len = histogram("request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS)
        self.running = gauge("num_requests_running", "Requests generating now.")
        self.waiting = gauge("num_requests_waiting", "Requests queued for a slot.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.").labels(model_name)
        self.generation_tokens = counter("generation_tokens", "Tokens generated.").labels(model_name)
        self._success = counter("request_success", "Requests finished, by finish reason.", ["finished_reason"])
        self.success = lambda reason: self._success.labels(model_name, reason)
        self.drafts = counter("spec_decode_num_drafts", "Rounds that proposed at least one draft token.").labels(model_name)
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed.").labels(model_name)
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.").labels(model_name)
        per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, by draft position (0 = first).", ["position"]
        )
        self.accepted_per_pos = [per_pos.labels(model_name, str(i)) for i in range(max_depth)]

        # -- verispec's own --------------------------------------------------------------------
        self._requests = counter("requests", "HTTP requests to the API, by endpoint and status code.", ["endpoint", "status"])
        self.requests = lambda endpoint, status: self._requests.labels(model_name, endpoint, str(status))
        self.rate_limit_errors = counter(
            "rate_limit_errors", "Rate-limit checks that failed (shared limits' Redis unreachable or erring): requests let through."
        ).labels(model_name)
        self._outcomes = counter(
            "request_outcomes", "Generation requests (and verify-API sessions) by outcome: ok, cancelled, deadline, error, rejected, expired (an idle session), content_filter (stopped by the policy gate).", ["outcome"]
        )
        self.outcome = lambda outcome: self._outcomes.labels(model_name, outcome)
        self.policy_violations = counter(
            "policy_violations",
            "Verified-text policy findings, by rule and action (block stops the response with finish_reason "
            "content_filter; flag lets it through)",
            ["rule", "action"],
        )
        self.proposed = counter("spec_proposed_tokens", "Draft tokens proposed (same as spec_decode_num_draft_tokens).").labels(model_name)
        self.rejected = counter("spec_rejected_tokens", "Draft tokens the verifier rejected.").labels(model_name)
        self.recovered = counter("spec_recovered_tokens", "Verifier corrections at a rejected draft position.").labels(model_name)
        self.bonus = counter("spec_bonus_tokens", "Verifier tokens after a fully accepted proposal.").labels(model_name)
        proposed_per_pos = counter("spec_draft_tokens_per_pos", "Draft tokens proposed, by draft position (0 = first).", ["position"])
        self.proposed_per_pos = [proposed_per_pos.labels(model_name, str(i)) for i in range(max_depth)]
        self.verifier_calls = counter("verifier_calls", "Verifier forward passes (one per round).").labels(model_name)
        self.verifier_only_rounds = counter("verifier_only_rounds", "Rounds run without draft tokens.").labels(model_name)
        self.proposer_failures = counter(
            "proposer_failures", "Proposals that failed (raised, returned junk or ran out of time)."
        ).labels(model_name)
        self.fallbacks = counter("fallback_rounds", "Rounds run verifier-only because the proposer failed.").labels(model_name)
        self.repeat_rounds = counter(
            "repeat_rounds", "Rounds drafted from the text's own repeat in place of the proposer (--repeat-match)."
        ).labels(model_name)
        self.kernel_step = Gauge(
            P + "kernel_step", "1 if the model's passes run on the compiled CPU kernel step, 0 if on the slower path; "
            "form: the storage its weight matrices run in.", m + ["role", "form"], registry=registry,
        )  # fmt: skip
        self.kernel_build = Gauge(
            P + "kernel_build_info", "1 for where the compiled CPU kernels a model uses came from: source installed "
            "(built at install time), compiled (on first use) or unavailable (the slower torch path).",
            m + ["role", "source"], registry=registry,
        )  # fmt: skip
        self.kernel_step_model = model_name
        self.breaker_state = gauge("breaker_state", "Speculation circuit breaker: 0 closed, 1 open (verifier only), 2 half-open.")
        self._breaker_moves = counter("breaker_transitions", "Circuit breaker state changes, by new state.", ["state"])
        self.breaker_moves = lambda state: self._breaker_moves.labels(model_name, state)
        self.depth = histogram("spec_depth", "Draft tokens asked for per round.", [float(d) for d in range(max_depth + 1)])
        self.depth_cap = gauge("spec_depth_cap", "Load-aware cap on speculation depth now (max when idle, 0 when saturated).")
        self.propose_time = histogram("propose_seconds", "Proposer time per round.", STEP_BUCKETS)
        self.verify_time = histogram("verify_seconds", "Verifier time per round.", STEP_BUCKETS)
        self.ready = gauge("ready", "1 when the models are loaded and warmed.")
        # What corrections cost in time, not only in counts (Round.mismatch_s, summed per request).
        self.mismatch_latency = histogram(
            "mismatch_latency_seconds",
            "Time a request spent on drafts the verifier rejected: their share of proposing and of verifier passes.",
            MISMATCH_BUCKETS,
        )
        # Cold start: a restart shows as a new process start time.
        self.process_start = gauge("process_start_time_seconds", "When the serving process started (Unix time).")
        self.startup_ready = gauge("startup_ready_seconds", "Cold start: seconds from process start to ready (models loaded, warmed).")
        self.startup_first_request = gauge(
            "startup_first_request_seconds", "Cold start: seconds from process start to the first request served."
        )
        # The verify API (edge proposers): a session is a request whose drafts come over the network.
        self.verify_sessions = gauge("verify_sessions_open", "Verify-API sessions open now (each holds a running slot and its KV).")
        self.verify_round_trips = histogram(
            "verify_round_trips", "Round trips (verify calls) per verify-API session.", TOKEN_BUCKETS
        )
        self.verify_round_bytes = histogram("verify_round_bytes", "Bytes per verify round: request body plus response body.", BYTE_BUCKETS)
        self._client_drafts = counter("verify_client_draft_tokens", "Draft tokens edge clients sent, by API key ID.", ["client"])
        self.client_drafts = lambda client: self._client_drafts.labels(model_name, client)
        self._client_accepted = counter("verify_client_accepted_tokens", "Edge clients' draft tokens accepted, by API key ID.", ["client"])
        self.client_accepted = lambda client: self._client_accepted.labels(model_name, client)
        # The batched engine's KV cache, in vLLM's names.
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Share of the verifier's KV cache blocks held by requests (0 to 1).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.").labels(model_name)
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.").labels(model_name)
        self.preemptions = counter("num_preemptions", "Requests preempted (blocks freed, recomputed later) when the KV cache ran out.").labels(model_name)
        self._cache_seen = (0, 0, 0)

        # -- drift, busy time, cost ------------------------------------------------------------
        self.drift_tv = histogram(
            "drift_total_variation",
            "Total variation distance between proposer and verifier next-token distributions at verified draft positions (sampled requests).",
            DRIFT_BUCKETS,
        )
        self.drift_kl = histogram(
            "drift_kl_divergence",
            "KL(proposer || verifier) in nats at verified draft positions (sampled requests).",
            KL_BUCKETS,
        )
        self.drift_index = gauge("drift_index", "Moving average of drift_total_variation over recent sampled positions (0 = identical).")
        self.verifier_busy = counter("verifier_busy_seconds", "Seconds the verifier spent in forward passes (prefill included).").labels(model_name)
        self.proposer_busy = counter("proposer_busy_seconds", "Seconds the proposer spent drafting.").labels(model_name)
        self.cost = counter(
            "cost_dollars", "Hardware cost of the work done: busy seconds times the configured cost per hour."
        ).labels(model_name)
        self.cost_verifier_only = counter(
            "cost_verifier_only_dollars",
            "What the same tokens would have cost verifier-only, at the measured one-token verifier step time.",
        ).labels(model_name)
        self.audit_failures = counter(
            "audit_write_failures",
            "Audit failures: write outages of the database, records dropped on a full queue, acknowledgements that timed out, writer errors.",
        ).labels(model_name)
        self.audit_records = counter("audit_records", "Audit records committed or queued.").labels(model_name)
        self.audit_quarantined = counter(
            "audit_quarantined_records", "Audit records the database refused, kept escaped in the quarantine table."
        ).labels(model_name)
        self.audit_healthy = gauge("audit_healthy", "1 while audit records are being committed, 0 when the writer is stopped, stuck or failing.")
        self.audit_queue = gauge("audit_queue_records", "Audit records waiting for the writer.")
        proposer_requests = counter("proposer_requests", "Requests by the proposer that served them.", ["proposer"])
        self.proposer_requests = lambda name: proposer_requests.labels(model_name, name)
        self.canary_state = gauge("canary_state", "Canary: 0 none, 1 running, 2 candidate promoted, 3 rolled back.")
        canary_decisions = counter("canary_decisions", "Canary decisions, by verdict.", ["decision"])
        self.canary_decisions = lambda verdict: canary_decisions.labels(model_name, verdict)
        canary_acceptance = Gauge(
            P + "canary_acceptance_rate", "Mean per-request acceptance rate of each canary arm.", m + ["arm"], registry=registry
        )
        self.canary_acceptance = lambda arm: canary_acceptance.labels(model_name, arm)
        proposer_throughput = Gauge(
            P + "proposer_throughput_tokens_per_second",
            "Per-request choice: mean tokens per busy second observed for each proposer.", m + ["proposer"], registry=registry,
        )
        self.proposer_throughput = lambda name: proposer_throughput.labels(model_name, name)
        cost_rate = Gauge(P + "cost_per_hour_dollars", "Configured hardware cost per hour.", m + ["component"], registry=registry)
        self.cost_rate = lambda component: cost_rate.labels(model_name, component)

    def observe_round(self, round_: Round) -> None:
        self.verifier_calls.inc()
        self.depth.observe(round_.depth)
        self.propose_time.observe(round_.propose_s)
        self.verify_time.observe(round_.verify_s)
        if round_.proposer_failed:
            self.proposer_failures.inc()
            self.fallbacks.inc()
        if not round_.proposed:
            self.verifier_only_rounds.inc()
            return
        if round_.repeat:
            self.repeat_rounds.inc()
        self.drafts.inc()
        self.draft_tokens.inc(round_.proposed)
        self.proposed.inc(round_.proposed)
        self.accepted_tokens.inc(round_.accepted)
        self.rejected.inc(round_.proposed - round_.accepted)
        (self.bonus if round_.accepted == round_.proposed else self.recovered).inc()
        for i in range(min(round_.proposed, self.max_depth)):
            self.proposed_per_pos[i].inc()
            if i < round_.accepted:
                self.accepted_per_pos[i].inc()

    def precreate(self, endpoints: tuple[str, ...]) -> None:
        """Create labelled series at 0 before their first event: Prometheus cannot see the jump of
        a series it has never scraped, so a first burst of 503s would never show in rate()."""
        for endpoint in endpoints:
            for status in (200, 400, 401, 404, 429, 499, 500, 503, 504):
                self.requests(endpoint, status)
        for outcome in OUTCOMES:
            if outcome != "fallback":  # the audit trail's: the engine thread counts those as ok
                self.outcome(outcome)
        for reason in ("stop", "length"):
            self.success(reason)
        for state in BreakerState:
            self.breaker_moves(state.name.lower())

    def observe_cache(self, core) -> None:
        """The batched engine's cache figures after a step (its counters only grow)."""
        pool = core.runner.pool
        now = (pool.queries, pool.hits, core.preemptions)
        queries, hits, preemptions = (a - b for a, b in zip(now, self._cache_seen, strict=True))
        self._cache_seen = now
        self.kv_cache_usage.set(pool.usage)
        if queries:
            self.prefix_queries.inc(queries)
        if hits:
            self.prefix_hits.inc(hits)
        if preemptions:
            self.preemptions.inc(preemptions)

    def observe_drift(self, inspection: Inspection) -> None:
        for tv in inspection.total_variation:
            self.drift_tv.observe(tv)
            self._drift = tv if self._drift is None else 0.98 * self._drift + 0.02 * tv  # about the last 50 positions
        for kl in inspection.kl_divergence:
            self.drift_kl.observe(kl)
        if self._drift is not None:
            self.drift_index.set(self._drift)

    def observe_finished(self, stats: RequestStats, finish_reason: str) -> None:
        self.success(finish_reason).inc()
        self.prompt_len.observe(stats.prompt_tokens)
        self.output_len.observe(stats.generated_tokens)
        self.mismatch_latency.observe(stats.mismatch_s)

    def policy_finding(self, rule: str, action: str):
        """The counter of one policy rule's findings with one action (block or flag)."""
        return self.policy_violations.labels(self.model_name, rule, action)

    def observe_breaker(self, state: BreakerState) -> None:
        self.breaker_state.set(int(state))
        self.breaker_moves(state.name.lower()).inc()

    def observe_path(self, role: str, path: dict) -> None:
        """The model's kernel-step state, labelled by the forms its weight matrices run in, and
        where its compiled kernels came from (none: the model does not use them)."""
        form = "+".join(sorted(path["forms"]))
        self.kernel_step.labels(self.kernel_step_model, role, form).set(1 if path["kernel_step"] else 0)
        if path.get("build") is not None:
            self.kernel_build.labels(self.kernel_step_model, role, path["build"]).set(1)
