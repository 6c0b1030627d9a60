"""`verispec audit`: query audit records by time, key and outcome; export them as JSONL."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from verispec.audit.outcomes import OUTCOMES, Outcome
from verispec.config import CommandSettings, command_config, default_audit_url, shared_env
from verispec.errors import UserError
from verispec.flags import add_common_flags, add_settings_flags, settings_from

_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
TABLE_LIMIT = 20  # records a table shows unless --limit says otherwise: the newest, a screenful


def parse_time(value: str, flag: str) -> datetime:
    """An ISO 8601 time (UTC if no zone is given) or an age such as 30m, 12h, 7d."""
    try:
        return _time(value)
    except ValueError as exc:
        raise UserError(f"{flag} {value!r}: {exc}") from None


def _time(value: str | datetime) -> datetime:
    if isinstance(value, datetime):  # a config file's date-time (TOML has them)
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    match = _AGO.fullmatch(value.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNIT[match[2]]: float(match[1])})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("give an ISO time (2026-11-25T10:00) or an age (30m, 12h, 7d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class AuditQuerySettings(CommandSettings):
    """Which audit records to read, and how to show them."""

    model_config = command_config("audit")

    audit_url: str = Field(
        default_factory=default_audit_url,
        validation_alias=shared_env("VERISPEC_AUDIT_URL"),  # the server's own variable
        description="the audit database to read (the server's --audit-url); default: audit.sqlite3 in the per-user "
        "data folder, where the server writes by default",
    )
    since: datetime | None = Field(None, description="records from this time or age on (ISO time, or 30m / 12h / 7d)")
    until: datetime | None = Field(None, description="records before this time or age")
    key: str | None = Field(None, description="API key ID")
    outcome: Outcome | None = Field(None, description=f"only this outcome: {', '.join(OUTCOMES)}")
    request_id: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="only these request IDs (repeatable; comma-separated in the environment or a config file)"
    )
    limit: int | None = Field(
        None, ge=0, description=f"the N newest records (0 = all; default: {TABLE_LIMIT} in the table, all as JSON lines)"
    )
    jsonl: bool = Field(False, description="print JSON lines (every field) instead of a table")
    mismatches: bool = Field(False, description="with --jsonl or --out: add each record's mismatch samples")
    out: Path | None = Field(None, description="write JSON lines to this file (implies --jsonl)")
    quarantined: bool = Field(
        False, description="instead of records: the records the database refused, as JSON lines (reason, escaped payload)"
    )

    @field_validator("since", "until", mode="before")
    @classmethod
    def _times(cls, value: Any) -> Any:
        return None if value is None else _time(value)

    @field_validator("request_id", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment or a config file: a comma-separated list
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value


def add_audit_command(commands) -> None:

    command = commands.add_parser("audit", help="query the audit trail; export records as JSONL")
    add_settings_flags(command, AuditQuerySettings)
    add_common_flags(command)
    command.set_defaults(run=run_audit)


def run_audit(args: argparse.Namespace) -> int:

    return query(settings_from(args, AuditQuerySettings))


def query(settings: AuditQuerySettings) -> int:
    """Print or export the records `settings` select."""
    url = settings.audit_url
    if url.lower() == "none":
        raise UserError("auditing is off (--audit-url none); name the database to query")
    if settings.mismatches and not (settings.jsonl or settings.out):
        # The table has no column for samples: refuse rather than drop the flag unseen.
        raise UserError("--mismatches needs JSON lines: add --jsonl (print them) or --out FILE (write them)")
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise UserError(f"no audit database at {url}; pass --audit-url (the server's --audit-url)")
    from verispec.audit.store import AuditStore  # sqlalchemy: only when a database is read

    store = AuditStore(url)
    limit = _limit(settings)
    if settings.quarantined:
        for row in store.quarantined(limit, newest_first=True):
            sys.stdout.write(json.dumps(_plain(row)) + "\n")
        store.close()
        return 0
    filters = {
        "since": settings.since, "until": settings.until, "key_id": settings.key, "outcome": settings.outcome,
        "request_ids": list(settings.request_id) or None,
    }
    rows = store.query(**filters, limit=limit, newest_first=True)
    total = store.count(**filters) if limit is not None and len(rows) == limit else len(rows)
    if settings.jsonl or settings.out:
        samples: dict[str, list] = {}
        if settings.mismatches and rows:
            for sample in store.mismatch_samples([r["request_id"] for r in rows]):
                # Request IDs repeat; samples belong to their record (rows older than record IDs: by request ID).
                samples.setdefault(sample.get("record_id") or sample["request_id"], []).append(_plain(sample))
        lines = []
        for row in rows:
            record = _plain(row)
            if settings.mismatches:
                record["mismatches"] = samples.get(row["record_id"]) or samples.get(row["request_id"], [])
            lines.append(json.dumps(record))
        text = "".join(line + "\n" for line in lines)
        if settings.out:
            settings.out.parent.mkdir(parents=True, exist_ok=True)
            settings.out.write_text(text)
            print(f"wrote {len(lines)} records to {settings.out}", file=sys.stderr)
        else:
            sys.stdout.write(text)
    else:
        _print_table(rows, total)
    if total > len(rows):
        older = total - len(rows)
        print(f"{older} older {'record' if older == 1 else 'records'} not shown: --limit 0 shows all, --limit N "
              "the N newest; --since, --until, --key and --outcome narrow the search", file=sys.stderr)  # fmt: skip
    store.close()
    return 0


def _limit(settings: AuditQuerySettings) -> int | None:
    """How many records to read, newest first (None: all): --limit (0 = all), else a screenful for
    the table and everything for JSON lines, which are exports."""
    if settings.limit is None:
        return None if settings.jsonl or settings.out or settings.quarantined else TABLE_LIMIT
    return settings.limit or None


def _plain(row: dict) -> dict:
    out = dict(row)
    for key, value in out.items():
        if isinstance(value, datetime):
            out[key] = (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    out.pop("id", None)
    return out


def _print_table(rows: list[dict], total: int) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = f"the {len(rows)} newest of {total}" if total > len(rows) else str(len(rows))
    table = Table(title=f"{shown} audit records, newest first")
    for column in ("time (UTC)", "request id", "key", "endpoint", "outcome", "status", "tokens in/out", "acceptance", "latency s"):
        table.add_column(column)
    for r in rows:
        spec = r.get("speculation") or {}
        acceptance = spec.get("acceptance_rate")
        table.add_row(
            r["created_at"].strftime("%Y-%m-%d %H:%M:%S"), r["request_id"], r["key_id"] or "-", r["endpoint"], r["outcome"],
            str(r["status"]), f"{r['prompt_tokens'] or 0}/{r['completion_tokens'] or 0}",
            "-" if acceptance is None else f"{acceptance:.2f}", "-" if r["latency_s"] is None else f"{r['latency_s']:.3f}",
        )
    Console(width=max(Console().width, 150)).print(table)
