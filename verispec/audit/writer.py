"""The background writer: audit writes never block token streaming, and nothing a request does
can stop them.

Requests hand their record to a bounded queue and go on streaming. One thread drains the queue in
batches, each batch one transaction, and resolves each record's future when its transaction has
committed. A response is acknowledged to its client (non-streaming body, or the stream's
`[DONE]`) only after that future resolves, so a crash loses nothing that was acknowledged;
what it can lose are records of requests still in flight, whose clients never got an answer.

What can go wrong, and what the writer does:
- the database is down or slow (connection refused, statement timeout): the batch is kept and
  retried with back-off until it commits; meanwhile `health()` says so, the server's `/readyz`
  answers 503 and acknowledgements time out into 503s rather than wait;
- the database refuses a record (a constraint, a value it cannot hold): the batch is split until
  the refused record stands alone; the others are written and the refused one goes into the
  quarantine table, escaped, and is counted;
- a future nobody waits for any more (the client hung up): resolving it is a no-op;
- anything else: logged and counted; the thread goes on.
The same thread runs the retention job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError

from verispec.audit.store import AuditStore

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 3600.0
BATCH = 256
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class _Item:
    record: dict[str, Any]
    samples: list[dict[str, Any]]
    done: Future = field(default_factory=Future)
    settled: bool = False  # committed, quarantined or given up: never written again

    def resolve(self, error: BaseException | None = None) -> None:
        """Settle the future unless someone already gave up on it (a cancelled wait)."""
        self.settled = True
        try:
            if error is None:
                self.done.set_result(True)
            else:
                self.done.set_exception(error)
        except InvalidStateError:
            pass


def _unavailable(exc: BaseException) -> bool:
    """The database could not be reached or did not answer in time: retry the same batch. Anything
    else means it refused what it was given."""
    return isinstance(exc, OperationalError | InterfaceError) or getattr(exc, "connection_invalidated", False)


class AuditWriter:
    def __init__(
        self,
        store: AuditStore,
        queue_size: int,
        retention_days: float,
        on_error: Callable[[], None] | None = None,
        on_quarantine: Callable[[], None] | None = None,
        stall_s: float = 10.0,
    ):
        self.store = store
        self.retention_days = retention_days
        self.on_error = on_error or (lambda: None)
        self.on_quarantine = on_quarantine or (lambda: None)
        self.stall_s = stall_s
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="verispec-audit", daemon=True)
        self._next_retention = 0.0
        self._closing = threading.Event()
        self._writing_since: float | None = None  # monotonic start of the write in progress
        self._failing_since: float | None = None  # first failure of the batch being retried
        self._last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, record: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> Future | None:
        """Queue a record; its future resolves once committed. None when the queue is full."""
        item = _Item(record, samples or [])
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return None
        return item.done

    def health(self) -> str | None:
        """None while records are being committed; else why they are not, in a line."""
        if not self._thread.is_alive():
            return "the audit writer has stopped" if self._thread.ident is not None else "the audit writer has not started"
        now = time.monotonic()
        if self._failing_since is not None:
            return f"the audit database has failed writes for {now - self._failing_since:.0f}s: {self._last_error}"
        writing_since = self._writing_since
        if writing_since is not None and now - writing_since > self.stall_s:
            return f"an audit write has been running for {now - writing_since:.0f}s"
        return None

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop (a database that is down gets `timeout_s` to come back)."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        self._closing.set()  # stop retrying: what is left was never acknowledged
        self._thread.join(1.0)
        self.store.close()

    def _run(self) -> None:
        while True:
            try:
                if self._cycle():
                    return
            except Exception:  # a bug must not end auditing: log it, count it, go on
                log.exception("audit writer: unexpected error")
                self.on_error()
                time.sleep(0.1)

    def _cycle(self) -> bool:
        """One batch; True once the close marker has been reached."""
        self._retain()
        try:
            first = self._queue.get(timeout=1.0)
        except queue.Empty:
            return False
        batch = [first]
        while len(batch) < BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        items = [b for b in batch if b is not None]
        if items:
            self._write(items)
        return None in batch

    def _write(self, items: list[_Item]) -> None:
        """Commit the batch, retrying while the database is unavailable; isolate refused records."""
        attempt = 0
        while items := [i for i in items if not i.settled]:  # a retry skips what a split already wrote
            try:
                self._attempt(items)
            except Exception as exc:
                if not _unavailable(exc):
                    self._isolate(items, exc)
                    self._recovered()
                    return
                self._failed(exc, len(items), attempt)
                if self._closing.wait(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]):
                    for item in items:
                        item.resolve(RuntimeError("the audit database was unavailable until shutdown"))
                    return
                attempt += 1
                continue
            self._recovered()
            for item in items:
                item.resolve()
            return

    def _attempt(self, items: list[_Item]) -> None:
        self._writing_since = time.monotonic()
        try:
            self.store.write([i.record for i in items], [s for i in items for s in i.samples])
        finally:
            self._writing_since = None

    def _isolate(self, items: list[_Item], exc: Exception) -> None:
        """The database refused something in `items`: halve until each refused record stands alone,
        write the rest, quarantine the refused. A database that goes away meanwhile raises."""
        if len(items) == 1:
            self._quarantine(items[0], exc)
            return
        middle = len(items) // 2
        for half in (items[:middle], items[middle:]):
            try:
                self._attempt(half)
            except Exception as half_exc:
                if _unavailable(half_exc):
                    raise
                self._isolate(half, half_exc)
                continue
            for item in half:
                item.resolve()

    def _quarantine(self, item: _Item, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}"
        log.error("audit record %s refused by the database; quarantined: %s", item.record.get("record_id"), reason)
        self.store.quarantine(datetime.now(UTC), reason[:2000], item.record, item.samples)
        self.on_quarantine()
        item.resolve()  # kept, escaped, in the quarantine table: not lost

    def _failed(self, exc: Exception, count: int, attempt: int) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            self.on_error()
        self._last_error = f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}".splitlines()[0][:300]
        if attempt < 3 or attempt % 20 == 0:
            log.error("audit write of %d records failed (attempt %d), retrying: %s", count, attempt + 1, self._last_error)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning("audit database writes again after %.0fs", time.monotonic() - self._failing_since)
        self._failing_since = None
        self._last_error = None

    def _retain(self) -> None:
        if not self.retention_days or time.monotonic() < self._next_retention:
            return
        self._next_retention = time.monotonic() + RETENTION_EVERY_S
        cutoff = datetime.now(UTC) - timedelta(days=self.retention_days)
        try:
            deleted = self.store.delete_older_than(cutoff)
        except Exception as exc:
            log.error("audit retention job failed: %s", exc)
            return
        if deleted:
            log.info("audit retention: deleted %d records older than %s", deleted, cutoff.isoformat())
