"""The server's CPU worker: tokenising a prompt, applying a chat template, decoding drafts and
redacting a record take a while, and never run on the event loop, which must keep streaming."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class CpuWorker:
    """One thread for the request path's CPU work, shared by intake, records and replies."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="verispec-tokenize")

    async def run(self, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)` in the worker thread, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kwargs)
        )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
