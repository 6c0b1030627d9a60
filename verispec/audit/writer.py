"""The background writer: audit writes never block token streaming.

Requests hand their record to a bounded queue and go on streaming. One thread drains the queue in
batches, each batch one transaction, and resolves each record's future when its transaction has
committed. A response is acknowledged to its client (non-streaming body, or the stream's
`[DONE]`) only after that future resolves, so a crash loses nothing that was acknowledged;
what it can lose are records of requests still in flight, whose clients never got an answer.
The same thread runs the retention job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from verispec.audit.store import AuditStore

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 3600.0
BATCH = 256


@dataclass
class _Item:
    record: dict[str, Any]
    samples: list[dict[str, Any]]
    done: Future = field(default_factory=Future)


class AuditWriter:
    def __init__(self, store: AuditStore, queue_size: int, retention_days: float, on_error=None):
        self.store = store
        self.retention_days = retention_days
        self.on_error = on_error or (lambda: None)
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="verispec-audit", daemon=True)
        self._next_retention = 0.0

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> Future | None:
        """Queue a record; its future resolves once committed. None when the queue is full."""
        item = _Item(record, samples or [])
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return None
        return item.done

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        self.store.close()

    def _run(self) -> None:
        while True:
            self._retain()
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            items = [b for b in batch if b is not None]
            if items:
                self._write(items)
            if stop:
                return

    def _write(self, items: list[_Item]) -> None:
        for attempt in range(3):
            try:
                self.store.write([i.record for i in items], [s for i in items for s in i.samples])
            except Exception as exc:  # the database is down or refused the batch
                log.error("audit write of %d records failed (attempt %d): %s", len(items), attempt + 1, exc)
                time.sleep(0.2 * (attempt + 1))
                continue
            for item in items:
                item.done.set_result(True)
            return
        self.on_error()
        for item in items:
            item.done.set_exception(RuntimeError("the audit database refused the record"))

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
