"""A real `verispec serve` process whose proposer misbehaves on purpose.

    python -m tests.faulty_server FAULT [serve flags ...]

FAULT is `fail` (every proposal raises), `hang` (every proposal blocks for good),
`slow:SECONDS` (every proposal sleeps first, then drafts normally) or `tokenizer-gate:PATH` (encoding a text that holds "GATED" logs a line and
blocks until the file PATH exists: a tokenisation that takes as long as the test wants).
Everything else is the shipped server: same settings, app and scheduler.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

from verispec.assemble import build_engine
from verispec.cli import build_parser
from verispec.flags import quiet_libraries, settings_from
from verispec.server.serve import serve


class FaultySession:
    def __init__(self, inner, fault: str):
        self.inner, self.fault = inner, fault

    def propose(self, context, depth, policy):
        if self.fault == "fail":
            raise RuntimeError("injected proposer failure")
        if self.fault == "hang":
            threading.Event().wait()  # never set: a proposer that never returns
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


class GatedTokenizer:
    """The engine's tokenizer, except that encoding a text holding "GATED" waits for a file."""

    def __init__(self, inner, gate: Path):
        self._inner, self._gate = inner, gate

    def __call__(self, text, *args, **kwargs):
        if isinstance(text, str) and "GATED" in text:
            logging.getLogger("tests.faulty_server").info("tokenizer gated until %s exists", self._gate)
            end = time.monotonic() + 120
            while not self._gate.exists() and time.monotonic() < end:
                time.sleep(0.02)
        return self._inner(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def main() -> int:
    fault, flags = sys.argv[1], sys.argv[2:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    settings = settings_from(build_parser().parse_args(["serve", *flags]))

    def factory(s):
        engine = build_engine(s)
        if fault.startswith("tokenizer-gate:"):
            engine.tokenizer = GatedTokenizer(engine.tokenizer, Path(fault.removeprefix("tokenizer-gate:")))
        else:
            engine.proposer = FaultyProposer(engine.proposer, fault)
        return engine

    return serve(settings, factory)


if __name__ == "__main__":
    sys.exit(main())
