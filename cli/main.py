"""The `eucora` command line: one Typer app per command group, composed here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="eucora",
    help="EUCORA Agent Plane: operate a fleet of endpoint agents over MQTT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def main() -> None:
    app()
