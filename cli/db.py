"""`eucora db ...`: schema migrations.

Exit codes (cli/common.py): 0 done; 1 a migration failed (rolled back); 2 configuration
error; 4 the database cannot be reached. Errors are one line on stderr, never with a
password.
"""

from __future__ import annotations

import logging
import sys
from enum import StrEnum

import orjson
import typer

from cli.common import EXIT_NOT_OK, EXIT_UNREACHABLE, EXIT_USAGE, require_url
from schemas.config import redact_url
from service.db import migrate
from service.db.connect import DatabaseUnavailable, connect
from service.logs import scrub

app = typer.Typer(
    name="db",
    help="Database schema: versioned migrations.",
    no_args_is_help=True,
    add_completion=False,
)

EXIT_FAILED = EXIT_NOT_OK
EXIT_CONFIG = EXIT_USAGE

DATABASE_URL_OPTION = typer.Option(
    None,
    "--database-url",
    envvar="EUCORA_DATABASE_URL",
    help="postgresql://user:password@host:port/dbname [env: EUCORA_DATABASE_URL]",
    show_envvar=False,
)


@app.callback()
def _group() -> None:
    """Database schema: versioned migrations."""
    # A callback keeps `db` a group (`eucora db upgrade`) even with a single command.


class ModeChoice(StrEnum):
    auto = "auto"
    postgresql = "postgresql"
    timescaledb = "timescaledb"


def fail(message: str, code: int) -> typer.Exit:
    """Print one scrubbed line on stderr; raise the returned Exit."""
    first = scrub(message).strip().splitlines() or ["unknown error"]
    typer.echo(f"error: {first[0]}", err=True)
    return typer.Exit(code)


class _StderrNotices(logging.Handler):
    """Shows the runner's warnings (e.g. TimescaleDB present but not preloaded) to the
    operator as plain lines, unless logging was configured to do something else."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"{record.levelname.lower()}: {scrub(record.getMessage())}\n")


def _show_runner_warnings() -> None:
    if not logging.getLogger().handlers:
        logger = logging.getLogger("service.db")
        if not any(isinstance(h, _StderrNotices) for h in logger.handlers):
            handler = _StderrNotices(logging.WARNING)
            logger.addHandler(handler)


@app.command()
def upgrade(
    database_url: str | None = DATABASE_URL_OPTION,
    mode: ModeChoice = typer.Option(
        ModeChoice.auto,
        "--mode",
        help="auto: TimescaleDB when the server can load it. Only used for a new database.",
    ),
    json_output: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Apply pending schema migrations (safe to run repeatedly and concurrently)."""
    url = require_url(database_url)
    _show_runner_warnings()
    try:
        applied = migrate.upgrade(
            url,
            mode=mode.value,
            on_applied=None
            if json_output
            else lambda m: typer.echo(f"applied {m.version:04d}_{m.name} ({m.mode})"),
        )
        with connect(url) as conn:
            version = migrate.current_version(conn)
            db_mode = migrate.database_mode(conn)
    except DatabaseUnavailable as exc:
        raise fail(str(exc), EXIT_UNREACHABLE) from None
    except migrate.MigrationError as exc:
        raise fail(str(exc), EXIT_FAILED) from None

    if json_output:
        doc = {
            "database_url": redact_url(url),
            "mode": db_mode,
            "schema_version": version,
            "applied": [{"version": m.version, "name": m.name, "mode": m.mode} for m in applied],
        }
        typer.echo(orjson.dumps(doc).decode())
    elif applied:
        typer.echo(f"database is now at version {version} ({db_mode})")
    else:
        typer.echo(f"database is up to date at version {version} ({db_mode})")
