"""TimescaleDB chunks made ahead of the writers (service/db/chunks.py).

Without them, two transactions that each start a new chunk of one hypertable and then
write into the other's wait for each other: a deadlock, which PostgreSQL breaks by
cancelling one. Here both run on one thread, so a wait could never end: a lock
timeout turns it into an error instead of a hung test.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from schemas.events import EventKind
from service.db import chunks, migrate
from service.domains import events
from service.domains.events import NewEvent
from service.stack.process import wait_for
from tests.fix_db import require_mode
from tests.fix_services import BridgeProcess

TELEMETRY = "INSERT INTO telemetry (time, agent_id, cpu_percent) VALUES (now(), %s, 1.0)"


def make_ahead(url: str, now: datetime) -> list[str]:
    async def run() -> list[str]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await chunks.make_ahead(conn, now)

    return asyncio.run(run())


def chunk_holding(conn: psycopg.Connection[Any], table: str, t: datetime) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM timescaledb_information.chunks"
        " WHERE hypertable_name = %s AND range_start <= %s AND %s < range_end)",
        (table, t, t),
    ).fetchone()
    return bool(row and row[0])


def test_every_hypertable_has_a_placeholder_row(
    empty_database: str, timescaledb_missing: str | None
) -> None:
    require_mode("timescaledb", timescaledb_missing)
    migrate.upgrade(empty_database, mode="timescaledb")
    with psycopg.connect(empty_database) as conn:
        names = conn.execute(
            "SELECT hypertable_name FROM timescaledb_information.hypertables"
            " WHERE hypertable_schema = 'public'"
        ).fetchall()
    assert {n for (n,) in names} == chunks.PLACEHOLDERS.keys()


def test_writers_starting_the_day_in_two_hypertables_do_not_wait_for_each_other(
    empty_database: str, db_mode: migrate.Mode
) -> None:
    migrate.upgrade(empty_database, mode=db_mode)
    now = datetime.now(UTC)
    made = make_ahead(empty_database, now)
    if db_mode == "postgresql":
        assert made == []
    else:
        # Each hypertable's chunk for now, and for tomorrow where that is another one.
        assert len(chunks.PLACEHOLDERS) <= len(made) <= 2 * len(chunks.PLACEHOLDERS)
        assert make_ahead(empty_database, now) == []  # made once
        with psycopg.connect(empty_database) as conn:
            for table in chunks.PLACEHOLDERS:
                assert chunk_holding(conn, table, now), table
                assert chunk_holding(conn, table, now + chunks.AHEAD), table
                row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                assert row == (0,), f"{table} kept its placeholder row"
    with psycopg.connect(empty_database) as a, psycopg.connect(empty_database) as b:
        for conn in (a, b):
            conn.execute("SET lock_timeout = '10s'")
            conn.commit()
        events.record_sync(a, [NewEvent(EventKind.AGENT_ONLINE, "a", {})])
        b.execute(TELEMETRY, ("b",))
        a.execute(TELEMETRY, ("a",))
        events.record_sync(b, [NewEvent(EventKind.AGENT_ONLINE, "b", {})])
        a.commit()
        b.commit()
        row = a.execute("SELECT count(*) FROM events").fetchone()
        assert row == (2,)


def test_without_them_the_same_writers_wait_for_each_other(
    empty_database: str, timescaledb_missing: str | None
) -> None:
    """Why they are made: the same two writers on a day whose chunks do not exist yet."""
    require_mode("timescaledb", timescaledb_missing)
    migrate.upgrade(empty_database, mode="timescaledb")
    with psycopg.connect(empty_database) as a, psycopg.connect(empty_database) as b:
        b.execute("SET lock_timeout = '1s'")
        events.record_sync(a, [NewEvent(EventKind.AGENT_ONLINE, "a", {})])
        b.execute(TELEMETRY, ("b",))
        with pytest.raises(psycopg.errors.LockNotAvailable):
            events.record_sync(b, [NewEvent(EventKind.AGENT_ONLINE, "b", {})])


@pytest.fixture
def timescaledb(timescaledb_missing: str | None) -> None:
    """Before the bridge is started for nothing."""
    require_mode("timescaledb", timescaledb_missing)


def test_the_bridge_makes_tomorrows_chunks(
    timescaledb: None, database: str, bridge: BridgeProcess
) -> None:
    tomorrow = datetime.now(UTC) + timedelta(days=1)

    def made() -> bool:
        with psycopg.connect(database) as conn:
            return all(chunk_holding(conn, t, tomorrow) for t in chunks.PLACEHOLDERS)

    wait_for(made, 30, "the bridge to make tomorrow's chunks")
