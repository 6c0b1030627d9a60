"""The deployment's request router (Ray Serve's `request_router_config`): a round of a verify
session goes to the replica that holds the session; every other request, and a round whose
replica is gone, by Ray's power of two choices.

Ray runs it in every process that routes to the deployment (each HTTP proxy, any handle), and
cloudpickles this module into them: it holds the router and nothing else.
"""

from __future__ import annotations

import random

from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica

from verispec.scale.sessions import owner


def holder(session_id: str | None, replicas: list[RunningReplica]) -> RunningReplica | None:
    """The live replica that holds the session `session_id` names, if any."""
    name = owner(session_id)
    return next((r for r in replicas if r.replica_id.unique_id == name), None) if name else None


class SessionRouter(LocalityMixin, RequestRouter):
    """Session affinity over the power of two choices.

    The base router hands the replica it chose to the request it chose it for (Ray's default router
    mixes in FIFO order, which gives a chosen replica to whichever request waited longest: a round
    of another session included), so a pinned round reaches its own replica and no other.
    """

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pinned = holder(pending_request.metadata.session_id, candidate_replicas)
            if pinned is not None:
                # Only that replica has the session: wait (backing off) while its queue is full.
                pending_request.routing_context.should_backoff = True
                return [[pinned]]
        # Not a session's round, or its replica is gone (died, scaled down): any replica, which
        # answers a round of a session it does not hold with the API's 404 session_not_found.
        nearby = self.apply_locality_routing(pending_request)
        pool = [r for r in candidate_replicas if r.replica_id in nearby] or candidate_replicas
        return [random.sample(pool, min(2, len(pool)))]
