"""Proposals off the engine thread, each bounded by its time budget.

A plug-in proposer is code the verifier does not control: it may raise, return junk or never
return. Its proposals run on worker threads and the step waits for all of them at most the time
budget (verispec's own draft model and n-gram lookup run on the engine thread, the draft model
checking its budget between draft positions: a second OpenMP team on another thread would make
every pass fight it for the cores); a proposal not back by then leaves its
requests verifier-only for the round, and the proposer is not asked again (its requests stay
verifier-only) until that call has returned. So a hung proposer costs one budget once, never a
held pass, and the engine thread stays free to serve every other request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor, wait


class Busy(Exception):
    """The proposer's previous call has not returned yet."""


class TimedOut(Exception):
    """The proposal missed its time budget."""


class Proposing:
    def __init__(self, workers: int = 32):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verispec-propose")
        self._busy: set[Hashable] = set()
        self._lock = threading.Lock()
        self._pending: dict[Future, Hashable] = {}

    def start(self, calls: dict[Hashable, Callable[[], object]]) -> dict[Hashable, object]:
        """Start the calls; the keys whose proposer is still busy, as Busy."""
        results: dict[Hashable, object] = {}
        self._pending: dict[Future, Hashable] = {}
        for key, call in calls.items():
            with self._lock:
                if key in self._busy:
                    results[key] = Busy()
                    continue
                self._busy.add(key)
            future = self._pool.submit(call)
            future.add_done_callback(lambda _, key=key: self._done(key))
            self._pending[future] = key
        return results

    def collect(self, budget_s: float) -> dict[Hashable, object]:
        """Wait up to `budget_s` for the started calls: each key's result or exception."""
        results: dict[Hashable, object] = {}
        futures, self._pending = self._pending, {}
        if futures:
            done, _ = wait(futures, timeout=budget_s)
            for future, key in futures.items():
                if future not in done:
                    results[key] = TimedOut()
                elif future.exception() is not None:
                    results[key] = future.exception()
                else:
                    results[key] = future.result()
        return results

    def _done(self, key: Hashable) -> None:
        with self._lock:
            self._busy.discard(key)

    def busy(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._busy

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
