"""The server's policy (`--policy`): the gate a reply's verified text passes before the client sees
it, and what a blocking rule forbids outright (provisional drafts, the verify API), since both
would hand the client tokens the gate has not seen."""

from __future__ import annotations

import logging

from verispec.policy import PolicyGate, PolicySet, load_policy
from verispec.server.errors import bad_request
from verispec.server.metrics import ServerMetrics

log = logging.getLogger("verispec.server")


class Safety:
    """The policy, if the server has one; without one every check passes and no gate is made."""

    def __init__(self, path: str | None, metrics: ServerMetrics):
        self.policy: PolicySet | None = load_policy(path) if path else None
        if self.policy is not None:
            log.info(
                "policy gate: %d rules from %s, holding back %d characters",
                len(self.policy.names),
                path,
                self.policy.hold_back,
            )
            for rule in self.policy.rules:  # every series from zero, so that the alert sees the first finding
                metrics.policy_finding(rule.name, rule.action)

    def gate(self, context: str) -> PolicyGate | None:
        """A fresh gate for one reply, after the prompt `context`; None without a policy."""
        return self.policy.gate(context=context) if self.policy is not None else None

    def allow_provisional(self, body) -> None:
        """Provisional text is unverified drafts, sent as they are made: only when streaming (the
        engine's step hands drafts out before it scores them), and never
        under a policy with a blocking rule (drafts would pass its gate unseen, and the verdict
        would confirm them, even where the rule holds nothing back)."""
        if not body.stream:
            raise bad_request("provisional text is streamed: set stream to true", param="provisional")
        if self.policy is not None and self.policy.blocks:
            raise bad_request(
                "provisional text is refused under this server's policy: it has blocking rules, and drafts would reach "
                "you before its gate has seen them; stream without provisional",
                param="provisional",
                code="policy_forbids_provisional",
            )

    def allow_verify(self) -> None:
        """The verify API hands a round's tokens out as soon as they are verified: refused under a
        blocking rule."""
        if self.policy is not None and self.policy.blocks:
            raise bad_request(
                "the verify API is refused under this server's policy: it has blocking rules, and a round's tokens go to "
                "the client as soon as they are verified, and its accepted count would confirm drafts the gate blocks",
                code="policy_forbids_verify",
            )
