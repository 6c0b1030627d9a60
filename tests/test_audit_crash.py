"""kill -9 under load loses no acknowledged audit record, on either database."""

from __future__ import annotations

import signal
import threading
import uuid

import httpx
import pytest

from tests.serving import ServerProcess, wait_for
from tests.test_audit_store import POSTGRES_URL
from tests.test_server import PROMPTS
from verispec.audit.store import AuditStore


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_under_load_loses_no_acknowledged_record(tiny_models, tmp_path, backend):
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}" if backend == "sqlite" else POSTGRES_URL
    args = ["--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"], "--audit-url", url, "--audit-content"]
    proc = ServerProcess(args, log_dir=tmp_path).wait_ready()
    run = uuid.uuid4().hex[:10]
    acknowledged: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            request_id = f"crash-{run}-{n}-{i}"
            i += 1
            body = {"model": "llama", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8, "temperature": 0, "stream": i % 2 == 0}
            try:
                with httpx.stream("POST", proc.url + "/v1/completions", json=body, headers={"x-request-id": request_id}, timeout=30) as r:
                    text = "".join(r.iter_lines())
                    done = r.status_code == 200 and ("[DONE]" in text if body["stream"] else '"finish_reason"' in text)
            except httpx.HTTPError:
                return  # the server is gone
            if done:
                acknowledged.append(request_id)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for c in clients:
        c.start()
    try:  # enough acknowledged to be worth killing
        wait_for(lambda: len(acknowledged) >= 12, timeout_s=120, what="12 acknowledged requests")
    finally:
        proc.process.send_signal(signal.SIGKILL)  # no shutdown, no flush
        proc.process.wait(10)
        stop.set()
        for c in clients:
            c.join(30)
    assert len(acknowledged) >= 8, proc.log()[-3000:]

    store = AuditStore(url)
    recorded = {r["request_id"]: r for r in store.query(request_ids=acknowledged)}
    missing = [rid for rid in acknowledged if rid not in recorded]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged requests have no record"
    assert all(r["outcome"] in ("ok", "fallback") and r["output"] is not None for r in recorded.values())
    print(f"{backend}: {len(acknowledged)} acknowledged requests before kill -9, all {len(recorded)} recorded")

    # The database survives the crash: a restarted server opens it and records again.
    again = ServerProcess(args, log_dir=tmp_path).wait_ready()
    try:
        r = httpx.post(again.url + "/v1/completions", json={"model": "llama", "prompt": "t1", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    finally:
        again.stop_gracefully()
    assert store.query(request_ids=[r.headers["x-request-id"]])
    store.close()
