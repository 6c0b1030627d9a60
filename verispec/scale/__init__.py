"""Scale-out on Ray Serve: the same FastAPI app in every replica, one engine each.

- `deployment.py`: the Serve deployment and its options, derived from verispec's settings;
  `app_builder` is what `serve run deploy/ray/serve.yaml` imports;
- `launch.py`: `verispec serve --replicas N | --autoscale MIN,MAX [--ray-address ADDR]`;
- `shared.py`: what replicas share through Ray actors: every replica's metrics, the canary's verdict;
- `faults.py`: the HTTP proxy's middleware that turns a dead replica into a retry or an
  OpenAI-shaped 503 with Retry-After;
- `sessions.py` and `router.py`: a verify session's id names its replica, and the deployment's
  request router sends its rounds there.
"""
