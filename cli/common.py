"""What every command shares: one-line errors on stderr, JSON output."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import orjson
import typer

from service.logs import scrub

if TYPE_CHECKING:
    import psycopg


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: ...` on one line of stderr (secrets scrubbed) and exit non-zero."""
    typer.echo(f"error: {scrub(' '.join(message.split()))}", err=True)
    raise typer.Exit(code)


def emit_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def parse_tag(value: str) -> tuple[str, str]:
    """`--tag k=v` -> (k, v)."""
    key, sep, val = value.partition("=")
    if not sep or not key:
        fail(f"--tag {value!r} must be key=value")
    return key, val


def iso(value: datetime | None) -> str | None:
    """Timestamps in JSON output: RFC 3339 in UTC."""
    return value.astimezone(UTC).isoformat() if value is not None else None


def open_database(database_url: str | None, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """The database from --database-url / EUCORA_DATABASE_URL, or a one-line error."""
    from cli.db import require_url
    from service.db.connect import DatabaseUnavailable, connect

    url = require_url(database_url)
    try:
        return connect(url, autocommit=autocommit)
    except DatabaseUnavailable as exc:
        fail(str(exc))
