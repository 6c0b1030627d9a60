"""Where audit records live: one schema, SQLite embedded or PostgreSQL by URL (SQLAlchemy Core).

SQLite runs in WAL mode with synchronous=FULL, so a committed record survives a crash of the
process (and of the machine). Everything that reaches this module has already been redacted
(`records.py`); the store only stores, and makes each value storable first: no database takes
NUL bytes in text, SQLite's driver cannot encode lone surrogates, and PostgreSQL refuses strings
longer than their column. Such characters become U+FFFD and long strings are cut, so that no
value a client chose can make a write fail.

Records have their own key (`record_id`, made by the server): the request ID is the client's
choice (`x-request-id`), so two records may share it.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
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
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from verispec.errors import UserError

log = logging.getLogger(__name__)

metadata = MetaData()

records = Table(
    "verispec_audit_records",
    metadata,
    # The server's own key (migrated rows: their old request ID, unique there).
    Column("record_id", String(128), primary_key=True, default=lambda: uuid.uuid4().hex),
    Column("request_id", String(128), nullable=False, index=True),  # the client's x-request-id, or a server-made one
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
    Column("outcome", String(16), nullable=False, index=True),  # one of audit/outcomes.py's OUTCOMES
    Column("finish_reason", String(16)),
    Column("status", Integer),
    Column("error", Text),
    Column("policy", JSON),  # the policy gate's findings (rule, action, position, length); never the text
)

mismatches = Table(
    "verispec_audit_mismatches",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False, index=True),
    Column("record_id", String(128), index=True),  # the record these samples belong to
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


quarantine = Table(
    "verispec_audit_quarantine",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("quarantined_at", DateTime(timezone=True), nullable=False, index=True),
    Column("record_id", String(128), index=True),
    Column("request_id", String(128), index=True),
    Column("reason", Text, nullable=False),  # what the database said
    Column("payload", Text, nullable=False),  # the record and its samples as ASCII JSON (every character escaped)
)

SUPPORTED = ("sqlite", "postgresql")


def database_url(url: str) -> str:
    """postgresql:// URLs use the psycopg (3) driver; everything else as given."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class AuditStore:
    def __init__(self, url: str, statement_timeout_s: float = 30.0):
        usage = "use sqlite:///PATH, postgresql://HOST/DB or none"
        try:
            parsed = make_url(database_url(url))
        except ArgumentError:
            raise UserError(f"--audit-url {url!r} is not a database URL; {usage}") from None
        backend = parsed.get_backend_name()
        if backend not in SUPPORTED:
            raise UserError(f"--audit-url {parsed.render_as_string(hide_password=True)!r}: {backend} is not supported; {usage}")
        self.url = parsed.render_as_string(hide_password=True)
        connect_args: dict[str, Any] = {}
        if backend == "postgresql":
            # A server that is down fails a write in seconds, and a stuck one cannot hold the writer
            # forever: the writer retries, and the server reports the audit trail unavailable meanwhile.
            connect_args = {"connect_timeout": 5, "options": f"-c statement_timeout={int(statement_timeout_s * 1000)}"}
        elif parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
        if backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_durable)
        try:
            with self.engine.begin() as conn:
                _migrate(conn)
                metadata.create_all(conn)
        except OperationalError as exc:
            raise UserError(f"cannot open the audit database {self.url}: {exc.orig}") from None

    def write(self, batch: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]] = ()) -> None:
        """One transaction: when it returns, every row is committed."""
        with self.engine.begin() as conn:
            if batch:
                conn.execute(records.insert(), [storable(records, row) for row in batch])
            if samples:
                conn.execute(mismatches.insert(), [storable(mismatches, row) for row in samples])

    def quarantine(self, at: datetime, reason: str, record: dict[str, Any], samples: Sequence[dict[str, Any]] = ()) -> None:
        """Keep a record the database refused, escaped so that any database takes it."""
        payload = json.dumps({"record": record, "samples": list(samples)}, default=str, ensure_ascii=True)
        row = {
            "quarantined_at": at, "record_id": record.get("record_id"), "request_id": record.get("request_id"),
            "reason": reason, "payload": payload,
        }
        with self.engine.begin() as conn:
            conn.execute(quarantine.insert(), [storable(quarantine, row)])

    def quarantined(self, limit: int | None = None, newest_first: bool = False) -> list[dict[str, Any]]:
        q = select(quarantine).order_by(quarantine.c.id.desc() if newest_first else quarantine.c.id)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(q)]

    def delete_older_than(self, cutoff: datetime) -> int:
        with self.engine.begin() as conn:
            conn.execute(delete(mismatches).where(mismatches.c.created_at < cutoff))
            conn.execute(delete(quarantine).where(quarantine.c.quarantined_at < cutoff))
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
        newest_first: bool = False,
    ) -> list[dict[str, Any]]:
        """The records that match every filter given, oldest first (or newest first); `limit`: the
        first so many of them."""
        order = records.c.created_at.desc() if newest_first else records.c.created_at
        q = select(records).where(*_matching(since, until, key_id, outcome, request_ids, model)).order_by(order)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(q)]

    def count(self, **filters: Any) -> int:
        """How many records `query` would return with these filters (its own: since, until,
        key_id, outcome, request_ids, model) and no limit."""
        q = select(func.count()).select_from(records).where(*_matching(**filters))
        with self.engine.connect() as conn:
            return conn.execute(q).scalar_one()

    def mismatch_samples(self, request_ids: Sequence[str]) -> list[dict[str, Any]]:
        q = select(mismatches).where(mismatches.c.request_id.in_(list(request_ids))).order_by(mismatches.c.id)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(q)]

    def close(self) -> None:
        self.engine.dispose()


def _matching(since=None, until=None, key_id=None, outcome=None, request_ids=None, model=None) -> list:
    """`query`'s filters as conditions on the records table (those given; none: every record)."""
    c = records.c
    conditions = [
        c.created_at >= since if since is not None else None,
        c.created_at < until if until is not None else None,
        c.key_id == key_id if key_id is not None else None,
        c.outcome == outcome if outcome is not None else None,
        c.request_id.in_(list(request_ids)) if request_ids is not None else None,
        c.model == model if model is not None else None,
    ]
    return [condition for condition in conditions if condition is not None]


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL and lone surrogates


def storable_text(value: str) -> str:
    """Text every database and driver takes: NUL bytes and lone surrogates become U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", value)


def _storable_value(value: Any) -> Any:
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable_text(str(k)): _storable_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable_value(v) for v in value]
    return value


def storable(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    """A row whose every value its column can hold (see the module docstring)."""
    out = {}
    for key, value in row.items():
        value = _storable_value(value)
        column = table.c.get(key)
        length = getattr(column.type, "length", None) if column is not None else None
        if isinstance(value, str) and length and len(value) > length:
            value = value[: length - 1] + "\u2026"
        out[key] = value
    return out


def _migrate(conn: Connection) -> None:
    """Databases made before records had their own key: the request ID was the primary key, so a
    reused x-request-id lost records. Move the rows into the new table (their record_id is their
    old request ID, unique there) and link the mismatch samples to them."""
    inspector = inspect(conn)
    tables = set(inspector.get_table_names())
    if records.name in tables and "record_id" not in {c["name"] for c in inspector.get_columns(records.name)}:
        old = records.name + "_v1"
        log.warning("audit database: migrating %s to records with their own key", records.name)
        conn.execute(text(f"ALTER TABLE {records.name} RENAME TO {old}"))
        for index in inspector.get_indexes(old):
            conn.execute(text(f"DROP INDEX {index['name']}"))
        primary_key = inspector.get_pk_constraint(old).get("name")
        if primary_key and conn.dialect.name != "sqlite":  # PostgreSQL names it after the table: free the name
            conn.execute(text(f"ALTER TABLE {old} DROP CONSTRAINT {primary_key}"))
        records.create(conn)
        kept = {c["name"] for c in inspector.get_columns(old)}
        columns = ", ".join(c.name for c in records.columns if c.name != "record_id" and c.name in kept)
        conn.execute(text(f"INSERT INTO {records.name} (record_id, {columns}) SELECT request_id, {columns} FROM {old}"))
        conn.execute(text(f"DROP TABLE {old}"))
    if records.name in tables and "policy" not in {c["name"] for c in inspect(conn).get_columns(records.name)}:
        conn.execute(text(f"ALTER TABLE {records.name} ADD COLUMN policy JSON"))
    if mismatches.name in tables and "record_id" not in {c["name"] for c in inspector.get_columns(mismatches.name)}:
        conn.execute(text(f"ALTER TABLE {mismatches.name} ADD COLUMN record_id VARCHAR(128)"))
        conn.execute(update(mismatches).values(record_id=mismatches.c.request_id))
        conn.execute(text(f"CREATE INDEX ix_{mismatches.name}_record_id ON {mismatches.name} (record_id)"))


def _sqlite_durable(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (verispec audit) never block the writer
    cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it returns
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
