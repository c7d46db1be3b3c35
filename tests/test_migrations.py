"""Migrations against a real PostgreSQL, in whichever mode the server offers.

Tests about one schema mode take `db_mode` (or `migrated_database`), which runs them in
plain PostgreSQL mode and, where the server can load TimescaleDB, in TimescaleDB mode.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.dialects import postgresql

from service.db import migrate
from service.db.connect import DatabaseUnavailable, OwnConnection, connect, connect_async
from service.db.models import RELATIONAL_MODELS
from tests.fix_db import new_database, require_mode

LATEST = migrate.latest_version()
# The shipped versions, ascending (numbers are reserved per change, so one may land
# before a lower one: a gap is no error).
VERSIONS = [m.version for m in migrate.load_migrations()]
HYPERTABLES = {
    "telemetry",
    "agent_status_events",
    "task_events",
    "deployment_status_events",
    "dead_letters",
    "security_events",
    "events",
}


@pytest.fixture
def database(empty_database: str) -> Iterator[str]:
    """A database with every migration applied."""
    migrate.upgrade(empty_database)
    yield empty_database


@dataclass(frozen=True)
class MigratedDatabase:
    url: str
    mode: migrate.Mode


@pytest.fixture(scope="module", params=["postgresql", "timescaledb"])
def migrated_database(
    request: pytest.FixtureRequest, admin_database_url: str, timescaledb_missing: str | None
) -> Iterator[MigratedDatabase]:
    """A database migrated in one mode, shared by the module's read-only tests."""
    mode: migrate.Mode = request.param
    require_mode(mode, timescaledb_missing)
    with new_database(admin_database_url) as url:
        migrate.upgrade(url, mode=mode)
        yield MigratedDatabase(url, mode)


def test_migration_files_are_well_formed() -> None:
    migrations = migrate.load_migrations()
    versions = [m.version for m in migrations]
    assert versions == sorted(set(versions)) and versions[0] == 1 and versions[-1] == LATEST
    first = migrations[0]
    assert first.label == "0001_initial"
    assert [name for name, _ in first.scripts("postgresql")] == [
        "0001_initial.sql",
        "0001_initial.plain.sql",
    ]
    assert [name for name, _ in first.scripts("timescaledb")] == [
        "0001_initial.sql",
        "0001_initial.timescale.sql",
    ]


def test_upgrade_twice_applies_once(
    empty_database: str, db_mode: migrate.Mode, mode_label: str
) -> None:
    first = migrate.upgrade(empty_database, mode=db_mode)
    assert [m.version for m in first] == VERSIONS
    assert {m.mode for m in first} == {db_mode}
    assert migrate.upgrade(empty_database) == []
    with connect(empty_database) as conn:
        assert migrate.current_version(conn) == LATEST
        assert migrate.pending(conn) == []
        assert migrate.database_mode(conn) == mode_label
        rows = conn.execute("SELECT version, name, mode FROM schema_migrations").fetchall()
        assert rows[0] == (1, "initial", db_mode)
        assert len(rows) == len(VERSIONS)
        if db_mode == "timescaledb":
            hypertables = conn.execute(
                "SELECT hypertable_name FROM timescaledb_information.hypertables"
            ).fetchall()
            assert {name for (name,) in hypertables} == HYPERTABLES
        else:  # the extension may be on the server, but not in a plain-mode database
            assert conn.execute(
                "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
            ).fetchone() == (0,)


def test_concurrent_upgrades_apply_the_schema_once(empty_database: str) -> None:
    workers = 4
    start = threading.Barrier(workers)
    results: list[list[migrate.AppliedMigration]] = []
    failures: list[BaseException] = []

    def run() -> None:
        start.wait()
        try:
            results.append(migrate.upgrade(empty_database))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    # Exactly one upgrader did the work; the others found nothing pending.
    assert sorted(len(r) for r in results) == [0] * (workers - 1) + [len(VERSIONS)]
    with connect(empty_database) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(VERSIONS),)


def test_upgrade_waits_for_a_running_upgrade(empty_database: str) -> None:
    """While one session holds the upgrade lock, another upgrade does not start."""
    with connect(empty_database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrate.ADVISORY_LOCK_KEY,))
        done = threading.Event()
        result: list[list[migrate.AppliedMigration]] = []

        def run() -> None:
            result.append(migrate.upgrade(empty_database))
            done.set()

        worker = threading.Thread(target=run)
        worker.start()
        # Wait (without sleeping) until the worker is blocked on the advisory lock.
        waiting = (
            "SELECT EXISTS (SELECT 1 FROM pg_locks"
            " WHERE locktype = 'advisory' AND NOT granted AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database()))"
        )
        with connect(empty_database, autocommit=True) as watcher:
            while watcher.execute(waiting).fetchone() != (True,):
                assert worker.is_alive()
        assert not done.is_set()
        assert migrate.current_version(holder) == 0
        holder.execute("SELECT pg_advisory_unlock(%s)", (migrate.ADVISORY_LOCK_KEY,))
        worker.join()
    assert [m.version for m in result[0]] == VERSIONS


def test_failed_migration_is_rolled_back_and_retried(empty_database: str, tmp_path: Path) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE first (id int);")
    (tmp_path / "0002_second.sql").write_text(
        "CREATE TABLE second (id int);\nSELECT no_such_column FROM first;"
    )
    migrations = migrate.load_migrations(tmp_path)
    with pytest.raises(migrate.MigrationError) as err:
        migrate.upgrade(empty_database, migrations=migrations)
    assert "0002_second" in str(err.value)
    assert "no_such_column" in str(err.value)
    assert "line 2" in str(err.value)
    with connect(empty_database) as conn:
        assert migrate.current_version(conn) == 1
        # Nothing of 0002 survived: its table was rolled back with it.
        assert conn.execute("SELECT to_regclass('second')").fetchone() == (None,)
        assert [m.version for m in migrate.pending(conn, migrations)] == [2]

    (tmp_path / "0002_second.sql").write_text("CREATE TABLE second (id int);")
    applied = migrate.upgrade(empty_database, migrations=migrate.load_migrations(tmp_path))
    assert [m.version for m in applied] == [2]


def test_variants_follow_the_mode(
    empty_database: str, db_mode: migrate.Mode, tmp_path: Path
) -> None:
    (tmp_path / "0001_x.sql").write_text("CREATE TABLE t (v text);")
    (tmp_path / "0001_x.plain.sql").write_text("INSERT INTO t VALUES ('plain');")
    (tmp_path / "0001_x.timescale.sql").write_text("INSERT INTO t VALUES ('timescale');")
    migrate.upgrade(empty_database, mode=db_mode, migrations=migrate.load_migrations(tmp_path))
    variant = "timescale" if db_mode == "timescaledb" else "plain"
    with connect(empty_database) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [(variant,)]


def test_badly_named_migration_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_x.timescaledb.sql").write_text("SELECT 1;")
    with pytest.raises(migrate.MigrationError, match="NNNN_name"):
        migrate.load_migrations(tmp_path)


def test_timescaledb_mode_fails_clearly_without_the_extension(empty_database: str) -> None:
    """Only where the server cannot load TimescaleDB; the next test covers the others."""
    with connect(empty_database) as conn:
        ts = migrate.timescaledb_status(conn)
    if ts.available and ts.preloaded:
        pytest.skip("TimescaleDB is installed and preloaded on this server: it cannot lack it")
    reason = "not available" if not ts.available else "not preloaded"
    with pytest.raises(migrate.MigrationError, match=reason):
        migrate.upgrade(empty_database, mode="timescaledb")
    with connect(empty_database) as conn:
        assert migrate.current_version(conn) == 0
        assert migrate.database_mode(conn) == "postgresql"


def test_plain_mode_is_refused_where_timescaledb_is_in_the_database(
    empty_database: str, timescaledb_missing: str | None
) -> None:
    """The plain schema's time_bucket() would clash with the extension's."""
    require_mode("timescaledb", timescaledb_missing)
    with connect(empty_database, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION timescaledb")
    with pytest.raises(migrate.MigrationError, match="TimescaleDB is installed in this database"):
        migrate.upgrade(empty_database, mode="postgresql")
    with connect(empty_database) as conn:
        assert migrate.current_version(conn) == 0
    applied = migrate.upgrade(empty_database)
    assert {m.mode for m in applied} == {"timescaledb"}


def test_require_current(empty_database: str) -> None:
    with connect(empty_database) as conn:
        with pytest.raises(migrate.SchemaNotCurrent) as err:
            migrate.require_current(conn)
        assert str(err.value) == (
            f"database schema is at version 0, this eucora needs {LATEST}"
            f" ({len(VERSIONS)} pending): run `eucora db upgrade`"
        )
    migrate.upgrade(empty_database)
    with connect(empty_database) as conn:
        assert migrate.require_current(conn) == LATEST
        conn.execute(
            "INSERT INTO schema_migrations (version, name, mode, checksum)"
            " VALUES (9999, 'future', 'postgresql', '')"
        )
        with pytest.raises(migrate.SchemaNotCurrent, match="newer than this eucora"):
            migrate.require_current(conn)


def test_telemetry_duplicates_are_stored_once(database: str) -> None:
    t = datetime(2024, 5, 15, 12, 0, 0, tzinfo=UTC)
    insert = (
        "INSERT INTO telemetry (time, agent_id, cpu_percent, net_rx_bytes)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (agent_id, time) DO NOTHING"
    )
    with connect(database) as conn:
        cur = conn.cursor()
        cur.execute(insert, (t, "a1", 10.0, 100))
        assert cur.rowcount == 1
        cur.execute(insert, (t, "a1", 99.0, 999))  # a QoS 1 redelivery
        assert cur.rowcount == 0
        cur.execute(insert, (t, "a2", 20.0, 200))  # same time, another agent
        assert cur.rowcount == 1
        rows = conn.execute(
            "SELECT agent_id, cpu_percent FROM telemetry ORDER BY agent_id"
        ).fetchall()
        assert rows == [("a1", 10.0), ("a2", 20.0)]
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO telemetry (time, agent_id) VALUES (%s, 'a1')", (t,))


def _timescale_bucket(width: timedelta, ts: datetime) -> datetime:
    """TimescaleDB's definition: floor to a multiple of width from 2000-01-03 00:00 UTC."""
    origin = datetime(2000, 1, 3, tzinfo=UTC)
    return origin + ((ts - origin) // width) * width


@pytest.mark.parametrize(
    ("width", "ts", "expected"),
    [
        ("1 minute", "2024-05-15 13:47:31.5+00", "2024-05-15 13:47:00+00"),
        ("15 minutes", "2024-05-15 13:47:31+00", "2024-05-15 13:45:00+00"),
        ("1 hour", "2024-05-15 13:47:31+02", "2024-05-15 11:00:00+00"),
        ("1 day", "2024-05-15 23:59:59+00", "2024-05-15 00:00:00+00"),
        ("1 day", "2024-05-16 01:00:00+02", "2024-05-15 00:00:00+00"),  # UTC days
        ("7 days", "2024-05-15 13:47:31+00", "2024-05-13 00:00:00+00"),  # a Wednesday
        ("1 week", "2024-05-19 23:59:59+00", "2024-05-13 00:00:00+00"),  # the Sunday
        ("1 week", "2024-05-20 00:00:00+00", "2024-05-20 00:00:00+00"),  # the next Monday
        ("1 hour", "1999-12-31 23:30:00+00", "1999-12-31 23:00:00+00"),  # before the origin
        ("5 minutes", "2000-01-02 23:58:00+00", "2000-01-02 23:55:00+00"),
    ],
)
def test_time_bucket_matches_timescaledb(
    migrated_database: MigratedDatabase, width: str, ts: str, expected: str
) -> None:
    """In plain mode the fallback; in TimescaleDB mode the extension itself, which
    checks the expected values this test holds the fallback to."""
    with connect(migrated_database.url) as conn:
        row = conn.execute(
            "SELECT time_bucket(%s::interval, %s::timestamptz),"
            " %s::interval, %s::timestamptz, %s::timestamptz",
            (width, ts, width, ts, expected),
        ).fetchone()
    assert row is not None
    bucket, width_td, ts_dt, expected_dt = row
    assert bucket == expected_dt
    assert bucket == _timescale_bucket(width_td, ts_dt)


def test_time_bucket_overloads(migrated_database: MigratedDatabase) -> None:
    with connect(migrated_database.url) as conn:
        row = conn.execute(
            "SELECT time_bucket('1 week', TIMESTAMP '2024-05-15 10:00'),"
            " time_bucket('1 day', TIMESTAMPTZ '2024-05-15 10:00+00',"
            "             origin => TIMESTAMPTZ '2024-01-01 06:00+00'),"
            " time_bucket('1 day', TIMESTAMPTZ '2024-05-15 10:00+00', 'Europe/Paris')"
        ).fetchone()
        assert row == (
            datetime(2024, 5, 13),
            datetime(2024, 5, 15, 6, tzinfo=UTC),
            datetime(2024, 5, 14, 22, tzinfo=UTC),  # Paris midnight, CEST
        )
        month = "SELECT time_bucket('1 month', TIMESTAMPTZ '2024-05-15 10:00+00')"
        if migrated_database.mode == "timescaledb":
            assert conn.execute(month).fetchone() == (datetime(2024, 5, 1, tzinfo=UTC),)
        else:
            # The documented limit of the fallback: no calendar months.
            with pytest.raises(psycopg.errors.FeatureNotSupported):
                conn.execute(month)


def test_telemetry_1m_aggregates_per_agent_and_minute(database: str) -> None:
    t0 = datetime(2024, 5, 15, 12, 0, tzinfo=UTC)
    rows = [
        (t0, "a1", 10.0, 20.0, 30.0, 100, 1000),
        (t0 + timedelta(seconds=30), "a1", 20.0, 40.0, 50.0, 300, 1500),
        (t0 + timedelta(seconds=61), "a1", 50.0, 50.0, 50.0, 400, 1600),
        (t0 + timedelta(seconds=5), "a2", 1.0, 2.0, 3.0, 4, 5),
    ]
    with connect(database) as conn:
        with conn.cursor().copy(
            "COPY telemetry (time, agent_id, cpu_percent, memory_percent, disk_percent,"
            " net_rx_bytes, net_tx_bytes) FROM STDIN"
        ) as copy:
            for r in rows:
                copy.write_row(r)
        got = conn.execute(
            "SELECT bucket, agent_id, avg_cpu_percent, avg_memory_percent, avg_disk_percent,"
            " net_rx_bytes, net_tx_bytes, samples"
            " FROM telemetry_1m WHERE bucket >= %s ORDER BY agent_id, bucket",
            (t0,),
        ).fetchall()
    assert got == [
        (t0, "a1", 15.0, 30.0, 40.0, 400, 2500, 2),
        (t0 + timedelta(minutes=1), "a1", 50.0, 50.0, 50.0, 400, 1600, 1),
        (t0, "a2", 1.0, 2.0, 3.0, 4, 5, 1),
    ]


def test_outbox_claims_skip_locked_rows(database: str) -> None:
    with connect(database) as conn:
        conn.execute("INSERT INTO agents (agent_id) VALUES ('a1')")
        ids = [
            conn.execute(
                "INSERT INTO tasks (agent_id, type) VALUES ('a1', 'HEALTHCHECK') RETURNING task_id"
            ).fetchone()
            for _ in range(2)
        ]
        conn.commit()
        claim = (
            "SELECT task_id FROM tasks WHERE next_publish_at <= now()"
            " ORDER BY next_publish_at LIMIT 1 FOR UPDATE SKIP LOCKED"
        )
        with connect(database) as other:
            first = conn.execute(claim).fetchone()
            second = other.execute(claim).fetchone()
            assert {first, second} == set(ids)


def test_models_match_the_migrated_schema(database: str) -> None:
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    with connect(database) as conn:
        for model in RELATIONAL_MODELS:
            table = model.__table__  # type: ignore[attr-defined]
            db_columns = {
                name: (nullable == "YES", data_type)
                for name, nullable, data_type in conn.execute(
                    "SELECT column_name, is_nullable, data_type FROM information_schema.columns"
                    " WHERE table_schema = 'public' AND table_name = %s",
                    (table.name,),
                ).fetchall()
            }
            assert db_columns, f"table {table.name} is missing"
            model_columns = {
                c.name: (c.nullable, c.type.compile(dialect=dialect).lower()) for c in table.columns
            }
            assert model_columns == db_columns, table.name
            db_pk = [
                r[0]
                for r in conn.execute(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
                    " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                    " WHERE i.indrelid = %s::regclass AND i.indisprimary",
                    (table.name,),
                ).fetchall()
            ]
            assert sorted(db_pk) == sorted(c.name for c in table.primary_key.columns)


def test_own_connection_checks_the_schema_and_survives_a_lost_backend(database: str) -> None:
    """The bridge's workers each hold one connection (OwnConnection): after the server
    drops it, the next get() is a new, working connection."""

    async def main() -> tuple[int, int]:
        own = OwnConnection(database)
        try:
            conn = await own.get()
            first = await migrate.require_current_async(conn)
            async with await connect_async(database, autocommit=True) as admin:
                await admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            with pytest.raises(psycopg.OperationalError):
                await conn.execute("SELECT 1")
            again = await own.get()
            assert again is not conn
            return first, await migrate.require_current_async(again)
        finally:
            await own.close()

    assert asyncio.run(main()) == (LATEST, LATEST)


def test_unknown_database_is_named_in_the_error(empty_database: str) -> None:
    url = empty_database.rsplit("/", 1)[0] + f"/missing_{uuid.uuid4().hex[:8]}"
    with pytest.raises(DatabaseUnavailable, match=r"database \"missing_\w+\" does not exist$"):
        connect(url)
