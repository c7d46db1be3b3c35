"""`eucora status`: what the control plane's parts look like from here.

The report is a list of sections; each is a function that never raises and returns
what it found. Broker and bridge sections are added by appending to SECTIONS:

    def broker_section(ctx: StatusContext) -> SectionReport: ...
    SECTIONS.append(("broker", broker_section))

Exit code: 0 when every section is healthy, 1 otherwise (the report is printed
either way, so scripts can read the details from --json).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
import typer

from cli.db import DATABASE_URL_OPTION
from schemas.config import ConfigError, redact_url
from service.config import check_database_url
from service.db import migrate
from service.db.connect import DatabaseUnavailable, connect

# How long status waits for each service: it must answer quickly when one is down.
STATUS_TIMEOUT_S = 3


@dataclass(frozen=True)
class StatusContext:
    """What sections may use: resolved options and the environment for the rest."""

    database_url: str | None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    timeout_s: int = STATUS_TIMEOUT_S


@dataclass
class SectionReport:
    data: dict[str, Any]  # the section's object in --json
    healthy: bool
    lines: list[tuple[str, str]]  # (label, value) rows for the readable output


SectionFn = Callable[[StatusContext], SectionReport]


def database_section(ctx: StatusContext) -> SectionReport:
    data: dict[str, Any] = {
        "url": redact_url(ctx.database_url) if ctx.database_url else None,
        "reachable": False,
        "mode": None,
        "schema_version": None,
        "latest_version": migrate.latest_version(),
        "pending": None,
        "error": None,
    }
    try:
        if not ctx.database_url:
            raise ConfigError("EUCORA_DATABASE_URL is not set")
        check_database_url(ctx.database_url)
        with connect(ctx.database_url, connect_timeout=ctx.timeout_s) as conn:
            data["reachable"] = True
            data["mode"] = migrate.database_mode(conn)
            data["schema_version"] = migrate.current_version(conn)
            data["pending"] = len(migrate.pending(conn))
    except (ConfigError, DatabaseUnavailable) as exc:
        data["error"] = str(exc)
    except psycopg.Error as exc:  # reachable, but e.g. no permission to read the schema
        data["error"] = str(exc.diag.message_primary or exc)

    version, waiting, latest = data["schema_version"], data["pending"], data["latest_version"]
    healthy = data["reachable"] and waiting == 0 and version <= latest
    if not data["reachable"]:
        schema = "-"
    elif waiting:
        schema = f"{version} ({waiting} pending: run `eucora db upgrade`)"
    elif version > latest:
        schema = f"{version} (newer than this eucora, which knows up to {latest})"
    else:
        schema = f"{version} (up to date)"
    lines = [
        ("url", data["url"] or "-"),
        ("reachable", "yes" if data["reachable"] else "no"),
        ("mode", data["mode"] or "-"),
        ("schema version", schema),
    ]
    if data["error"]:
        lines.append(("error", data["error"]))
    return SectionReport(data=data, healthy=bool(healthy), lines=lines)


SECTIONS: list[tuple[str, SectionFn]] = [("database", database_section)]


def collect(ctx: StatusContext) -> dict[str, SectionReport]:
    return {name: fn(ctx) for name, fn in SECTIONS}


def render(reports: Mapping[str, SectionReport]) -> str:
    out: list[str] = []
    for name, report in reports.items():
        out.append(f"{name}: {'ok' if report.healthy else 'NOT OK'}")
        width = max((len(label) for label, _ in report.lines), default=0)
        out.extend(f"  {label.ljust(width)}  {value}" for label, value in report.lines)
    return "\n".join(out)


def status(
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Show whether the database is reachable, its mode and schema version."""
    reports = collect(StatusContext(database_url=database_url))
    if json_output:
        typer.echo(orjson.dumps({name: r.data for name, r in reports.items()}).decode())
    else:
        typer.echo(render(reports))
    if not all(r.healthy for r in reports.values()):
        raise typer.Exit(1)


# For tests and for running this command alone; cli/main.py registers `status` itself.
app = typer.Typer(name="status", add_completion=False)
app.command()(status)
