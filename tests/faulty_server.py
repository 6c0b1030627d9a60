"""A real `verispec serve` process whose proposer misbehaves on purpose.

    python -m tests.faulty_server FAULT [serve flags ...]

FAULT is `fail` (every proposal raises) or `slow:SECONDS` (every proposal sleeps first, then
drafts normally). Everything else is the shipped server: same settings, app and scheduler.
"""

from __future__ import annotations

import logging
import sys
import time

from verispec.assemble import build_engine
from verispec.cli import _quiet_libraries, build_parser, settings_from
from verispec.server.serve import serve


class FaultySession:
    def __init__(self, inner, fault: str):
        self.inner, self.fault = inner, fault

    def propose(self, context, depth, policy):
        if self.fault == "fail":
            raise RuntimeError("injected proposer failure")
        time.sleep(float(self.fault.removeprefix("slow:")))
        return self.inner.propose(context, depth, policy)

    def reset(self) -> None:
        self.inner.reset()


class FaultyProposer:
    def __init__(self, inner, fault: str):
        self.inner, self.fault = inner, fault
        self.name = f"faulty:{inner.name}"

    def session(self) -> FaultySession:
        return FaultySession(self.inner.session(), self.fault)


def main() -> int:
    fault, flags = sys.argv[1], sys.argv[2:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    settings = settings_from(build_parser().parse_args(["serve", *flags]))

    def factory(s):
        engine = build_engine(s)
        engine.proposer = FaultyProposer(engine.proposer, fault)
        return engine

    return serve(settings, factory)


if __name__ == "__main__":
    sys.exit(main())
