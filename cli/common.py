"""What every command shares: one-line errors on stderr, JSON output."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import orjson
import typer

from service.logs import scrub


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: ...` on one line of stderr (secrets scrubbed) and exit non-zero."""
    typer.echo(f"error: {scrub(' '.join(message.split()))}", err=True)
    raise typer.Exit(code)


def emit_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
