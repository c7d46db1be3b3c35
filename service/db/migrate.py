"""Versioned schema migrations, applied by `eucora db upgrade`.

Why a hand-written runner rather than Alembic: the schema is raw PostgreSQL DDL whose
time-series half differs with the TimescaleDB extension (hypertables, compression,
retention, continuous aggregates) and is replaced by plain tables, BRIN indexes and a
`time_bucket` fallback without it. Alembic would reduce to `op.execute(<raw SQL>)`
plus branching, while adding a second model of the schema, a Python env script and
its own version table. Here a migration is plain SQL a DBA can read and run with
psql, and the runner is ~200 lines: ordering, one transaction per migration, an
advisory lock, and the choice of the file variant.

Files in service/db/migrations/, for version NNNN (4 digits, a single name per
version):

    NNNN_name.sql            always applied first (may be absent)
    NNNN_name.plain.sql      then, on plain PostgreSQL
    NNNN_name.timescale.sql  or, with the TimescaleDB extension

All files of one version run in one transaction, recorded in `schema_migrations`
with the mode they were applied in. The mode is chosen once, for the first
migration of a database, and kept for every later one: moving an existing database
to or from TimescaleDB is a data migration, not something an upgrade does behind an
operator's back.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.rows import TupleRow

from service.db.connect import connect

log = logging.getLogger(__name__)

Mode = Literal["postgresql", "timescaledb"]
RequestedMode = Literal["auto", "postgresql", "timescaledb"]

# Arbitrary constant shared by every eucora process: serialises concurrent upgrades.
ADVISORY_LOCK_KEY = 0x6575636F7261  # "eucora"
_FILE_RE = re.compile(
    r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)(?:\.(?P<variant>plain|timescale))?\.sql$"
)

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    mode       text NOT NULL CHECK (mode IN ('postgresql', 'timescaledb')),
    checksum   text NOT NULL
)
"""


class MigrationError(RuntimeError):
    """A migration cannot be applied; the message says why and what to do."""


class SchemaNotCurrent(RuntimeError):
    """The database schema does not match this version of eucora."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    # variant ('common', 'plain', 'timescale') -> SQL text
    parts: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    def scripts(self, mode: Mode) -> list[tuple[str, str]]:
        """(file name, SQL) to run in this mode, common part first."""
        variant = "timescale" if mode == "timescaledb" else "plain"
        return [
            (f"{self.label}{'' if part == 'common' else '.' + part}.sql", self.parts[part])
            for part in ("common", variant)
            if part in self.parts
        ]

    def checksum(self, mode: Mode) -> str:
        text = "\n".join(sql for _, sql in self.scripts(mode))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    mode: Mode


@dataclass(frozen=True)
class TimescaleStatus:
    available: bool  # the server has the extension's files
    installed_version: str | None  # CREATE EXTENSION was run in this database
    preloaded: bool  # in shared_preload_libraries, which the extension requires
    license: str | None  # 'timescale' (TSL: compression, caggs) or 'apache'


def _source() -> Traversable:
    return resources.files("service.db").joinpath("migrations")


def load_migrations(directory: Traversable | Path | None = None) -> list[Migration]:
    """The migrations shipped with eucora (or found in `directory`), by version."""
    root = _source() if directory is None else directory
    found: dict[int, dict[str, str]] = {}
    names: dict[int, str] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        m = _FILE_RE.match(entry.name)
        if not m:
            raise MigrationError(
                f"migration file {entry.name!r} is not named NNNN_name[.plain|.timescale].sql"
            )
        version, name = int(m["version"]), m["name"]
        if names.setdefault(version, name) != name:
            raise MigrationError(
                f"migration version {version:04d} has two names: {names[version]!r}, {name!r}"
            )
        found.setdefault(version, {})[m["variant"] or "common"] = entry.read_text("utf-8")
    return [Migration(v, names[v], parts) for v, parts in sorted(found.items())]


def latest_version(migrations: Sequence[Migration] | None = None) -> int:
    migrations = load_migrations() if migrations is None else migrations
    return migrations[-1].version if migrations else 0


# -- introspection ---------------------------------------------------------------------

_APPLIED_SQL = "SELECT version, mode FROM schema_migrations ORDER BY version"
_HAS_TABLE_SQL = "SELECT to_regclass('schema_migrations') IS NOT NULL"


def _applied(conn: psycopg.Connection[Any]) -> dict[int, Mode]:
    row = conn.execute(_HAS_TABLE_SQL).fetchone()
    if not row or not row[0]:
        return {}
    return {version: mode for version, mode in conn.execute(_APPLIED_SQL).fetchall()}


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The highest applied migration, 0 for a database eucora never touched."""
    return max(_applied(conn), default=0)


def pending(
    conn: psycopg.Connection[Any], migrations: Sequence[Migration] | None = None
) -> list[Migration]:
    """Known migrations not applied yet, in the order they will run."""
    migrations = load_migrations() if migrations is None else migrations
    done = _applied(conn)
    return [m for m in migrations if m.version not in done]


def timescaledb_status(conn: psycopg.Connection[Any]) -> TimescaleStatus:
    row = conn.execute(
        """
        SELECT
            EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
            (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'),
            -- shared_preload_libraries is hidden from non-superusers; a preloaded
            -- TimescaleDB also shows through its loader's settings, which anyone can
            -- read (timescaledb.license only exists once the extension is created
            -- in this database, so it cannot tell before the first upgrade).
            EXISTS (SELECT 1 FROM pg_settings
                    WHERE (name = 'shared_preload_libraries' AND setting ~ 'timescaledb')
                       OR name IN ('timescaledb.disable_load', 'timescaledb.license')),
            current_setting('timescaledb.license', true)
        """
    ).fetchone()
    assert row is not None
    return TimescaleStatus(
        available=bool(row[0]),
        installed_version=row[1],
        preloaded=bool(row[2]),
        license=row[3] or None,
    )


_EXTENSION_VERSION = "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"


def database_mode(conn: psycopg.Connection[Any]) -> str:
    """'timescaledb <version>' when the extension is installed here, else 'postgresql'."""
    row = conn.execute(_EXTENSION_VERSION).fetchone()
    return f"timescaledb {row[0]}" if row else "postgresql"


async def uses_timescaledb(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether this database has the extension (its TimescaleDB mode), for work that
    only that mode needs."""
    return await (await conn.execute(_EXTENSION_VERSION)).fetchone() is not None


def _not_current_message(version: int, waiting: int, latest: int) -> str | None:
    if version > latest:
        return (
            f"database schema is at version {version}, newer than this eucora "
            f"(which knows up to {latest}): upgrade eucora"
        )
    if waiting:
        return (
            f"database schema is at version {version}, this eucora needs {latest}"
            f" ({waiting} pending): run `eucora db upgrade`"
        )
    return None


def require_current(conn: psycopg.Connection[Any]) -> int:
    """Raise SchemaNotCurrent unless every known migration is applied; return the version."""
    migrations = load_migrations()
    done = _applied(conn)
    version = max(done, default=0)
    waiting = sum(1 for m in migrations if m.version not in done)
    message = _not_current_message(version, waiting, latest_version(migrations))
    if message:
        raise SchemaNotCurrent(message)
    return version


async def require_current_async(conn: psycopg.AsyncConnection[Any]) -> int:
    """require_current() for the bridge's async connections."""
    migrations = load_migrations()
    cur = await conn.execute(_HAS_TABLE_SQL)
    row = await cur.fetchone()
    done: set[int] = set()
    if row and row[0]:
        cur = await conn.execute(_APPLIED_SQL)
        done = {version for version, _ in await cur.fetchall()}
    version = max(done, default=0)
    waiting = sum(1 for m in migrations if m.version not in done)
    message = _not_current_message(version, waiting, latest_version(migrations))
    if message:
        raise SchemaNotCurrent(message)
    return version


# -- upgrade -----------------------------------------------------------------------------


def _choose_mode(
    conn: psycopg.Connection[TupleRow], requested: RequestedMode, done: dict[int, Mode]
) -> Mode:
    """The mode of this database, installing TimescaleDB when it is possible and wanted."""
    ts = timescaledb_status(conn)
    if done:
        recorded: Mode = "timescaledb" if "timescaledb" in done.values() else "postgresql"
        if requested != "auto" and requested != recorded:
            raise MigrationError(
                f"the schema was created for {recorded}; it cannot be upgraded as {requested}"
            )
        if recorded == "timescaledb" and ts.installed_version is None:
            raise MigrationError(
                "the schema was created with TimescaleDB but the extension is not "
                "installed in this database"
            )
        return recorded

    if requested == "postgresql":
        if ts.installed_version is not None:
            raise MigrationError(
                "TimescaleDB is installed in this database: the plain PostgreSQL schema "
                "would clash with its functions (use --mode auto)"
            )
        return "postgresql"
    if ts.installed_version is not None:
        return "timescaledb"

    def fallback(reason: str, level: int = logging.WARNING) -> Mode:
        if requested == "timescaledb":
            raise MigrationError(reason)
        log.log(level, "%s; creating the plain PostgreSQL schema", reason)
        return "postgresql"

    if not ts.available:
        # The ordinary plain PostgreSQL case: nothing to warn about.
        return fallback("the TimescaleDB extension is not available", logging.INFO)
    if not ts.preloaded:
        return fallback(
            "TimescaleDB is installed on the server but not preloaded (add it to "
            "shared_preload_libraries and restart PostgreSQL to use it)"
        )
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:
        return fallback(f"CREATE EXTENSION timescaledb failed: {exc.diag.message_primary or exc}")
    log.info("TimescaleDB extension created")
    return "timescaledb"


def _forward_notice(diag: psycopg.errors.Diagnostic) -> None:
    # Migrations RAISE WARNING when they skip a feature (e.g. compression on an
    # Apache-only TimescaleDB); operators should see that.
    level = logging.WARNING if diag.severity_nonlocalized == "WARNING" else logging.DEBUG
    log.log(level, "%s", diag.message_primary)


def _apply(conn: psycopg.Connection[TupleRow], migration: Migration, mode: Mode) -> None:
    """Run one migration and record it, all or nothing."""
    current = (migration.label, "")  # the file being run, to locate an error
    try:
        with conn.transaction():
            for current in migration.scripts(mode):  # read by the handler below
                conn.execute(current[1].encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name, mode, checksum)"
                " VALUES (%s, %s, %s, %s)",
                (migration.version, migration.name, mode, migration.checksum(mode)),
            )
    except psycopg.Error as exc:
        where, sql = current
        position = exc.diag.statement_position
        if position and position.isdigit():
            where += f" line {sql[: int(position)].count(chr(10)) + 1}"
        raise MigrationError(
            f"migration {migration.label} failed and was rolled back: "
            f"{exc.diag.message_primary or exc} ({where})"
        ) from exc


def upgrade_connection(
    conn: psycopg.Connection[TupleRow],
    *,
    mode: RequestedMode = "auto",
    migrations: Sequence[Migration] | None = None,
    on_applied: Callable[[AppliedMigration], None] | None = None,
) -> list[AppliedMigration]:
    """upgrade() on an open autocommit connection."""
    migrations = load_migrations() if migrations is None else migrations
    if not conn.autocommit:
        raise ValueError("upgrade_connection needs an autocommit connection")
    conn.add_notice_handler(_forward_notice)
    # A session lock, since each migration commits on its own. A second upgrader
    # waits here, then finds nothing left to do.
    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,)).fetchone()
    if not got or not got[0]:
        log.info("another upgrade is running; waiting for it")
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
    try:
        conn.execute(_CREATE_TABLE)
        done = _applied(conn)
        todo = [m for m in migrations if m.version not in done]
        newest = max(done, default=0)
        if newest > latest_version(migrations):
            raise MigrationError(
                f"database schema is at version {newest}, newer than this eucora "
                f"(which knows up to {latest_version(migrations)}): upgrade eucora"
            )
        if not todo:
            return []
        chosen = _choose_mode(conn, mode, done)
        applied: list[AppliedMigration] = []
        for migration in todo:
            _apply(conn, migration, chosen)
            result = AppliedMigration(migration.version, migration.name, chosen)
            log.info("applied migration %s (%s)", migration.label, chosen)
            applied.append(result)
            if on_applied:
                on_applied(result)
        return applied
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))


def upgrade(
    url: str,
    *,
    mode: RequestedMode = "auto",
    migrations: Sequence[Migration] | None = None,
    on_applied: Callable[[AppliedMigration], None] | None = None,
) -> list[AppliedMigration]:
    """Apply every pending migration, each in its own transaction; return those applied.

    Safe to run concurrently and repeatedly: a session advisory lock serialises
    upgraders and an up-to-date database gets an empty list. `mode="auto"` uses
    TimescaleDB when the server can load it and plain PostgreSQL otherwise.
    Raises DatabaseUnavailable (cannot connect) or MigrationError.
    """
    with connect(url, autocommit=True, application_name="eucora-db-upgrade") as conn:
        return upgrade_connection(conn, mode=mode, migrations=migrations, on_applied=on_applied)
