"""The audit writer and store against what clients and databases do to them: cancelled waits,
reused request IDs, bytes a database cannot hold, records it refuses, a database that stalls,
and databases made before records had their own key. Real SQLite and a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from sqlalchemy import create_engine, text

from tests.serving import wait_for
from tests.test_audit_store import POSTGRES_URL, record
from verispec.audit.records import Auditor, Finished, Identity
from verispec.audit.redact import Redactor
from verispec.audit.store import AuditStore
from verispec.audit.writer import AuditWriter
from verispec.config import AuditSettings, SamplingParams
from verispec.errors import UserError


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    return POSTGRES_URL


def started(store: AuditStore, **kwargs) -> tuple[AuditWriter, list[str]]:
    events: list[str] = []
    writer = AuditWriter(
        store, queue_size=1024, retention_days=0, on_error=lambda: events.append("error"),
        on_quarantine=lambda: events.append("quarantine"), **kwargs,
    )
    writer.start()
    return writer, events


def finished(request_id: str, **fields) -> Finished:
    defaults = {"arrived": datetime.now(UTC), "key_id": "k", "endpoint": "/v1/completions", "outcome": "ok", "status": 200}
    return Finished(request_id=request_id, **{**defaults, **fields})


def test_a_wait_given_up_does_not_stop_the_writer(tmp_path):
    """A client that hangs up cancels its wait; the writer used to die resolving that future."""
    store = AuditStore(f"sqlite:///{tmp_path / 'a.db'}")
    writer = AuditWriter(store, queue_size=8, retention_days=0)
    abandoned = writer.submit(record("gone", datetime.now(UTC)))
    assert abandoned.cancel()  # what asyncio.wait_for(wrap_future(...)) does to it when cancelled
    writer.start()
    later = writer.submit(record("later", datetime.now(UTC)))
    assert later.result(timeout=10) is True
    assert writer.health() is None
    assert {r["request_id"] for r in store.query()} == {"gone", "later"}  # the abandoned one is kept too
    writer.close()


def test_a_reused_request_id_loses_no_record(url):
    """Client-chosen IDs repeat: 12 records sharing one ID and 12 others, in one batch, all land."""
    run = uuid.uuid4().hex[:8]
    auditor = Auditor(AuditSettings(), Redactor(), None, Identity("m", "v", "ngram", "ngram:2-5"))
    store = AuditStore(url)
    writer = AuditWriter(store, queue_size=64, retention_days=0)
    futures = [writer.submit(auditor.record(finished(f"{run}-shared"))) for _ in range(12)]
    futures += [writer.submit(auditor.record(finished(f"{run}-{i}"))) for i in range(12)]
    writer.start()  # after queueing: one batch
    assert all(f.result(timeout=20) is True for f in futures)
    rows = store.query(request_ids=[f"{run}-shared", *(f"{run}-{i}" for i in range(12))])
    assert len(rows) == 24
    assert len({r["record_id"] for r in rows}) == 24
    writer.close()


def test_bytes_a_database_cannot_hold_are_made_storable(url):
    """NUL bytes (PostgreSQL), lone surrogates (SQLite's driver) and over-long strings used to lose
    whole batches. Each record lands, its text made storable."""
    run = uuid.uuid4().hex[:8]
    auditor = Auditor(AuditSettings(audit_content=True), Redactor(), None, Identity("m\x00", "v", "ngram", "ngram:2-5"))
    store = AuditStore(url)
    writer = AuditWriter(store, queue_size=64, retention_days=0)
    poisonous = [
        finished(f"{run}-nul", error="unknown model 'x\x00y'", prompt="def f(): \x00", output="ok\x00"),
        finished(f"{run}-surrogate", error="unknown model 'x\udfff'", prompt="a \ud800 b", params=SamplingParams(stop=("\ud800",))),
        finished(f"{run}-long", key_id="k" * 1000, error="e" * 100_000),
    ]
    futures = [writer.submit(auditor.record(done), auditor.samples(done)) for done in poisonous]
    futures.append(writer.submit(auditor.record(finished(f"{run}-innocent"))))
    writer.start()
    assert all(f.result(timeout=20) is True for f in futures)
    rows = {r["request_id"]: r for r in store.query(request_ids=[f"{run}-nul", f"{run}-surrogate", f"{run}-long", f"{run}-innocent"])}
    assert set(rows) == {f"{run}-nul", f"{run}-surrogate", f"{run}-long", f"{run}-innocent"}
    assert rows[f"{run}-nul"]["error"] == "unknown model 'x\ufffdy'" and rows[f"{run}-nul"]["model"] == "m\ufffd"
    assert rows[f"{run}-surrogate"]["prompt"] == "a \ufffd b" and rows[f"{run}-surrogate"]["sampling"]["stop"] == ["\ufffd"]
    assert len(rows[f"{run}-long"]["key_id"]) == 128
    writer.close()


def test_a_refused_record_is_quarantined_and_the_rest_written(url):
    """A record the database refuses for a reason no cleaning fixes must not take the others with it."""
    run = uuid.uuid4().hex[:8]
    store = AuditStore(url)
    writer, events = started(store)
    bad = {**record(f"{run}-bad", datetime.now(UTC)), "created_at": None, "error": "planted\x00"}  # NOT NULL column
    futures = [writer.submit(record(f"{run}-{i}", datetime.now(UTC))) for i in range(5)]
    futures.insert(2, writer.submit(bad))
    assert all(f.result(timeout=20) is True for f in futures)
    assert len(store.query(request_ids=[f"{run}-{i}" for i in range(5)])) == 5
    kept = [q for q in store.quarantined() if q["request_id"] == f"{run}-bad"]
    assert len(kept) == 1 and "created_at" in kept[0]["reason"].lower() + kept[0]["payload"]
    assert "planted\\u0000" in kept[0]["payload"]
    assert events.count("quarantine") == 1
    assert writer.health() is None
    writer.close()


def test_a_stalled_database_shows_in_health_and_nothing_is_lost():
    """PostgreSQL made slow (a lock held by another session): the writer reports itself stuck, then
    failing (statement timeout), and commits everything once the lock goes."""
    run = uuid.uuid4().hex[:8]
    store = AuditStore(POSTGRES_URL, statement_timeout_s=1.0)
    writer, events = started(store, stall_s=0.3)
    blocker = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=False)
    try:
        blocker.execute("LOCK TABLE verispec_audit_records IN ACCESS EXCLUSIVE MODE")
        futures = [writer.submit(record(f"{run}-{i}", datetime.now(UTC))) for i in range(3)]
        problem = wait_for(writer.health, what="the writer to report the stall")
        assert "audit" in problem
        wait_for(lambda: "failed writes" in (writer.health() or ""), what="the statement timeout to count as a failure")
        assert "error" in events
        assert not any(f.done() for f in futures)
    finally:
        blocker.rollback()
        blocker.close()
    assert all(f.result(timeout=30) is True for f in futures)
    wait_for(lambda: writer.health() is None, what="the writer to recover")
    assert len(store.query(request_ids=[f"{run}-{i}" for i in range(3)])) == 3
    writer.close()


def test_a_dead_writer_thread_shows_in_health(tmp_path):
    writer = AuditWriter(AuditStore(f"sqlite:///{tmp_path / 'a.db'}"), queue_size=8, retention_days=0)
    assert "not started" in writer.health()
    writer.start()
    assert writer.health() is None
    writer.close()
    assert "stopped" in writer.health()


OLD_SCHEMA = """
CREATE TABLE verispec_audit_records (
    request_id VARCHAR(128) PRIMARY KEY, created_at TIMESTAMP NOT NULL, key_id VARCHAR(128), endpoint VARCHAR(64) NOT NULL,
    model VARCHAR(256), model_version VARCHAR(80), proposer VARCHAR(256), proposer_version VARCHAR(80), sampling {json},
    prompt TEXT, output TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, speculation {json}, latency_s FLOAT,
    ttft_s FLOAT, outcome VARCHAR(16) NOT NULL, finish_reason VARCHAR(16), status INTEGER, error TEXT
);
CREATE INDEX ix_verispec_audit_records_created_at ON verispec_audit_records (created_at);
CREATE INDEX ix_verispec_audit_records_outcome ON verispec_audit_records (outcome);
CREATE INDEX ix_verispec_audit_records_key_id ON verispec_audit_records (key_id);
CREATE TABLE verispec_audit_mismatches (
    id {serial} PRIMARY KEY, request_id VARCHAR(128) NOT NULL, created_at TIMESTAMP NOT NULL, position INTEGER NOT NULL,
    draft_token INTEGER NOT NULL, verifier_token INTEGER NOT NULL, draft_prob FLOAT, verifier_prob FLOAT,
    verifier_token_prob FLOAT, draft_text TEXT, verifier_text TEXT
);
INSERT INTO verispec_audit_records (request_id, created_at, endpoint, outcome, sampling) VALUES ('old-1', '2026-01-01', '/v1/completions', 'ok', '{{"seed": 3}}');
INSERT INTO verispec_audit_mismatches (request_id, created_at, position, draft_token, verifier_token) VALUES ('old-1', '2026-01-01', 2, 5, 6);
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def old_database(request, tmp_path) -> str:
    """A database as verispec made it before records had their own key."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
        engine = create_engine(url)
        schema = OLD_SCHEMA.format(json="JSON", serial="INTEGER")
    else:
        admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS verispec_migration_test"))
            conn.execute(text("CREATE DATABASE verispec_migration_test"))
        admin.dispose()
        url = "postgresql://postgres@127.0.0.1:5432/verispec_migration_test"
        engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/verispec_migration_test")
        schema = OLD_SCHEMA.format(json="JSON", serial="SERIAL")
    with engine.begin() as conn:
        for statement in filter(str.strip, schema.split(";")):
            conn.execute(text(statement))
    engine.dispose()
    return url


def test_an_old_database_is_migrated_in_place(old_database):
    store = AuditStore(old_database)
    [old] = store.query(request_ids=["old-1"])
    assert old["record_id"] == "old-1" and old["sampling"] == {"seed": 3}
    assert store.mismatch_samples(["old-1"])[0]["record_id"] == "old-1"
    store.write([record("old-1", datetime.now(UTC))])  # the reused ID that used to fail
    assert len(store.query(request_ids=["old-1"])) == 2
    store.close()
    AuditStore(old_database).close()  # opening a migrated database again changes nothing


def test_records_redact_what_clients_choose_without_content_opt_in():
    """Stop sequences carried planted secrets into the sampling column even without --audit-content."""
    auditor = Auditor(AuditSettings(), Redactor(), None, Identity("m", "v", "ngram", "ngram:2-5"))
    planted = ("sk-proj-abcdefghijklmnopqrstuvwxyz012345", "alice@example.com")
    row = auditor.record(finished("r", params=SamplingParams(stop=planted), error=f"bad stop {planted[0]}"))
    assert not any(secret in repr(row) for secret in planted), row
    assert row["speculation"] is None and row["sampling"]["stop"] == ["<SECRET>", "<EMAIL>"]


def test_concurrent_submitters_and_a_closing_writer(tmp_path):
    """Many threads submitting while the writer closes: every future settles, none hangs."""
    store = AuditStore(f"sqlite:///{tmp_path / 'a.db'}")
    writer = AuditWriter(store, queue_size=4096, retention_days=0)
    writer.start()
    futures = []

    def submit(n: int) -> None:
        for i in range(50):
            future = writer.submit(record(f"t{n}-{i}", datetime.now(UTC)))
            if future is not None:
                futures.append(future)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    assert all(f.done() for f in futures)
    assert len(store.query()) == sum(1 for f in futures if not f.exception())


def test_unsupported_database_urls_get_one_line(tmp_path):
    from tests.conftest import run_verispec

    with pytest.raises(UserError, match="mysql is not supported"):
        AuditStore("mysql://x")
    for command in (["audit", "--audit-url", "mysql://x"], ["serve", "--audit-url", "mysql://x", "--port", "0"]):
        result = run_verispec(*command)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and "not supported" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_verispec_audit_shows_the_quarantine(tmp_path):
    from tests.conftest import run_verispec

    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    store = AuditStore(url)
    store.quarantine(datetime.now(UTC), "IntegrityError: NOT NULL", {"record_id": "r1", "request_id": "q1", "error": "x\x00"})
    result = run_verispec("audit", "--audit-url", url, "--quarantined")
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    kept = json.loads(line)
    assert kept["request_id"] == "q1" and "NOT NULL" in kept["reason"]
    assert json.loads(kept["payload"])["record"]["error"] == "x\x00"  # escaped, not lost


def test_the_default_audit_database_is_per_user_not_per_directory(tmp_path):
    """`verispec audit` from any directory finds what the server wrote by default."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("VERISPEC_AUDIT_URL", None)
    where = subprocess.run([sys.executable, "-c", "from verispec.config import default_audit_url; print(default_audit_url())"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where == f"sqlite:///{tmp_path / 'data' / 'verispec' / 'audit.sqlite3'}"
    AuditStore(where).write([record("per-user", datetime.now(UTC))])  # makes the folder, as the server does
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-m", "verispec.cli", "audit", "--jsonl"], env=env, cwd=elsewhere,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["request_id"] for line in result.stdout.splitlines()] == ["per-user"]


def test_records_name_the_proposer_that_served_them():
    """speculation.proposer used to be null in every record."""
    from verispec.stats import RequestStats

    auditor = Auditor(AuditSettings(), Redactor(), None, Identity("m", "v", "ngram", "ngram:2-5"))
    row = auditor.record(finished("r", stats=RequestStats(prompt_tokens=3, generated_tokens=4, proposed=4, accepted=2)))
    assert row["speculation"]["proposer"] == "ngram"
