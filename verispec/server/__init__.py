"""`verispec serve`: an OpenAI-compatible HTTP server around one SpeculativeEngine.

- `app.py`      routes: translate between the OpenAI schema and the engine, nothing more
- `protocol.py` request and response shapes of the OpenAI API (plus our extensions)
- `scheduler.py` admission control and the engine thread that interleaves requests round by round
- `breaker.py`  the circuit breaker that turns speculation off when it stops paying
- `auth.py`     API keys and per-key token-bucket rate limits
- `metrics.py`  Prometheus metrics, named as vLLM names them
- `errors.py`   every error a client can cause, in OpenAI's error format
"""
