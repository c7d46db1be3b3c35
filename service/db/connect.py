"""Database connections, opened one way: `connect` (sync: CLI, migrations) and
`connect_async` (the bridge, the CLI's async commands); `OwnConnection` is a
long-running worker's own connection, reconnected when lost.

Connection failures are turned into one readable line that never shows a password,
because libpq's messages are multi-line and quote the connection target.
"""

from __future__ import annotations

import asyncio
import logging
import re

import psycopg
from psycopg.rows import TupleRow

from schemas.config import redact_url
from service.logs import scrub

log = logging.getLogger("eucora.db")

# How long a CLI command waits for a server that does not answer (libpq connect_timeout).
DEFAULT_CONNECT_TIMEOUT_S = 5


class DatabaseUnavailable(ConnectionError):
    """The database cannot be reached; str() is one line fit for a terminal or a log."""


def connection_error_reason(exc: BaseException) -> str:
    """The essential cause of a connection error, e.g. 'connection refused'."""
    lines = [line.strip() for line in scrub(str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    # libpq nests contexts ('connection failed: connection to server at ... failed: X'):
    # the innermost part is the cause an operator needs.
    reason = lines[0].rsplit("failed: ", 1)[-1]
    reason = re.sub(r"^(?:connection is bad: |FATAL:\s+)", "", reason)
    if len(reason) > 1 and reason[0].isupper() and reason[1].islower():
        reason = reason[0].lower() + reason[1:]
    return reason


def describe_connection_error(url: str, exc: BaseException) -> str:
    """'cannot connect to database postgresql://user:***@host/db: connection refused'."""
    return f"cannot connect to database {redact_url(url)}: {connection_error_reason(exc)}"


def connect(
    url: str,
    *,
    autocommit: bool = False,
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_S,
    application_name: str = "eucora",
) -> psycopg.Connection[TupleRow]:
    """A synchronous connection (CLI, migrations); raises DatabaseUnavailable."""
    try:
        return psycopg.connect(
            url,
            autocommit=autocommit,
            connect_timeout=connect_timeout,
            application_name=application_name,
        )
    except psycopg.Error as exc:
        raise DatabaseUnavailable(describe_connection_error(url, exc)) from None


async def connect_async(
    url: str,
    *,
    autocommit: bool = False,
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT_S,
    application_name: str = "eucora-bridge",
) -> psycopg.AsyncConnection[TupleRow]:
    """An async connection; psycopg's errors are raised as they are (the bridge tells a
    lost database from a wrong configuration by them)."""
    return await psycopg.AsyncConnection.connect(
        url,
        autocommit=autocommit,
        connect_timeout=connect_timeout,
        application_name=application_name,
    )


class OwnConnection:
    """A worker's own autocommit connection (transactions are explicit), reconnected
    when lost. Not from a pool: the outbox and the sweeps run all the time, and
    waiting in a pool's queue is where Python 3.11 can lose a cancellation."""

    def __init__(self, url: str, application_name: str = "eucora-bridge") -> None:
        self.url = url
        self.application_name = application_name
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None

    async def get(self) -> psycopg.AsyncConnection[TupleRow]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await connect_async(
                self.url, autocommit=True, application_name=self.application_name
            )
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


async def listen(database_url: str, channel: str, wake: asyncio.Event) -> None:
    """Set `wake` on every NOTIFY on `channel`, and once after each (re)connect (what
    was written while nobody listened). Reconnects while the database is away: the
    worker that waits on `wake` polls besides, so nothing depends on a notification."""
    delay = 0.5
    while True:
        try:
            async with await connect_async(database_url, autocommit=True) as conn:
                await conn.execute(f"LISTEN {channel}")
                delay = 0.5
                wake.set()
                async for _ in conn.notifies():
                    wake.set()
        except (psycopg.Error, OSError) as exc:
            log.info("listener reconnecting", extra={"channel": channel, "error": str(exc)[:200]})
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
