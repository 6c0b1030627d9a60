"""`verispec audit`: query audit records by time, key and outcome; export them as JSONL."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from verispec.config import default_audit_url
from verispec.errors import UserError

_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
OUTCOMES = ("ok", "fallback", "error", "cancelled", "deadline", "rejected")


def parse_time(value: str, flag: str) -> datetime:
    """An ISO 8601 time (UTC if no zone is given) or an age such as 30m, 12h, 7d."""
    match = _AGO.fullmatch(value.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNIT[match[2]]: float(match[1])})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UserError(f"{flag} {value!r}: give an ISO time (2026-11-25T10:00) or an age (30m, 12h, 7d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def add_audit_command(commands) -> None:
    command = commands.add_parser("audit", help="query the audit trail; export records as JSONL")
    command.add_argument(
        "--audit-url", default=None, help=f"audit database (default: VERISPEC_AUDIT_URL, else the server's default {default_audit_url()})"
    )
    command.add_argument("--since", default=None, help="records from this time or age on (ISO time, or 30m / 12h / 7d)")
    command.add_argument("--until", default=None, help="records before this time or age")
    command.add_argument("--key", default=None, help="API key ID")
    command.add_argument("--outcome", choices=OUTCOMES, default=None, help="only this outcome")
    command.add_argument("--request-id", action="append", default=None, help="only these request IDs (repeatable)")
    command.add_argument("--limit", type=int, default=None, help="at most N records (oldest first)")
    command.add_argument("--jsonl", action="store_true", help="print JSON lines (every field) instead of a table")
    command.add_argument("--mismatches", action="store_true", help="with --jsonl or --out: add each record's mismatch samples")
    command.add_argument("--out", type=Path, default=None, help="write JSON lines to this file (implies --jsonl)")
    command.add_argument(
        "--quarantined", action="store_true",
        help="instead of records: the records the database refused, as JSON lines (reason, escaped payload)",
    )
    command.add_argument("-v", "--verbose", action="store_true", help="log more")
    command.set_defaults(run=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    import os

    url = args.audit_url or os.environ.get("VERISPEC_AUDIT_URL") or default_audit_url()
    if url.lower() == "none":
        raise UserError("auditing is off (--audit-url none); name the database to query")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be 1 or more")
    if args.mismatches and not (args.jsonl or args.out):
        # The table has no column for samples: refuse rather than drop the flag unseen.
        raise UserError("--mismatches needs JSON lines: add --jsonl (print them) or --out FILE (write them)")
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise UserError(f"no audit database at {url}; pass --audit-url (the server's --audit-url)")
    from verispec.audit.store import AuditStore  # sqlalchemy: only when a database is read

    store = AuditStore(url)
    if args.quarantined:
        for row in store.quarantined(args.limit):
            sys.stdout.write(json.dumps(_plain(row)) + "\n")
        store.close()
        return 0
    rows = store.query(
        since=parse_time(args.since, "--since") if args.since else None,
        until=parse_time(args.until, "--until") if args.until else None,
        key_id=args.key,
        outcome=args.outcome,
        request_ids=args.request_id,
        limit=args.limit,
    )
    if args.jsonl or args.out:
        samples: dict[str, list] = {}
        if args.mismatches and rows:
            for sample in store.mismatch_samples([r["request_id"] for r in rows]):
                # Request IDs repeat; samples belong to their record (rows older than record IDs: by request ID).
                samples.setdefault(sample.get("record_id") or sample["request_id"], []).append(_plain(sample))
        lines = []
        for row in rows:
            record = _plain(row)
            if args.mismatches:
                record["mismatches"] = samples.get(row["record_id"]) or samples.get(row["request_id"], [])
            lines.append(json.dumps(record))
        text = "".join(line + "\n" for line in lines)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
            print(f"wrote {len(lines)} records to {args.out}", file=sys.stderr)
        else:
            sys.stdout.write(text)
    else:
        _print_table(rows)
    store.close()
    return 0


def _plain(row: dict) -> dict:
    out = dict(row)
    for key, value in out.items():
        if isinstance(value, datetime):
            out[key] = (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    out.pop("id", None)
    return out


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} audit records")
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
