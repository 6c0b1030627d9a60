"""When this process started, and the cold-start figures measured from then
(`verispec:startup_*_seconds`)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from verispec.server.metrics import ServerMetrics

_IMPORTED = time.time()


def process_started() -> float:
    """The process's start as Unix time: the kernel's record where there is one (Linux /proc), so
    interpreter start-up and imports count; else when verispec was first imported."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces
        ticks = int(fields[19])  # field 22, starttime, after pid and comm
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


class ColdStart:
    """The cold-start figures: the process's start, when the models were ready, and when the first
    request was served."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.started = process_started()
        metrics.process_start.set(self.started)
        self._served_one = False

    def ready(self) -> None:
        """The models are loaded and warm."""
        self.metrics.startup_ready.set(time.time() - self.started)

    def served(self) -> None:
        """A request was served (status 200): the first one sets the figure."""
        if not self._served_one:
            self._served_one = True
            self.metrics.startup_first_request.set(time.time() - self.started)
