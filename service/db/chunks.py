"""TimescaleDB: each hypertable's current and next chunk, made ahead of the writers.

The transaction that inserts the first row of a new chunk holds a lock on the
hypertable until it ends; every other transaction that needs that chunk waits for it.
Two transactions that each start a new chunk of a different hypertable and then write
into the other's deadlock (PostgreSQL cancels one of them after a second). The
bridge's writers do exactly that when a day begins: their batches write telemetry,
`events` and the status tables, whose chunks all begin at midnight UTC (the weekly
ones on Thursdays, as TimescaleDB counts from 1970-01-01). A transaction that stays
open after recording the day's first event (a long CLI command) would also stop
every event writer until it ends. Plain PostgreSQL has nothing of the kind.

So the bridge makes the chunks for now and for a day ahead every hour (sweeps.py),
one short transaction per table, so that it never holds two of these locks itself.
A chunk is made by inserting a placeholder row and deleting it in the same
transaction: TimescaleDB then chooses the chunk's range exactly as for a real row.

Telemetry from the past (an agent's offline buffer) can still start an old chunk;
telemetry is written first in every batch, so that cannot close a cycle.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

from service.db import migrate

log = logging.getLogger("eucora.db.chunks")

Conn = psycopg.AsyncConnection[Any]

# A row each hypertable accepts: its time column and a value for each other column
# that has no default. Inserted at the chunk's time and deleted in the same
# transaction, so nothing ever reads it; every hypertable has one (tests/test_chunks.py
# checks). Built from this table rather than written out per table: the one writer of
# each event table's rows stays in its domain (tests/test_contract.py).
PLACEHOLDERS: Final[dict[str, tuple[str, dict[str, str]]]] = {
    "telemetry": ("time", {"agent_id": "''"}),
    "agent_status_events": ("time", {"agent_id": "''", "state": "'offline'", "source": "'bridge'"}),
    "task_events": (
        "time",
        {"task_id": "gen_random_uuid()", "agent_id": "''", "status": "''", "source": "'server'"},
    ),
    "deployment_status_events": (
        "time",
        {
            "deployment_id": "gen_random_uuid()",
            "agent_id": "''",
            "status": "'PENDING'",
            "source": "'server'",
        },
    ),
    "dead_letters": ("time", {"topic": "''", "reason": "''", "payload_size": "0"}),
    "security_events": ("time", {"event": "''"}),
    "events": ("ts", {"kind": "''"}),
}


def placeholder(table: str) -> sql.Composed:
    """The INSERT of `table`'s placeholder row at %(t)s."""
    time_column, values = PLACEHOLDERS[table]
    return sql.SQL("INSERT INTO {} ({}) VALUES (%(t)s, {})").format(
        sql.Identifier(table),
        sql.SQL(", ").join(sql.Identifier(c) for c in (time_column, *values)),
        sql.SQL(", ").join(sql.SQL(v) for v in values.values()),
    )


# How far ahead: the chunk that will be current a day from now exists a day early.
AHEAD: Final = timedelta(days=1)

_HYPERTABLES = """
SELECT hypertable_name FROM timescaledb_information.hypertables
 WHERE hypertable_schema = current_schema() ORDER BY 1
"""
_COVERED = """
SELECT EXISTS (SELECT 1 FROM timescaledb_information.chunks
                WHERE hypertable_schema = current_schema() AND hypertable_name = %s
                  AND range_start <= %s AND %s < range_end)
"""


async def make_ahead(conn: Conn, now: datetime, ahead: timedelta = AHEAD) -> list[str]:
    """Make the chunks that hold `now` and `now + ahead` where they are missing, on an
    autocommit connection (each in a transaction of its own); the chunks made. Nothing
    on plain PostgreSQL."""
    assert conn.autocommit, "one transaction per chunk: never two hypertable locks at once"
    if not await migrate.uses_timescaledb(conn):
        return []
    made: list[str] = []
    for (table,) in await (await conn.execute(_HYPERTABLES)).fetchall():
        if table not in PLACEHOLDERS:
            log.warning("no placeholder row for hypertable; its chunks are not made ahead",
                        extra={"table": table})  # fmt: skip
            continue
        for t in (now, now + ahead):
            covered = await (await conn.execute(_COVERED, (table, t, t))).fetchone()
            if covered and covered[0]:
                continue
            async with conn.transaction():
                returning = sql.SQL(" RETURNING tableoid::regclass::text, ctid::text")
                cur = await conn.execute(placeholder(table) + returning, {"t": t})
                row = await cur.fetchone()
                assert row is not None
                chunk, ctid = row
                # The chunk itself (a plain table): its ctid is the row's.
                await conn.execute(f"DELETE FROM {chunk} WHERE ctid = %s::tid", (ctid,))
            made.append(chunk)
    if made:
        log.info("chunks made ahead", extra={"chunks": made})
    return made
