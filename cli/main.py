"""The `eucora` command line: one Typer app per command group, composed here."""

from __future__ import annotations

import typer

from cli import bridge, stack

app = typer.Typer(
    name="eucora",
    help="EUCORA Agent Plane: operate a fleet of endpoint agents over MQTT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(stack.app, name="stack")
app.add_typer(bridge.app, name="bridge")


def main() -> None:
    app()
