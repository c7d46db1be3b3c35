"""What every command shares: one-line errors on stderr, exit codes, JSON output.

Exit codes, the same for every `eucora` command (README.md, "Exit codes"):
0 done; 1 done but not OK (a failed task or deployment, an unhealthy status, a request
that cannot be done such as an unknown id); 2 usage or configuration error (a bad
option, a missing setting or file, a database schema that needs `eucora db upgrade`);
3 `--wait` gave up (`--wait-timeout`); 4 a service (database or broker) cannot be
reached: trying again later may work; 5 `events tail --after`: the cursor is older than
the events kept.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import orjson
import typer

from service.logs import scrub

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

EXIT_OK = 0
EXIT_NOT_OK = 1
EXIT_USAGE = 2
EXIT_WAIT_TIMEOUT = 3
EXIT_UNREACHABLE = 4
EXIT_CURSOR_TOO_OLD = 5

# How often in_transaction runs a command's transaction that PostgreSQL undid to break
# a deadlock.
DEADLOCK_RETRIES = 3


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
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


def check_target(agent: list[str] | None, tag: list[str] | None, platform: object) -> None:
    """The agents a command is for: --agent IDs, or --tag/--platform (one line if not)."""
    from schemas.topics import is_agent_id

    if agent and (tag or platform is not None):
        fail("--agent cannot be combined with --tag or --platform")
    if not (agent or tag or platform is not None):
        fail("choose the agents: --agent ID, --tag k=v or --platform P")
    for a in agent or []:
        if not is_agent_id(a):
            fail(f"--agent {a!r} is not a valid agent id")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, option: str) -> timedelta:
    """'90s', '5m', '1h', '2d', '1w' (a bare number is seconds): `--since` and `--bucket`."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        fail(f"{option} {text!r} is not a duration like 30s, 5m, 1h, 7d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()])


# The "more not shown" line counts at most this many further rows: a bounded count
# stays fast whatever the size of the fleet or the task history.
MORE_COUNT_CAP = 10_000


def count_more(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> str:
    """How many rows `sql` (a SELECT of the rest of a listing) returns, as text:
    '1,234', or '10,000+' past MORE_COUNT_CAP."""
    row = conn.execute(
        f"SELECT count(*) FROM ({sql} LIMIT {MORE_COUNT_CAP + 1}) more",
        params,
    ).fetchone()
    n = int(row[0]) if row else 0
    return f"{MORE_COUNT_CAP:,}+" if n > MORE_COUNT_CAP else f"{n:,}"


def more_not_shown(more: str, last_id: str) -> None:
    """A page that is not the end of a listing says so on stderr (stdout keeps only the
    table): how many more match, and the option that shows the next page."""
    typer.echo(f"{more} more not shown: --after {last_id}", err=True)


def iso(value: datetime | None) -> str | None:
    """Timestamps in JSON output: RFC 3339 in UTC."""
    return value.astimezone(UTC).isoformat() if value is not None else None


def require_url(database_url: str | None) -> str:
    """--database-url / EUCORA_DATABASE_URL, checked, or a one-line error (exit 2)."""
    from schemas.config import ConfigError
    from service.config import check_database_url

    if not database_url:
        fail(
            "EUCORA_DATABASE_URL is not set and --database-url was not given "
            "(e.g. postgresql://eucora@127.0.0.1:5432/eucora)"
        )
    try:
        return check_database_url(database_url)
    except ConfigError as exc:
        fail(str(exc))


def open_database(database_url: str | None, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """The database from --database-url / EUCORA_DATABASE_URL with its schema current,
    or a one-line error (unreachable: 4; schema not current: 2)."""
    import psycopg

    from service.db import migrate
    from service.db.connect import DatabaseUnavailable, connect

    url = require_url(database_url)
    try:
        conn = connect(url, autocommit=autocommit)
    except DatabaseUnavailable as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    try:
        migrate.require_current(conn)
        if not autocommit:
            conn.rollback()  # the command's own transaction starts clean
    except migrate.SchemaNotCurrent as exc:
        conn.close()
        fail(str(exc))
    except psycopg.Error as exc:  # e.g. no permission to read the schema's version
        conn.close()
        fail(f"cannot read the database schema: {exc.diag.message_primary or exc}")
    return conn


def in_transaction(
    database_url: str | None, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]
) -> T:
    """Run a domain's async `work` in one transaction (committed when it returns),
    from a synchronous command. The domains (service/domains/) are async because the
    bridge is; the CLI shares their code rather than spelling the SQL again."""
    import asyncio

    import psycopg

    from service.db import migrate
    from service.db.connect import connect_async, describe_connection_error

    url = require_url(database_url)

    async def run() -> T:
        try:
            conn = await connect_async(url, application_name="eucora")
        except psycopg.OperationalError as exc:
            fail(describe_connection_error(url, exc), EXIT_UNREACHABLE)
        async with conn:
            try:
                await migrate.require_current_async(conn)
                await conn.rollback()
            except migrate.SchemaNotCurrent as exc:
                fail(str(exc))
            except psycopg.Error as exc:
                fail(f"cannot read the database schema: {exc.diag.message_primary or exc}")
            for attempt in range(DEADLOCK_RETRIES):
                try:
                    async with conn.transaction():
                        return await work(conn)
                except psycopg.errors.DeadlockDetected:
                    # PostgreSQL chose this transaction to undo (another held the rows
                    # it needed, in the other order): nothing of it stayed; run it again.
                    if attempt == DEADLOCK_RETRIES - 1:
                        raise
            raise AssertionError("unreachable")

    return asyncio.run(run())
