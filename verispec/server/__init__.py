"""`verispec serve`: an OpenAI-compatible HTTP server around the engine.

- `app.py`          the app: health, readiness, metrics, and the routers below
- `service.py`      what loading makes: the engine, scheduler, router and canary, the models' identities
- `state.py`        the app's services, built once per app:
  - `intake.py`     API keys, rate limits, the checks a request passes before it is queued
  - `safety.py`     the policy gate, and what a blocking rule forbids
  - `records.py`    the audit trail, its redactor, the traces: where a request's conclusion goes
  - `serving.py`    the loaded service, the circuit breaker, readiness, submission, draining
  - `worker.py`     the CPU worker: tokenising and redaction off the event loop
- `completions.py`  /v1/completions and /v1/chat/completions, plain and streamed
- `verify.py`       /v1/verify: edge proposers' sessions
- `reply.py`        a request's events, through the policy gate
- `underway.py`     a request's conclusion, completed or refused: span, log line, audit record
- `context.py`      request IDs, the access log, a 500 in OpenAI's shape
- `scheduler.py`, `job.py`  admission control and the engine thread (`job.py`: who owns each field)
- `breaker.py`      the circuit breaker that turns speculation off when it stops paying
- `routing.py`      per-request proposer choice and the canary
- `auth.py`, `limits.py`, `shared_limits.py`  API keys, rate limits, body and header bounds
- `protocol.py`, `openapi.py`, `errors.py`  the OpenAI shapes, the schema, every error a client can cause
- `metrics.py`, `telemetry.py`, `logs.py`, `startup.py`  what operators see
"""
