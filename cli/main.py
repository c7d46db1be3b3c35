"""The `eucora` command line: one Typer app per command group, composed here."""

from __future__ import annotations

import typer

from cli import bridge, stack
from cli.db import app as db_app
from cli.status import status

app = typer.Typer(
    name="eucora",
    help="EUCORA Agent Plane: operate a fleet of endpoint agents over MQTT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(stack.app, name="stack")
app.add_typer(bridge.app, name="bridge")
app.add_typer(db_app, name="db")
app.command("status")(status)


def main() -> None:
    app()
