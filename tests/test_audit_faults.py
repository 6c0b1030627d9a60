"""The audit trail and the server's input bounds against hostile clients and a failing database,
over real HTTP, with a real server process writing to a real PostgreSQL.

The guarantee under test is the sentence in docs/observability.md: every response the server acknowledges (a 200
body, or a stream's `data: [DONE]`) has its audit record committed before it is sent; a record
that cannot be committed within --audit-ack-timeout-s turns its response into a 503
(`audit_unavailable`), and /readyz and `verispec:audit_healthy` say so until records commit again.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import shutil
import socket
import string
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.serving import ServerProcess, metric, wait_for
from tests.test_audit_store import POSTGRES_URL
from verispec.audit.store import AuditStore

MODEL = "llama"  # the tiny model's folder name
ACK_TIMEOUT_S = 3.0
PG_CLUSTER = next(iter(sorted(Path("/etc/postgresql").glob("*"))), None) if Path("/etc/postgresql").is_dir() else None


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    proc = ServerProcess(
        ["--target", tiny_models["llama"], "--proposer", "ngram", "--max-new-tokens", "8", "--max-running", "4",
         "--audit-url", POSTGRES_URL, "--audit-content", "--audit-ack-timeout-s", str(ACK_TIMEOUT_S),
         "--header-timeout-s", "2", "--body-timeout-s", "2", "--max-body-bytes", "65536"],
        log_dir=tmp_path_factory.mktemp("logs"),
    ).wait_ready()
    yield proc
    proc.stop_gracefully()


@pytest.fixture(scope="module")
def store():
    store = AuditStore(POSTGRES_URL)
    yield store
    store.close()


def complete(server: ServerProcess, request_id: str, stream: bool = False, **body) -> tuple[int, bool, dict | None]:
    """(status, acknowledged, error body): acknowledged is a 200 body, or a stream ending in [DONE]."""
    payload = {"model": MODEL, "prompt": "t4 t7 t10 t13", "max_tokens": 6, "temperature": 0, **body, "stream": stream}
    headers = {"x-request-id": request_id}
    if not stream:
        response = httpx.post(server.url + "/v1/completions", json=payload, headers=headers, timeout=60)
        return response.status_code, response.status_code == 200, None if response.status_code == 200 else response.json()
    data = []
    with httpx.stream("POST", server.url + "/v1/completions", json=payload, headers=headers, timeout=60) as r:
        if r.status_code != 200:
            return r.status_code, False, json.loads(r.read())
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    error = next((json.loads(d) for d in data if d != "[DONE]" and "error" in json.loads(d)), None)
    return 200, bool(data) and data[-1] == "[DONE]", error


def recorded(store: AuditStore, request_ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in store.query(request_ids=request_ids):
        counts[row["request_id"]] = counts.get(row["request_id"], 0) + 1
    return counts


# -- defect 1: one client hang-up stopped all auditing ----------------------------------------------


def test_hang_ups_mid_stream_do_not_stop_auditing(server, store):
    """Clients that leave while their stream waits for its record could cancel the writer's future,
    and the writer died resolving it. Over HTTP that is a race (the server sees the hang-up only
    when a write fails); test_audit_writer.py's test_a_wait_given_up_does_not_stop_the_writer
    reproduces it every time. Here: hang-ups while a lock holds their records back, then every
    later request is acknowledged promptly and recorded."""
    payload = {"model": MODEL, "prompt": "t4 t7 t10 t13", "max_tokens": 6, "temperature": 0, "stream": True}
    blocker = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=False)
    try:
        blocker.execute("LOCK TABLE verispec_audit_records IN ACCESS EXCLUSIVE MODE")
        queued = metric(server.metrics(), "verispec:audit_records_total")
        for _ in range(5):
            with httpx.stream("POST", server.url + "/v1/completions", json=payload, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # hang up right after the first event
        wait_for(lambda: metric(server.metrics(), "verispec:audit_records_total") >= queued + 5, what="the records to queue")
    finally:
        blocker.rollback()
        blocker.close()
    run = uuid.uuid4().hex[:8]
    wait_for(lambda: httpx.get(server.url + "/readyz").status_code == 200, what="the writer to catch up")
    for i in range(4):
        started = time.monotonic()
        status, acknowledged, _ = complete(server, f"{run}-{i}", stream=bool(i % 2))
        assert status == 200 and acknowledged
        assert time.monotonic() - started < ACK_TIMEOUT_S + 5
    assert recorded(store, [f"{run}-{i}" for i in range(4)]) == {f"{run}-{i}": 1 for i in range(4)}
    assert metric(server.metrics(), "verispec:audit_healthy") == 1


# -- defect 2: a reused x-request-id lost whole batches ---------------------------------------------


def test_a_reused_request_id_keeps_every_record(server, store):
    shared = f"demo-{uuid.uuid4().hex[:8]}"
    innocent = [f"{shared}-innocent-{i}" for i in range(8)]

    def refused(_):
        return httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "t1"},
                          headers={"x-request-id": shared}, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda _: complete(server, shared)[0], range(6)))
        refusals = list(pool.map(refused, range(6)))
        others = list(pool.map(lambda rid: complete(server, rid)[0], innocent))
    assert served == [200] * 6 and refusals == [400] * 6 and others == [200] * 8
    wait_for(lambda: recorded(store, [shared]).get(shared) == 12, what="the refused requests' records")
    assert recorded(store, innocent) == dict.fromkeys(innocent, 1)


# -- defects 3 and 5: bytes a database cannot store; client text reaching sinks unredacted -------------


def test_nul_bytes_and_surrogates_get_4xx_and_leave_records(server, store):
    run = uuid.uuid4().hex[:8]
    raw = {
        f"{run}-nul-model": '{"model": "x\\u0000", "prompt": "t1"}',
        f"{run}-surrogate-model": '{"model": "bad\\udfff", "prompt": "t1"}',
        f"{run}-surrogate-prompt": '{"model": "llama", "prompt": "def f(): \\ud800 x"}',
    }
    for request_id, body in raw.items():
        response = httpx.post(server.url + "/v1/completions", content=body,
                              headers={"content-type": "application/json", "x-request-id": request_id}, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"]
    status, acknowledged, _ = complete(server, f"{run}-nul-prompt", prompt="t4 \u0000 t7")
    assert status == 200 and acknowledged
    ids = [*raw, f"{run}-nul-prompt"]
    wait_for(lambda: len(recorded(store, ids)) == len(ids), what="every record")
    [row] = store.query(request_ids=[f"{run}-nul-prompt"])
    assert "\x00" not in row["prompt"] and "\ufffd" in row["prompt"]
    assert "Traceback" not in server.log()


def test_client_text_is_redacted_before_any_sink(server, store):
    secret, email, aws = "sk-proj-" + "Zq7" * 12, "mallory@example.com", "AKIAIOSFODNN7EXAMPLE"
    response = httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": "t4 t7", "max_tokens": 4, "temperature": 0, "stop": [secret, email]},
        headers={"x-request-id": aws}, timeout=60,
    )
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    assert request_id != aws  # looks like a key: the server made its own
    assert "audit trail: postgresql" in server.log()  # where the records go, said at start
    [row] = store.query(request_ids=[request_id])
    stored = json.dumps(row, default=str)
    for planted in (secret, email, aws):
        assert planted not in stored
        assert planted not in server.log()


# -- defects 6 and 7: unbounded bodies, slow clients ---------------------------------------------------


def test_bodies_over_the_limit_get_413(server):
    huge = json.dumps({"model": MODEL, "prompt": "t1 " * 2_000_000})  # 6 MB
    started = time.monotonic()
    response = httpx.post(server.url + "/v1/completions", content=huge, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413 and "--max-body-bytes" in response.json()["error"]["message"]
    assert time.monotonic() - started < 30

    def chunks():  # no Content-Length: the limit is counted as the bytes arrive
        for _ in range(100):
            yield b" " * 4096

    response = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert httpx.get(server.url + "/healthz").status_code == 200


def _raw_exchange(server: ServerProcess, first: bytes, trickle: bytes = b"", every_s: float = 0.5) -> bytes:
    """Send `first`, then one byte of `trickle` every `every_s`; return what the server answered
    before it closed the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(first)
        sock.settimeout(every_s)
        answer = b""
        deadline = time.monotonic() + 30
        for byte in [trickle[i : i + 1] for i in range(len(trickle))] + [b""] * 1000:
            if time.monotonic() > deadline:
                raise AssertionError("the server held a slow connection for 30s")
            try:
                if byte:
                    sock.sendall(byte)
                data = sock.recv(65536)
                if not data:
                    return answer
                answer += data
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                return answer
    return answer


def test_slow_clients_are_cut_off(server):
    headers = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    slowloris = _raw_exchange(server, headers, trickle=b"x-slow: " + b"a" * 200)
    assert slowloris.startswith(b"HTTP/1.1 408")
    short_body = _raw_exchange(server, headers + b"content-length: 100\r\n\r\n" + b'{"model": "llama"')
    assert short_body.startswith(b"HTTP/1.1 408") and b"--body-timeout-s" in short_body
    assert httpx.get(server.url + "/healthz").status_code == 200


# -- the audit database stopped, made slow -------------------------------------------------------------


class Load:
    """Clients sending requests (plain and streaming, unique IDs) until stopped, keeping every outcome."""

    def __init__(self, server: ServerProcess, clients: int = 3):
        # Unique per run, so that each request's record can be found by its x-request-id.
        self.server, self.run = server, "".join(random.choices(string.ascii_lowercase, k=10))
        self.outcomes: list[tuple[str, int, bool, dict | None, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _client(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            request_id = f"{self.run}-c{n}-r{i}"
            started = time.monotonic()
            status, acknowledged, error = complete(self.server, request_id, stream=bool(i % 2))
            self.outcomes.append((request_id, status, acknowledged, error, time.monotonic() - started))
            i += 1
            if status == 503:
                time.sleep(0.2)  # as Retry-After asks, roughly

    def acknowledged(self) -> list[str]:
        return [o[0] for o in self.outcomes if o[2]]

    def count(self) -> int:
        return len(self.outcomes)


def audit_unavailable_seen(server: ServerProcess) -> bool:
    ready = httpx.get(server.url + "/readyz", timeout=10)
    return ready.status_code == 503 and ready.json()["status"] == "audit_unavailable" and \
        metric(server.metrics(), "verispec:audit_healthy") == 0


def assert_the_guarantee(load: Load, store: AuditStore) -> None:
    """Acknowledged: committed. Not acknowledged: a 503 or an in-band audit_unavailable error. Nothing hung."""
    acknowledged = load.acknowledged()
    assert acknowledged, "no request was acknowledged"
    assert set(recorded(store, acknowledged)) == set(acknowledged)
    for request_id, status, was_acknowledged, error, took_s in load.outcomes:
        if not was_acknowledged:
            assert status == 503 or (error and error["error"]["code"] == "audit_unavailable"), (request_id, status, error)
        assert took_s < ACK_TIMEOUT_S + 20, (request_id, took_s)
    refused = len(load.outcomes) - len(acknowledged)
    longest = max(o[4] for o in load.outcomes)
    print(f"{len(acknowledged)} acknowledged, all recorded; {refused} not acknowledged (503 or in-band audit_unavailable); "
          f"longest answer {longest:.1f}s")


def pg_ctl(action: str) -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", PG_CLUSTER.name, "main", action, *(["-m", "fast"] if action == "stop" else [])],
                   check=True, capture_output=True, timeout=120)


def pg_up() -> bool:
    try:
        psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=2).close()
        return True
    except psycopg.OperationalError:
        return False


@pytest.mark.skipif(PG_CLUSTER is None or shutil.which("pg_ctlcluster") is None, reason="needs a local PostgreSQL cluster to stop")
def test_the_audit_database_stopped_and_restarted_mid_load(server, store):
    with Load(server) as load:
        wait_for(lambda: len(load.acknowledged()) >= 3, what="load to run")
        try:
            pg_ctl("stop")
            wait_for(lambda: audit_unavailable_seen(server), what="/readyz and metrics to report the outage")
            during = load.count()
            wait_for(lambda: load.count() >= during + 3, what="requests during the outage")
        finally:
            pg_ctl("start")
            wait_for(pg_up, what="PostgreSQL to start")
        wait_for(lambda: httpx.get(server.url + "/readyz", timeout=10).status_code == 200, what="recovery")
        after = len(load.acknowledged())
        wait_for(lambda: len(load.acknowledged()) >= after + 3, what="acknowledgements after recovery")
    assert_the_guarantee(load, store)
    assert any(not o[2] for o in load.outcomes), "the outage refused nothing"
    assert metric(server.metrics(), "verispec:audit_healthy") == 1


def test_a_slow_audit_database_under_load(server, store):
    """A lock held by another session stalls every write for longer than the acknowledgement timeout."""
    with Load(server) as load:
        wait_for(lambda: len(load.acknowledged()) >= 3, what="load to run")
        blocker = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=False)
        try:
            blocker.execute("LOCK TABLE verispec_audit_records IN ACCESS EXCLUSIVE MODE")
            wait_for(lambda: audit_unavailable_seen(server), what="/readyz and metrics to report the stall")
            stalled = load.count()
            wait_for(lambda: load.count() >= stalled + 3, what="requests during the stall")
        finally:
            blocker.rollback()
            blocker.close()
        wait_for(lambda: httpx.get(server.url + "/readyz", timeout=10).status_code == 200, what="recovery")
        after = len(load.acknowledged())
        wait_for(lambda: len(load.acknowledged()) >= after + 3, what="acknowledgements after recovery")
    assert_the_guarantee(load, store)
    assert any(not o[2] for o in load.outcomes), "the stall refused nothing"


def test_tokenising_never_holds_the_event_loop(tiny_models, tmp_path):
    """A 5 MB prompt froze every stream and /healthz while it was tokenised on the event loop. Here
    a tokenizer that blocks until the test lets it go: /healthz and another request must answer meanwhile."""
    gate = tmp_path / "gate"
    proc = ServerProcess(
        [f"tokenizer-gate:{gate}", "--target", tiny_models["llama"], "--proposer", "ngram", "--audit-url", "none"],
        module="tests.faulty_server", log_dir=tmp_path,
    ).wait_ready()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            gated = pool.submit(httpx.post, proc.url + "/v1/completions", timeout=60,
                                json={"model": MODEL, "prompt": "t4 GATED t7", "max_tokens": 2})
            wait_for(lambda: "tokenizer gated" in proc.log(), what="the tokenizer to block")
            assert httpx.get(proc.url + "/healthz", timeout=10).status_code == 200
            assert httpx.get(proc.url + "/v1/models", timeout=10).status_code == 200
            assert not gated.done()
            gate.touch()
            assert gated.result(timeout=60).status_code == 200
    finally:
        gate.touch()
        proc.stop_gracefully()
