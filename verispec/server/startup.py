"""When this process started, for the cold-start figures (`verispec:startup_*_seconds`)."""

from __future__ import annotations

import os
import time

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
