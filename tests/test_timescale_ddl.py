"""The TimescaleDB half of the schema and the dashboard queries, on a real TimescaleDB.

TimescaleDB is not packaged for Debian, so the server here is PGlite (PostgreSQL 17
compiled to WASM) with TimescaleDB 2.23 from npm, served over the wire protocol by
tests/pglite/server.mjs; scripts/pglite.sh installs it. The module is skipped when
Node.js or those packages are missing, unless EUCORA_REQUIRE_PGLITE=1 (then it fails).

One in-memory database for the whole module, so each test uses agent ids and days of
its own. PGlite serves one connection at a time and makes the next client wait: every
test closes its connection before it opens another, and code under test must do the
same (a second connection from the same thread would wait for the first one to close;
`connect()` gives up after its 5 s connect_timeout instead of hanging).
Background workers do not exist in PGlite: policies are run with `CALL run_job(id)`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import selectors
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from cli import telemetry as telemetry_cli
from cli.common import iso
from schemas.topics import Kind, TopicTree
from schemas.validate import PayloadError, parse
from service.bridge.message import Inbound
from service.bridge.routes import default_routes
from service.bridge.store import Store
from service.db import migrate
from service.db.connect import connect

PGLITE_DIR = Path(__file__).resolve().parent / "pglite"
SERVER = PGLITE_DIR / "server.mjs"
PACKAGE = PGLITE_DIR / "node_modules" / "@unni-craftsman" / "pglite" / "package.json"
# Loading the WASM backend and TimescaleDB takes 2-4 s on these machines.
START_TIMEOUT_S = 120.0
REQUIRED = os.environ.get("EUCORA_REQUIRE_PGLITE", "") not in ("", "0")


def _unavailable() -> str | None:
    if shutil.which("node") is None:
        return "Node.js is not installed: PGlite with TimescaleDB cannot run"
    if not PACKAGE.is_file():
        return "PGlite with TimescaleDB is not installed: run scripts/pglite.sh"
    return None


UNAVAILABLE = _unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None and not REQUIRED, reason=UNAVAILABLE or "")

HYPERTABLES = {
    "telemetry": timedelta(days=1),
    "agent_status_events": timedelta(days=7),
    "task_events": timedelta(days=7),
    "deployment_status_events": timedelta(days=7),
    "dead_letters": timedelta(days=7),
    "security_events": timedelta(days=30),
    "events": timedelta(days=1),
}
# The time column, where it is not `time`.
TIME_COLUMN = {"events": "ts"}
TELEMETRY_INSERT = (
    "INSERT INTO telemetry (time, agent_id, cpu_percent, memory_percent, disk_percent,"
    " net_rx_bytes, net_tx_bytes) VALUES (%s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (agent_id, time) DO NOTHING"
)
TELEMETRY_1M = (
    "SELECT bucket, agent_id, avg_cpu_percent, avg_memory_percent, avg_disk_percent,"
    " net_rx_bytes, net_tx_bytes, samples"
    " FROM telemetry_1m WHERE agent_id = ANY(%s) AND bucket >= %s ORDER BY agent_id, bucket"
)


# -- the server ----------------------------------------------------------------------------


def _first_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line the server prints, or what it printed before exiting or timing out."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in out:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                break
            chunk = os.read(fd, 4096)
            if not chunk:  # exited
                break
            out += chunk
    return out.decode(errors="replace").partition("\n")[0]


@contextmanager
def pglite_server(log: Path) -> Iterator[str]:
    """Start tests/pglite/server.mjs on a free port; yield its URL."""
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            ["node", str(SERVER), "0"],
            cwd=PGLITE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        line = _first_line(proc, START_TIMEOUT_S)
        m = re.fullmatch(r"listening 127\.0\.0\.1:(\d+)", line)
        if not m:
            raise RuntimeError(
                f"the PGlite server did not start (printed {line!r}): {log.read_text()[-2000:]}"
            )
        # Any user and password are accepted; the database name is ignored.
        yield f"postgresql://eucora:eucora@127.0.0.1:{m[1]}/eucora"
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()  # the server stops when its stdin closes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass(frozen=True)
class Timescale:
    url: str
    refused: str  # upgrade(mode="timescaledb") before the extension was created
    version_after_refusal: int
    status_before: migrate.TimescaleStatus  # once the loader is loaded, before the upgrade
    applied: list[migrate.AppliedMigration]
    warnings: list[str]  # logged by the runner while applying (RAISE WARNING...)
    license: str  # 'timescale' (TSL: compression, continuous aggregates) or 'apache'


@pytest.fixture(scope="module")
def ts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Timescale]:
    """A PGlite server with every migration applied in timescaledb mode."""
    if UNAVAILABLE is not None:
        pytest.fail(f"{UNAVAILABLE} (EUCORA_REQUIRE_PGLITE is set)")
    with pglite_server(tmp_path_factory.mktemp("pglite") / "server.log") as url:
        # TimescaleDB's files are there but it is not loaded: the runner must refuse,
        # as on a server without shared_preload_libraries = 'timescaledb'.
        try:
            migrate.upgrade(url, mode="timescaledb")
        except migrate.MigrationError as exc:
            refused = str(exc)
        else:
            pytest.fail("upgrade(mode='timescaledb') applied without the extension")
        with connect(url) as conn:
            version_after_refusal = migrate.current_version(conn)

        # PGlite has no shared_preload_libraries. Loading TimescaleDB's loader into its
        # single backend is what preloading does for every backend of a real server:
        # then the runner sees it (as a non-superuser would, through the loader's
        # settings) and creates the extension itself.
        with connect(url, autocommit=True) as conn:
            conn.execute("LOAD 'timescaledb'")
            status = migrate.timescaledb_status(conn)

        handler = _Warnings()
        logger = logging.getLogger("service.db.migrate")
        logger.addHandler(handler)
        try:
            applied = migrate.upgrade(url, mode="timescaledb")
        finally:
            logger.removeHandler(handler)
        with connect(url) as conn:
            row = conn.execute("SELECT current_setting('timescaledb.license')").fetchone()
            assert row is not None
        yield Timescale(
            url, refused, version_after_refusal, status, applied, handler.messages, str(row[0])
        )


def _tsl(ts: Timescale) -> None:
    if ts.license != "timescale":
        pytest.skip(f"TimescaleDB runs under the {ts.license} license: no TSL features")


def _job(conn: psycopg.Connection[Any], proc: str, table: str) -> int:
    """The id of a policy job: `proc` on hypertable (or continuous aggregate) `table`."""
    row = conn.execute(
        "SELECT j.job_id FROM timescaledb_information.jobs j"
        " LEFT JOIN timescaledb_information.continuous_aggregates c"
        "   ON (c.materialization_hypertable_schema, c.materialization_hypertable_name)"
        "    = (j.hypertable_schema, j.hypertable_name)"
        " WHERE j.proc_name = %s AND coalesce(c.view_name, j.hypertable_name) = %s",
        (proc, table),
    ).fetchone()
    assert row is not None, f"no {proc} job on {table}"
    return int(row[0])


# -- the server itself ----------------------------------------------------------------------


def test_each_connection_starts_clean(ts: Timescale) -> None:
    """PGlite has one backend: server.mjs resets the session between clients."""
    for _ in range(2):
        conn = connect(ts.url)
        try:
            assert conn.execute("SHOW search_path").fetchone() == ("public",)
            assert conn.execute("SELECT pg_try_advisory_lock(42)").fetchone() == (True,)
            conn.execute("CREATE TEMP TABLE scratch (v int)")  # gone with the session
            for i in range(6):  # psycopg prepares from the 5th run: _pg3_0 each session
                conn.execute("SELECT %s::int", (i,))
            conn.execute("CREATE TABLE left_open (v int)")
        finally:
            conn.close()  # without COMMIT: the transaction stays open in the backend
        with connect(ts.url) as conn:
            assert conn.execute("SELECT to_regclass('left_open')").fetchone() == (None,)
            assert conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            ).fetchone() == (0,)


def test_large_messages_and_pipelines(ts: Timescale) -> None:
    """Messages over 64 KiB arrive in several reads; PGlite must get them whole."""
    with connect(ts.url) as conn:
        text = "x" * 300_000
        assert conn.execute("SELECT length(%s::text)", (text,)).fetchone() == (300_000,)
        conn.execute("CREATE TEMP TABLE wide (i int, v text)")
        conn.cursor().executemany(  # a pipeline of 2000 Bind/Execute messages
            "INSERT INTO wide VALUES (%s, %s)", [(i, "y" * 100) for i in range(2000)]
        )
        assert conn.execute("SELECT count(*), sum(i) FROM wide").fetchone() == (2000, 1999000)


# -- the migration -------------------------------------------------------------------------


def test_timescaledb_mode_is_refused_until_the_extension_can_be_loaded(ts: Timescale) -> None:
    assert "not preloaded" in ts.refused
    assert "shared_preload_libraries" in ts.refused
    assert ts.version_after_refusal == 0


def test_a_preloaded_timescaledb_is_seen_before_the_extension_exists(ts: Timescale) -> None:
    # shared_preload_libraries does not say it here (PGlite has none; a non-superuser
    # cannot read it): the loader's own settings must.
    assert ts.status_before == migrate.TimescaleStatus(
        available=True, installed_version=None, preloaded=True, license=None
    )


def test_migrations_apply_in_timescaledb_mode_and_are_recorded(ts: Timescale) -> None:
    migrations = migrate.load_migrations()
    assert [(m.version, m.name, m.mode) for m in ts.applied] == [
        (m.version, m.name, "timescaledb") for m in migrations
    ]
    with connect(ts.url) as conn:
        rows = conn.execute(
            "SELECT version, name, mode, checksum FROM schema_migrations ORDER BY version"
        ).fetchall()
        assert rows == [
            (m.version, m.name, "timescaledb", m.checksum("timescaledb")) for m in migrations
        ]
        assert migrate.require_current(conn) == migrate.latest_version()
        assert re.fullmatch(r"timescaledb 2\.\d+\.\d+\S*", migrate.database_mode(conn))
        status = migrate.timescaledb_status(conn)
        assert status.installed_version is not None
        assert status.preloaded


def test_the_branch_for_the_license_ran(ts: Timescale) -> None:
    with connect(ts.url) as conn:
        caggs = conn.execute(
            "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates"
        ).fetchall()
        is_view = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_views WHERE viewname = 'telemetry_1m')"
        ).fetchone()
    if ts.license == "timescale":
        # TSL: no feature was skipped, and telemetry_1m aggregates in real time.
        assert ts.warnings == []
        assert caggs == [("telemetry_1m", False)]
    else:
        assert any("Apache license" in w for w in ts.warnings), ts.warnings
        assert caggs == []
        assert is_view == (True,)


def test_upgrading_again_applies_nothing(ts: Timescale) -> None:
    assert migrate.upgrade(ts.url, mode="timescaledb") == []
    assert migrate.upgrade(ts.url) == []  # auto: the mode recorded
    with connect(ts.url) as conn:
        assert migrate.pending(conn) == []


def test_time_series_tables_are_hypertables(ts: Timescale) -> None:
    with connect(ts.url) as conn:
        dimensions = conn.execute(
            "SELECT hypertable_name, column_name, time_interval"
            " FROM timescaledb_information.dimensions WHERE hypertable_schema = 'public'"
        ).fetchall()
        indexes = dict(
            conn.execute(
                "SELECT tablename, array_agg(indexname::text ORDER BY indexname)"
                " FROM pg_indexes WHERE schemaname = 'public' AND tablename = ANY(%s)"
                " GROUP BY tablename",
                (list(HYPERTABLES),),
            ).fetchall()
        )
    assert sorted(dimensions) == sorted(
        (table, TIME_COLUMN.get(table, "time"), interval) for table, interval in HYPERTABLES.items()
    )
    # telemetry: only its key (COPY speed); event tables: the default (time DESC) index.
    assert indexes["telemetry"] == ["telemetry_pkey"]
    for table in HYPERTABLES.keys() - {"telemetry"}:
        assert f"{table}_{TIME_COLUMN.get(table, 'time')}_idx" in indexes[table], table


def test_tsl_policies_are_as_documented(ts: Timescale) -> None:
    _tsl(ts)
    with connect(ts.url) as conn:
        compression = conn.execute(
            "SELECT attname, segmentby_column_index, orderby_column_index, orderby_asc"
            " FROM timescaledb_information.compression_settings"
            " WHERE hypertable_name = 'telemetry' ORDER BY attname"
        ).fetchall()
        configs = {
            (proc, table): conn.execute(
                "SELECT config, schedule_interval FROM timescaledb_information.jobs"
                " WHERE job_id = %s",
                (_job(conn, proc, table),),
            ).fetchone()
            for proc, table in [
                ("policy_compression", "telemetry"),
                ("policy_retention", "telemetry"),
                ("policy_retention", "dead_letters"),
                ("policy_refresh_continuous_aggregate", "telemetry_1m"),
            ]
        }
    assert compression == [("agent_id", 1, None, None), ("time", None, 1, False)]
    config = {key: value[0] for key, value in configs.items() if value}
    assert config[("policy_compression", "telemetry")]["compress_after"] == "7 days"
    assert config[("policy_retention", "telemetry")]["drop_after"] == "90 days"
    assert config[("policy_retention", "dead_letters")]["drop_after"] == "30 days"
    refresh = configs[("policy_refresh_continuous_aggregate", "telemetry_1m")]
    assert refresh is not None
    assert refresh[0]["start_offset"] == "7 days"
    assert refresh[0]["end_offset"] == "00:01:00"
    assert refresh[1] == timedelta(minutes=1)


# -- writes ---------------------------------------------------------------------------------


def test_telemetry_duplicates_are_stored_once_in_the_hypertable(ts: Timescale) -> None:
    t = datetime(2024, 5, 15, 12, 0, tzinfo=UTC)
    with connect(ts.url) as conn:
        cur = conn.cursor()
        cur.execute(TELEMETRY_INSERT, (t, "dedup-1", 10.0, 1.0, 1.0, 100, 10))
        assert cur.rowcount == 1
        cur.execute(TELEMETRY_INSERT, (t, "dedup-1", 99.0, 9.0, 9.0, 999, 99))  # redelivery
        assert cur.rowcount == 0
        cur.execute(TELEMETRY_INSERT, (t, "dedup-2", 20.0, 2.0, 2.0, 200, 20))
        assert cur.rowcount == 1
        # No conflict target, as the bridge writes it.
        cur.execute(
            "INSERT INTO telemetry (time, agent_id, cpu_percent) VALUES (%s, 'dedup-1', 1)"
            " ON CONFLICT DO NOTHING",
            (t,),
        )
        assert cur.rowcount == 0
        rows = conn.execute(
            "SELECT agent_id, cpu_percent, tableoid::regclass::text FROM telemetry"
            " WHERE agent_id LIKE 'dedup-%' ORDER BY agent_id"
        ).fetchall()
        assert [r[:2] for r in rows] == [("dedup-1", 10.0), ("dedup-2", 20.0)]
        assert all(r[2].startswith("_timescaledb_internal._hyper_") for r in rows), rows
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO telemetry (time, agent_id) VALUES (%s, 'dedup-1')", (t,))


def test_the_bridge_stores_a_batch_in_the_hypertables(ts: Timescale) -> None:
    """service/bridge/store.py: binary COPY into a temporary staging table LIKE
    telemetry, INSERT ... ON CONFLICT DO NOTHING, binary COPY of dead letters."""
    agent = "bridge-1"
    t0 = datetime(2024, 5, 16, 8, 0, tzinfo=UTC)
    payload = orjson.dumps(
        {
            "samples": [
                {
                    "ts": (t0 + timedelta(seconds=10 * i)).isoformat(),
                    "cpu_percent": 10.0 * i,
                    "memory_percent": 50.0,
                    "disk_percent": 60.0,
                    "net_rx_bytes": 1000 * i,
                    "net_tx_bytes": 100 * i,
                }
                for i in range(5)
            ]
        }
    )
    topic = TopicTree().agent(agent, Kind.TELEMETRY)
    good = Inbound(
        mid=1,
        qos=1,
        generation=0,
        topic=topic,
        agent_id=agent,
        kind=Kind.TELEMETRY,
        payload=payload,
    )
    good.accept(parse(Kind.TELEMETRY, agent, payload))
    bad = Inbound(
        mid=2,
        qos=1,
        generation=0,
        topic=topic,
        agent_id=agent,
        kind=Kind.TELEMETRY,
        error=PayloadError("not_json", "expected value at line 1 column 1"),
        payload=b"{not json",
    )

    async def run() -> None:
        store = Store(ts.url, default_routes())
        await store.open()
        try:
            await store.flush([good, bad])
            await store.flush([good])  # redelivered after a lost acknowledgement
        finally:
            await store.close()

    asyncio.run(run())
    with connect(ts.url) as conn:
        telemetry = conn.execute(
            "SELECT time, cpu_percent, net_rx_bytes FROM telemetry WHERE agent_id = %s"
            " ORDER BY time",
            (agent,),
        ).fetchall()
        dead = conn.execute(
            "SELECT agent_id, kind, reason, payload, payload_size FROM dead_letters"
            " WHERE topic = %s",
            (topic,),
        ).fetchall()
        seen = conn.execute(
            "SELECT last_telemetry_at IS NOT NULL FROM agents WHERE agent_id = %s", (agent,)
        ).fetchone()
    assert telemetry == [(t0 + timedelta(seconds=10 * i), 10.0 * i, 1000 * i) for i in range(5)]
    assert dead == [(agent, "telemetry", "not_json", b"{not json", 9)]
    assert seen == (True,)


def test_event_hypertables_serve_time_range_panels(ts: Timescale) -> None:
    t0 = datetime(2024, 5, 19, 9, 0, tzinfo=UTC)
    with connect(ts.url) as conn:
        for i, state in enumerate(["online", "offline", "online"]):
            conn.execute(
                "INSERT INTO agent_status_events (time, agent_id, state, epoch, source)"
                " VALUES (%s, 'events-1', %s, %s, 'agent')",
                (t0 + timedelta(minutes=i), state, i),
            )
        conn.execute(
            "INSERT INTO task_events (time, task_id, agent_id, status, source)"
            " VALUES (%s, gen_random_uuid(), 'events-1', 'COMPLETED', 'agent')",
            (t0,),
        )
        conn.execute(
            "INSERT INTO deployment_status_events (time, deployment_id, agent_id, status)"
            " VALUES (%s, gen_random_uuid(), 'events-1', 'SUCCESS')",
            (t0,),
        )
        conn.execute(
            "INSERT INTO security_events (time, agent_id, event)"
            " VALUES (%s, 'events-1', 'identity_mismatch')",
            (t0,),
        )
        # Grafana: $__timeFilter(time), newest first.
        states = conn.execute(
            "SELECT time, state FROM agent_status_events WHERE agent_id = 'events-1'"
            " AND time BETWEEN %s AND %s ORDER BY time DESC LIMIT 2",
            (t0, t0 + timedelta(hours=1)),
        ).fetchall()
        counts = [
            conn.execute(
                f"SELECT count(*) FROM {table} WHERE agent_id = 'events-1' AND time >= %s",
                (t0,),
            ).fetchone()
            for table in ("task_events", "deployment_status_events", "security_events")
        ]
    assert states == [(t0 + timedelta(minutes=2), "online"), (t0 + timedelta(minutes=1), "offline")]
    assert counts == [(1,), (1,), (1,)]


# -- dashboard queries -------------------------------------------------------------------


def _timescale_bucket(width: timedelta, ts: datetime) -> datetime:
    """TimescaleDB's definition: floor to a multiple of width from 2000-01-03 00:00 UTC."""
    origin = datetime(2000, 1, 3, tzinfo=UTC)
    return origin + ((ts - origin) // width) * width


# The buckets the plain PostgreSQL fallback promises to share with TimescaleDB
# (tests/test_migrations.py checks the fallback against the same expectations).
@pytest.mark.parametrize(
    ("width", "ts_text", "expected"),
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
def test_time_bucket_gives_the_buckets_the_fallback_promises(
    ts: Timescale, width: str, ts_text: str, expected: str
) -> None:
    with connect(ts.url) as conn:
        row = conn.execute(
            "SELECT time_bucket(%s::interval, %s::timestamptz),"
            " %s::interval, %s::timestamptz, %s::timestamptz",
            (width, ts_text, width, ts_text, expected),
        ).fetchone()
    assert row is not None
    bucket, width_td, ts_dt, expected_dt = row
    assert bucket == expected_dt
    assert bucket == _timescale_bucket(width_td, ts_dt)


def test_time_bucket_overloads(ts: Timescale) -> None:
    with connect(ts.url) as conn:
        row = conn.execute(
            "SELECT time_bucket('1 week', TIMESTAMP '2024-05-15 10:00'),"
            " time_bucket('1 day', TIMESTAMPTZ '2024-05-15 10:00+00',"
            "             origin => TIMESTAMPTZ '2024-01-01 06:00+00'),"
            " time_bucket('1 day', TIMESTAMPTZ '2024-05-15 10:00+00', 'Europe/Paris'),"
            " time_bucket('1 hour', TIMESTAMPTZ '2024-05-15 10:47+00',"
            "             \"offset\" => INTERVAL '15 minutes'),"
            # Calendar months: TimescaleDB only (the fallback refuses them).
            " time_bucket('1 month', TIMESTAMPTZ '2024-05-15 10:00+00')"
        ).fetchone()
    assert row == (
        datetime(2024, 5, 13),
        datetime(2024, 5, 15, 6, tzinfo=UTC),
        datetime(2024, 5, 14, 22, tzinfo=UTC),  # Paris midnight, CEST
        datetime(2024, 5, 15, 10, 15, tzinfo=UTC),
        datetime(2024, 5, 1, tzinfo=UTC),
    )


def test_grafana_cpu_panel(ts: Timescale) -> None:
    """docs/storage.md: time_bucket('$__interval', time) ... $__timeFilter(time)."""
    t0 = datetime(2024, 5, 18, 10, 0, tzinfo=UTC)
    rows = [
        (t0 + timedelta(seconds=10 * i), "grafana-1", float(i), 0.0, 0.0, 0, 0) for i in range(30)
    ]
    rows.append((t0, "grafana-2", 99.0, 0.0, 0.0, 0, 0))  # another agent: not in the panel
    with connect(ts.url) as conn:
        conn.cursor().executemany(TELEMETRY_INSERT, rows)
        panel = conn.execute(
            "SELECT time_bucket(%s::interval, time) AS time, avg(cpu_percent) AS cpu"
            " FROM telemetry WHERE agent_id = %s AND time BETWEEN %s AND %s"
            " GROUP BY 1 ORDER BY 1",
            ("2m", "grafana-1", t0 + timedelta(minutes=1), t0 + timedelta(minutes=10)),
        ).fetchall()
    # Samples 6..29 are in the range; 6..11 in [10:00, 10:02), 12..23, 24..29.
    assert panel == [
        (t0, sum(range(6, 12)) / 6),
        (t0 + timedelta(minutes=2), sum(range(12, 24)) / 12),
        (t0 + timedelta(minutes=4), sum(range(24, 30)) / 6),
    ]


def test_cli_telemetry_show(ts: Timescale) -> None:
    """`eucora telemetry show ID [--bucket 1m]`: its query, with and without buckets."""
    with connect(ts.url) as conn:
        row = conn.execute("SELECT date_trunc('minute', now()) - interval '10 minutes'").fetchone()
        assert row is not None
        t0: datetime = row[0]
        conn.cursor().executemany(
            TELEMETRY_INSERT,
            [
                (t0 + timedelta(seconds=20 * i), "cli-1", float(i), 50.0, 60.0, 10 * i, i)
                for i in range(6)
            ],
        )
        samples = telemetry_cli.fetch(conn, "cli-1", timedelta(hours=1), None)
        minutes = telemetry_cli.fetch(conn, "cli-1", timedelta(hours=1), timedelta(minutes=1))
    assert [s.cpu_percent for s in samples] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert [m.model_dump(mode="json") for m in minutes] == [
        {
            "time": iso(t0 + timedelta(minutes=m)),
            "cpu_percent": 1.0 + 3 * m,
            "memory_percent": 50.0,
            "disk_percent": 60.0,
            "net_rx_bytes": 10 + 30 * m,
            "net_tx_bytes": 1 + 3 * m,
        }
        for m in (0, 1)
    ]


def test_telemetry_1m_aggregates_per_agent_and_minute(ts: Timescale) -> None:
    """Real-time aggregation, then the refresh policy as configured (TSL), late samples."""
    with connect(ts.url, autocommit=True) as conn:
        row = conn.execute("SELECT date_trunc('minute', now()) - interval '30 minutes'").fetchone()
        assert row is not None
        t0: datetime = row[0]
        samples = [
            (t0, "agg-1", 10.0, 20.0, 30.0, 100, 1000),
            (t0 + timedelta(seconds=30), "agg-1", 20.0, 40.0, 50.0, 300, 1500),
            (t0 + timedelta(seconds=61), "agg-1", 50.0, 50.0, 50.0, 400, 1600),
            (t0 + timedelta(seconds=5), "agg-2", 1.0, 2.0, 3.0, 4, 5),
        ]
        conn.cursor().executemany(TELEMETRY_INSERT, samples)
        expected = [
            (t0, "agg-1", 15.0, 30.0, 40.0, 400, 2500, 2),
            (t0 + timedelta(minutes=1), "agg-1", 50.0, 50.0, 50.0, 400, 1600, 1),
            (t0, "agg-2", 1.0, 2.0, 3.0, 4, 5, 1),
        ]
        agents = ["agg-1", "agg-2"]
        assert conn.execute(TELEMETRY_1M, (agents, t0)).fetchall() == expected

        late = (t0 + timedelta(seconds=10), "agg-1", 90.0, 30.0, 40.0, 200, 1200)
        with_late = [(t0, "agg-1", 40.0, 30.0, 40.0, 600, 3700, 3), *expected[1:]]
        if ts.license != "timescale":  # a plain view: always current
            conn.execute(TELEMETRY_INSERT, late)
            assert conn.execute(TELEMETRY_1M, (agents, t0)).fetchall() == with_late
            return

        # What the refresh policy does every minute (no background workers in PGlite).
        policy = _job(conn, "policy_refresh_continuous_aggregate", "telemetry_1m")
        conn.execute("CALL run_job(%s)", (policy,))
        materialized = conn.execute(
            "SELECT materialization_hypertable_schema, materialization_hypertable_name"
            " FROM timescaledb_information.continuous_aggregates WHERE view_name = 'telemetry_1m'"
        ).fetchone()
        assert materialized is not None
        stored = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE agent_id = ANY(%s)").format(
                sql.Identifier(*materialized)
            ),
            (agents,),
        ).fetchone()
        assert stored == (3,)
        assert conn.execute(TELEMETRY_1M, (agents, t0)).fetchall() == expected

        # A sample for a bucket already materialized (buffered by an agent while it was
        # offline) shows at the next refresh, not before.
        conn.execute(TELEMETRY_INSERT, late)
        assert conn.execute(TELEMETRY_1M, (agents, t0)).fetchall() == expected
        conn.execute("CALL run_job(%s)", (policy,))
        assert conn.execute(TELEMETRY_1M, (agents, t0)).fetchall() == with_late

        # Older than the policy's 7-day window: stored, never aggregated (until a
        # refresh_continuous_aggregate by hand over that window).
        conn.execute(TELEMETRY_INSERT, (t0 - timedelta(days=10), "agg-1", 1.0, 1.0, 1.0, 1, 1))
        conn.execute("CALL run_job(%s)", (policy,))
        assert conn.execute(TELEMETRY_1M, (agents, t0 - timedelta(days=11))).fetchall() == with_late


def test_telemetry_1m_outlives_the_raw_retention(ts: Timescale) -> None:
    _tsl(ts)
    t0 = datetime(2023, 1, 2, 10, 0, tzinfo=UTC)
    with connect(ts.url, autocommit=True) as conn:
        conn.execute(TELEMETRY_INSERT, (t0, "old-1", 10.0, 20.0, 30.0, 1, 2))
        conn.execute(
            TELEMETRY_INSERT, (t0 + timedelta(seconds=20), "old-1", 30.0, 20.0, 30.0, 3, 4)
        )
        # Materialized when it was recent (the refresh policy covers the last 7 days).
        conn.execute(
            "CALL refresh_continuous_aggregate('telemetry_1m', %s, %s)",
            (t0, t0 + timedelta(days=1)),
        )
        conn.execute("CALL run_job(%s)", (_job(conn, "policy_retention", "telemetry"),))
        raw = conn.execute("SELECT count(*) FROM telemetry WHERE agent_id = 'old-1'").fetchone()
        minutes = conn.execute(TELEMETRY_1M, (["old-1"], t0)).fetchall()
    assert raw == (0,)
    assert minutes == [(t0, "old-1", 20.0, 20.0, 30.0, 4, 6, 2)]


def test_deduplication_into_a_compressed_chunk(ts: Timescale) -> None:
    """docs/storage.md warns about ON CONFLICT into compressed chunks (older than 7 days):
    what this TimescaleDB does with a late duplicate."""
    _tsl(ts)
    t0 = datetime(2024, 1, 10, 12, 0, tzinfo=UTC)
    with connect(ts.url, autocommit=True) as conn:
        conn.cursor().executemany(
            TELEMETRY_INSERT,
            [(t0 + timedelta(minutes=i), "packed-1", float(i), 0.0, 0.0, i, i) for i in range(3)],
        )
        compressed = conn.execute(
            "SELECT compress_chunk(c) FROM show_chunks('telemetry',"
            " newer_than => %s::timestamptz, older_than => %s::timestamptz) c",
            (t0 - timedelta(hours=12), t0 + timedelta(hours=12)),
        ).fetchall()
        assert len(compressed) == 1
        cur = conn.cursor()
        cur.execute(TELEMETRY_INSERT, (t0, "packed-1", 99.0, 9.0, 9.0, 9, 9))
        assert cur.rowcount == 0
        cur.execute(TELEMETRY_INSERT, (t0 + timedelta(minutes=5), "packed-1", 5.0, 0.0, 0.0, 5, 5))
        assert cur.rowcount == 1
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO telemetry (time, agent_id) VALUES (%s, 'packed-1')", (t0,))
        rows = conn.execute(
            "SELECT time, cpu_percent FROM telemetry WHERE agent_id = 'packed-1' ORDER BY time"
        ).fetchall()
    assert rows == [
        (t0, 0.0),
        (t0 + timedelta(minutes=1), 1.0),
        (t0 + timedelta(minutes=2), 2.0),
        (t0 + timedelta(minutes=5), 5.0),
    ]
