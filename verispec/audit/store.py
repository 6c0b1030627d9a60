"""Where audit records live: one schema, SQLite embedded or PostgreSQL by URL (SQLAlchemy Core).

SQLite runs in WAL mode with synchronous=FULL, so a committed record survives a crash of the
process (and of the machine). Everything that reaches this module has already been redacted
(`records.py`); the store only stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from verispec.errors import UserError

metadata = MetaData()

records = Table(
    "verispec_audit_records",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),  # arrival, UTC
    Column("key_id", String(128), index=True),  # the API key's ID, never the key
    Column("endpoint", String(64), nullable=False),
    Column("model", String(256)),
    Column("model_version", String(80)),  # content hash of the weights
    Column("proposer", String(256)),
    Column("proposer_version", String(80)),
    Column("sampling", JSON),  # resolved sampling settings, seed included
    Column("prompt", Text),  # redacted or hashed; NULL unless content is audited
    Column("output", Text),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("speculation", JSON),  # acceptance statistics
    Column("latency_s", Float),
    Column("ttft_s", Float),
    Column("outcome", String(16), nullable=False, index=True),  # ok, fallback, error, cancelled, deadline, rejected
    Column("finish_reason", String(16)),
    Column("status", Integer),
    Column("error", Text),
)

mismatches = Table(
    "verispec_audit_mismatches",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("position", Integer, nullable=False),
    Column("draft_token", Integer, nullable=False),
    Column("verifier_token", Integer, nullable=False),
    Column("draft_prob", Float),
    Column("verifier_prob", Float),
    Column("verifier_token_prob", Float),
    Column("draft_text", Text),  # only when content is audited
    Column("verifier_text", Text),
)


def database_url(url: str) -> str:
    """postgresql:// URLs use the psycopg (3) driver; everything else as given."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class AuditStore:
    def __init__(self, url: str):
        try:
            parsed = make_url(database_url(url))
        except ArgumentError:
            raise UserError(f"--audit-url {url!r} is not a database URL; use sqlite:///PATH, postgresql://HOST/DB or none") from None
        self.url = parsed.render_as_string(hide_password=True)
        self.engine: Engine = create_engine(parsed, pool_pre_ping=True)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_durable)
        try:
            metadata.create_all(self.engine)
        except OperationalError as exc:
            raise UserError(f"cannot open the audit database {self.url}: {exc.orig}") from None

    def write(self, batch: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]] = ()) -> None:
        """One transaction: when it returns, every row is committed."""
        with self.engine.begin() as conn:
            if batch:
                conn.execute(records.insert(), list(batch))
            if samples:
                conn.execute(mismatches.insert(), list(samples))

    def delete_older_than(self, cutoff: datetime) -> int:
        with self.engine.begin() as conn:
            conn.execute(delete(mismatches).where(mismatches.c.created_at < cutoff))
            return conn.execute(delete(records).where(records.c.created_at < cutoff)).rowcount

    def query(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        key_id: str | None = None,
        outcome: str | None = None,
        request_ids: Sequence[str] | None = None,
        limit: int | None = None,
        model: str | None = None,
    ) -> list[dict[str, Any]]:
        q = select(records).order_by(records.c.created_at)
        if model is not None:
            q = q.where(records.c.model == model)
        if since is not None:
            q = q.where(records.c.created_at >= since)
        if until is not None:
            q = q.where(records.c.created_at < until)
        if key_id is not None:
            q = q.where(records.c.key_id == key_id)
        if outcome is not None:
            q = q.where(records.c.outcome == outcome)
        if request_ids is not None:
            q = q.where(records.c.request_id.in_(list(request_ids)))
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(q)]

    def mismatch_samples(self, request_ids: Sequence[str]) -> list[dict[str, Any]]:
        q = select(mismatches).where(mismatches.c.request_id.in_(list(request_ids))).order_by(mismatches.c.id)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(q)]

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_durable(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (verispec audit) never block the writer
    cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it returns
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
