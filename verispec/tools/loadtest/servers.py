"""The servers `verispec loadtest --table` starts: one `verispec serve` per scheduler, each on a free
loopback port with its output in a log file, stopped however this command ends."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from verispec.errors import UserError


class _Server:
    """One `verispec serve` this command started, its output in a log file."""

    def __init__(self, scheduler: str, args: list[str], log_dir: Path):
        self.scheduler = scheduler
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-{scheduler}-{self.port}.log"
        self.command = [sys.executable, "-m", "verispec.cli", "serve", *args, "--scheduler", scheduler, "--port", str(self.port)]
        # Private servers on loopback: no API keys, whatever this shell's environment says.
        env = {k: v for k, v in os.environ.items() if k not in ("VERISPEC_API_KEYS", "VERISPEC_API_KEYS_FILE")}
        self._log = self.log_path.open("w")
        self._log.write("$ " + shlex.join(self.command) + "\n")
        self._log.flush()
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # Ctrl-C reaches this command alone, which then stops its servers
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_ready(self, client: httpx.AsyncClient, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise UserError(f"the {self.scheduler} server exited with {self.process.returncode} before it was ready; "
                                f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                if (await client.get("/readyz", timeout=2.0)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise UserError(f"the {self.scheduler} server was not ready within {timeout_s:g}s (--wait-s waits longer); "
                                f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            await asyncio.sleep(0.25)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when this process dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; the finally block stops the servers anyway
        pass


def serve_args(target: str | None, draft: str | None, proposers: list[str], kv_cache_memory: str | None,
               extra: str | None) -> list[str]:
    """The flags every server of the table gets (but --scheduler and --port)."""
    args = [*(["--target", target] if target else []), *(["--draft", draft] if draft else [])]
    args += ["--proposers", ",".join(proposers), "--max-running", "8", "--max-waiting", "64",
             "--audit-url", "none", "--log-level", "warning"]
    if kv_cache_memory:
        args += ["--kv-cache-memory", kv_cache_memory]
    return args + shlex.split(extra or "")  # given last: they override the above
