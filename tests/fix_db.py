"""A real PostgreSQL for the tests.

EUCORA_TEST_DATABASE_URL (an account that may CREATE DATABASE) when set; otherwise a
throwaway cluster made with the system's binaries through the same stack code that
`eucora stack up` uses. Each test that asks for `empty_database` gets a database of its
own, dropped afterwards.

The schema has two modes (service/db/migrate.py): plain PostgreSQL, and TimescaleDB
when the server can load the extension (the private cluster preloads it whenever it
is installed). Fixtures that migrate in `auto` mode therefore test whichever mode the
server offers; a test about one mode asks for `db_mode`, which runs it in both and
skips the TimescaleDB run only where the server cannot load the extension
(EUCORA_REQUIRE_TIMESCALEDB=1 turns that skip into a failure).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from service.db import migrate
from service.db.connect import connect
from service.stack.database import Cluster
from service.stack.process import free_port
from tests.fix_services import service_dir

REQUIRE_TIMESCALEDB = os.environ.get("EUCORA_REQUIRE_TIMESCALEDB", "") not in ("", "0")


def with_dbname(url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster | None]:
    """The private test cluster (None when EUCORA_TEST_DATABASE_URL names a server)."""
    if os.environ.get("EUCORA_TEST_DATABASE_URL"):
        yield None
        return
    with service_dir("pg") as root:
        cluster = Cluster(
            root=root / "postgres", port=free_port(), password=uuid.uuid4().hex, durable=False
        )
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop(mode="immediate")


@pytest.fixture(scope="session")
def admin_database_url(pg_cluster: Cluster | None) -> str:
    """URL of a database on a server where the tests may create databases."""
    if pg_cluster is None:
        return os.environ["EUCORA_TEST_DATABASE_URL"]
    return pg_cluster.url_for("postgres")


@contextmanager
def new_database(admin_database_url: str) -> Iterator[str]:
    """A new, empty database on the test server; its URL, dropped afterwards."""
    name = f"eucora_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(admin_database_url, name)
    finally:
        with psycopg.connect(admin_database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def empty_database(admin_database_url: str) -> Iterator[str]:
    """A new, empty database; its URL is yielded and it is dropped afterwards."""
    with new_database(admin_database_url) as url:
        yield url


@pytest.fixture(scope="session")
def timescaledb_missing(admin_database_url: str) -> str | None:
    """Why a new database on this server cannot get TimescaleDB; None when it can."""
    with connect(admin_database_url) as conn:
        ts = migrate.timescaledb_status(conn)
    if not ts.available:
        return "the TimescaleDB extension is not installed on this PostgreSQL server"
    if not ts.preloaded:
        return "TimescaleDB is installed but not in the server's shared_preload_libraries"
    return None


@pytest.fixture(scope="session")
def timescaledb_version(admin_database_url: str, timescaledb_missing: str | None) -> str | None:
    """The TimescaleDB version a new database gets here; None when it gets none."""
    if timescaledb_missing:
        return None
    with connect(admin_database_url) as conn:
        row = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
    assert row is not None
    return str(row[0])


def require_mode(mode: migrate.Mode, timescaledb_missing: str | None) -> None:
    """Skip (or, with EUCORA_REQUIRE_TIMESCALEDB=1, fail) a TimescaleDB-mode test on a
    server that cannot load the extension."""
    if mode == "timescaledb" and timescaledb_missing:
        reason = f"TimescaleDB mode: {timescaledb_missing}"
        if REQUIRE_TIMESCALEDB:
            pytest.fail(f"{reason} (EUCORA_REQUIRE_TIMESCALEDB is set)")
        pytest.skip(reason)


@pytest.fixture(params=["postgresql", "timescaledb"])
def db_mode(request: pytest.FixtureRequest, timescaledb_missing: str | None) -> migrate.Mode:
    """The schema mode a test runs in: each such test runs once per mode."""
    mode: migrate.Mode = request.param
    require_mode(mode, timescaledb_missing)
    return mode


@pytest.fixture
def mode_label(db_mode: migrate.Mode, timescaledb_version: str | None) -> str:
    """What `eucora status` and `eucora db upgrade` call a database of `db_mode`."""
    return f"timescaledb {timescaledb_version}" if db_mode == "timescaledb" else "postgresql"


@pytest.fixture
def database(empty_database: str) -> str:
    """A new database with every migration applied, in the mode the server offers."""
    migrate.upgrade(empty_database)
    return empty_database
