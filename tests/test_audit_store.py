"""The audit store against both of its databases: embedded SQLite and a real PostgreSQL server."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from verispec.audit.records import Auditor, Finished, Identity
from verispec.audit.redact import Redactor
from verispec.audit.store import AuditStore, database_url
from verispec.audit.writer import AuditWriter
from verispec.config import AuditSettings, SamplingParams
from verispec.core.drift import Mismatch
from verispec.errors import UserError
from verispec.stats import RequestStats

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    return POSTGRES_URL  # a real server: .ci/run makes sure one is up


def record(request_id: str, at: datetime, key: str = "web", outcome: str = "ok") -> dict:
    return {
        "request_id": request_id, "created_at": at, "key_id": key, "endpoint": "/v1/completions", "model": "m",
        "model_version": "sha256:0", "proposer": "ngram", "proposer_version": "ngram:2-5", "sampling": {"seed": 1},
        "prompt": None, "output": None, "prompt_tokens": 3, "completion_tokens": 5, "speculation": {"accepted": 2},
        "latency_s": 0.1, "ttft_s": 0.01, "outcome": outcome, "finish_reason": "length", "status": 200, "error": None,
    }


def test_write_query_and_retention(url):
    run = uuid.uuid4().hex[:8]
    store = AuditStore(url)
    long_ago = datetime(2000, 1, 1, tzinfo=UTC)
    now = datetime.now(UTC)
    rows = [
        record(f"{run}-old", long_ago),
        record(f"{run}-a", now, key="web"),
        record(f"{run}-b", now + timedelta(seconds=1), key="batch", outcome="cancelled"),
    ]
    sample = {"request_id": f"{run}-a", "created_at": now, "position": 4, "draft_token": 7, "verifier_token": 9,
              "draft_prob": 0.8, "verifier_prob": 0.1, "verifier_token_prob": 0.7, "draft_text": None, "verifier_text": None}
    store.write(rows, [sample])
    ids = [r["request_id"] for r in rows]

    reopened = AuditStore(url)  # committed means visible to a new connection
    assert [r["request_id"] for r in reopened.query(request_ids=ids)] == ids
    assert [r["request_id"] for r in reopened.query(request_ids=ids, key_id="batch")] == [f"{run}-b"]
    assert [r["request_id"] for r in reopened.query(request_ids=ids, outcome="cancelled")] == [f"{run}-b"]
    assert [r["request_id"] for r in reopened.query(request_ids=ids, since=now - timedelta(minutes=1))] == ids[1:]
    assert [r["request_id"] for r in reopened.query(request_ids=ids, until=now - timedelta(minutes=1))] == ids[:1]
    assert len(reopened.query(request_ids=ids, limit=2)) == 2
    assert reopened.query(request_ids=[f"{run}-a"])[0]["speculation"] == {"accepted": 2}
    assert reopened.mismatch_samples([f"{run}-a"])[0]["verifier_token"] == 9

    assert reopened.delete_older_than(datetime(2001, 1, 1, tzinfo=UTC)) == 1
    assert [r["request_id"] for r in reopened.query(request_ids=ids)] == ids[1:]
    store.close()
    reopened.close()


def test_the_writer_commits_before_it_acknowledges(url):
    run = uuid.uuid4().hex[:8]
    store = AuditStore(url)
    writer = AuditWriter(store, queue_size=8, retention_days=0)
    writer.start()
    futures = [writer.submit(record(f"{run}-{i}", datetime.now(UTC))) for i in range(5)]
    for future in futures:
        assert future.result(timeout=10) is True
    assert len(AuditStore(url).query(request_ids=[f"{run}-{i}" for i in range(5)])) == 5
    writer.close()


def test_a_full_queue_refuses_instead_of_blocking(tmp_path):
    writer = AuditWriter(AuditStore(f"sqlite:///{tmp_path / 'a.db'}"), queue_size=2, retention_days=0)  # not started
    assert writer.submit(record("x1", datetime.now(UTC))) is not None
    assert writer.submit(record("x2", datetime.now(UTC))) is not None
    assert writer.submit(record("x3", datetime.now(UTC))) is None


def test_records_hold_metadata_by_default_and_redacted_content_on_opt_in():
    identity = Identity("m", "sha256:1", "draft:d", "sha256:2")
    stats = RequestStats(prompt_tokens=4, generated_tokens=6, rounds=3, proposed=6, accepted=4, seed=42)
    done = Finished(
        request_id="r1", arrived=datetime.now(UTC), key_id="ops", endpoint="/v1/completions", outcome="ok", status=200,
        params=SamplingParams(temperature=0.7), prompt="mail alice@example.com now", output="call +1 415 555 0132",
        stats=stats, finish_reason="length", latency_s=0.5, ttft_s=0.1,
        mismatches=(Mismatch(3, 11, 12, 0.9, 0.2, 0.6),),
    )
    metadata_only = Auditor(AuditSettings(), Redactor(), writer=None, identity=identity).record(done)
    assert metadata_only["prompt"] is None and metadata_only["output"] is None
    assert metadata_only["sampling"]["seed"] == 42 and metadata_only["sampling"]["temperature"] == 0.7
    assert metadata_only["speculation"]["accepted"] == 4
    assert metadata_only["model_version"] == "sha256:1" and metadata_only["key_id"] == "ops"

    with_content = Auditor(AuditSettings(audit_content=True), Redactor(), writer=None, identity=identity)
    row = with_content.record(done)
    assert row["prompt"] == "mail <EMAIL> now"
    assert "555" not in row["output"]
    hashed = Auditor(AuditSettings(audit_content=True, audit_redaction="hash"), Redactor(mode="hash"), None, identity).record(done)
    assert hashed["prompt"].startswith("sha256:") and "alice" not in hashed["prompt"]
    assert with_content.samples(done)[0]["position"] == 3


def test_bad_urls_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a database URL"):
        AuditStore("not a url")
    with pytest.raises(UserError, match="cannot open the audit database"):
        AuditStore("postgresql://postgres@127.0.0.1:1/none")
    assert database_url("postgresql://h/db") == "postgresql+psycopg://h/db"


def test_verispec_audit_queries_and_exports_jsonl(tmp_path):
    from tests.conftest import run_verispec

    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    now = datetime.now(UTC)
    store = AuditStore(url)
    store.write(
        [record("q-old", now - timedelta(days=3)), record("q-web", now, key="web"), record("q-batch", now, key="batch", outcome="error")],
        [{"request_id": "q-web", "created_at": now, "position": 1, "draft_token": 2, "verifier_token": 3,
          "draft_prob": 0.5, "verifier_prob": 0.25, "verifier_token_prob": 0.5, "draft_text": None, "verifier_text": None}],
    )
    table = run_verispec("audit", "--audit-url", url, "--since", "1d")
    assert table.returncode == 0, table.stderr
    assert "q-web" in table.stdout and "q-batch" in table.stdout and "q-old" not in table.stdout

    out = tmp_path / "export.jsonl"
    exported = run_verispec("audit", "--audit-url", url, "--key", "web", "--since", "1d", "--mismatches", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["request_id"] for x in lines] == ["q-web"]
    assert lines[0]["mismatches"][0]["verifier_token"] == 3
    assert datetime.fromisoformat(lines[0]["created_at"]).tzinfo is not None

    errors = run_verispec("audit", "--audit-url", url, "--outcome", "error", "--jsonl")
    assert [json.loads(line)["request_id"] for line in errors.stdout.splitlines()] == ["q-batch"]
    bad = run_verispec("audit", "--audit-url", url, "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_verispec("audit", "--audit-url", f"sqlite:///{tmp_path / 'none.db'}")
    assert missing.returncode == 2 and "no audit database" in missing.stderr


def _audit(capsys, *argv: str) -> tuple[int, str, str]:
    from verispec.cli import main

    code = main(["audit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def quiet_main(monkeypatch):
    import logging

    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)  # main() must not touch the test's logging


def test_verispec_audit_selects_every_outcome_the_server_writes(tmp_path, capsys, quiet_main):
    """expired (an idle verify session) and content_filter (the policy gate) were refused by --outcome."""
    from verispec.audit.outcomes import OUTCOMES

    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    now = datetime.now(UTC)
    AuditStore(url).write([record(f"o-{outcome}", now, outcome=outcome) for outcome in OUTCOMES])
    for outcome in ("expired", "content_filter", *OUTCOMES):
        code, out, err = _audit(capsys, "--audit-url", url, "--outcome", outcome, "--jsonl")
        assert code == 0, err
        assert [json.loads(line)["request_id"] for line in out.splitlines()] == [f"o-{outcome}"]


def test_verispec_audit_shows_the_newest_first_and_says_what_it_left_out(tmp_path, capsys, quiet_main):
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    now = datetime.now(UTC)
    AuditStore(url).write([record(f"n-{i:02d}", now - timedelta(minutes=60 - i)) for i in range(50)])  # n-49 newest

    code, out, err = _audit(capsys, "--audit-url", url)  # a table: the newest screenful
    assert code == 0, err
    shown = [f"n-{i:02d}" for i in range(49, 29, -1)]
    assert [out.index(request_id) for request_id in shown] == sorted(out.index(request_id) for request_id in shown)
    assert "n-29" not in out and "the 20 newest of 50" in out
    assert "30 older records not shown" in err and "--limit 0" in err

    code, out, err = _audit(capsys, "--audit-url", url, "--limit", "0")
    assert code == 0 and all(f"n-{i:02d}" in out for i in range(50)) and "not shown" not in err

    code, out, err = _audit(capsys, "--audit-url", url, "--limit", "3", "--jsonl")
    assert [json.loads(line)["request_id"] for line in out.splitlines()] == ["n-49", "n-48", "n-47"]
    assert "47 older records not shown" in err

    code, out, err = _audit(capsys, "--audit-url", url, "--jsonl")  # JSON lines are exports: all of them
    assert len(out.splitlines()) == 50 and "not shown" not in err


def test_count_and_newest_first_follow_the_filters(url):
    run = uuid.uuid4().hex[:8]
    store = AuditStore(url)
    now = datetime.now(UTC)
    rows = [record(f"{run}-{i}", now + timedelta(seconds=i), outcome="error" if i % 2 else "ok") for i in range(5)]
    store.write(rows)
    ids = [r["request_id"] for r in rows]
    assert store.count(request_ids=ids) == 5 and store.count(request_ids=ids, outcome="error") == 2
    newest = store.query(request_ids=ids, newest_first=True, limit=2)
    assert [r["request_id"] for r in newest] == [f"{run}-4", f"{run}-3"]
    store.close()
