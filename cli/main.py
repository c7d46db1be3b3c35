"""The `eucora` command line: one Typer app per command group, composed here."""

from __future__ import annotations

import typer

from cli import access, agent, agents, bridge, deployments, events, stack, tasks, telemetry
from cli.common import EXIT_UNREACHABLE
from cli.db import app as db_app
from cli.simulate import simulate
from cli.status import status
from schemas.version import product_version

app = typer.Typer(
    name="eucora",
    help="EUCORA Agent Plane: operate a fleet of endpoint agents over MQTT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"eucora {product_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """EUCORA Agent Plane: operate a fleet of endpoint agents over MQTT."""


agents.app.command("provision")(access.provision)
agents.app.command("revoke")(access.revoke)
agents.app.command("delete")(access.delete)

app.add_typer(stack.app, name="stack")
app.add_typer(bridge.app, name="bridge")
app.add_typer(db_app, name="db")
app.command("status")(status)
app.add_typer(agents.app, name="agents")
app.add_typer(tasks.app, name="tasks")
app.add_typer(telemetry.app, name="telemetry")
app.add_typer(deployments.app, name="deployments")
app.add_typer(events.app, name="events")
app.add_typer(agent.app, name="agent")
app.command("simulate")(simulate)


def main() -> None:
    try:
        app()
    except Exception as exc:
        lost = _database_failure(exc)
        if lost is None:
            raise
        typer.echo(f"error: {lost}", err=True)
        raise SystemExit(EXIT_UNREACHABLE) from None


def _database_failure(exc: Exception) -> str | None:
    """One line for a database that went away in the middle of a command (its
    connection was checked when the command started): the same exit code as a
    database that cannot be reached at all."""
    import psycopg

    from service.db.connect import connection_error_reason

    if not isinstance(exc, psycopg.OperationalError):
        return None
    return f"lost the database in the middle of the command: {connection_error_reason(exc)}"
