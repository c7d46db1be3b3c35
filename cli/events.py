"""`eucora events tail/retention`: the event stream, read from PostgreSQL (docs/events.md).

`tail` starts at the current end of the stream (only new events) unless --after or
--from-start says otherwise, prints what there is and exits, or with --follow keeps
printing until Ctrl-C. Each JSON line carries the event's `cursor`: a reader that
stops resumes with `--after` that cursor, missing nothing and repeating nothing.

Exit codes: 0 done (Ctrl-C ends --follow with 0); 2 usage or configuration error
(a malformed cursor, an unknown kind); 4 the database cannot be reached; 5 the
cursor is older than the events kept (retention deleted events after it).
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import orjson
import typer

from cli.common import EXIT_CURSOR_TOO_OLD, emit_json, fail, iso, open_database
from cli.db import DATABASE_URL_OPTION
from schemas.events import EventKind

app = typer.Typer(help="The event stream: every recorded state change.", no_args_is_help=True)

# --follow: how long to wait before asking again when nothing new was there. A read
# is one indexed query; a NOTIFY per write would cost every writer more.
FOLLOW_POLL_S = 0.05
PAGE = 1000


def _summary(data: dict[str, Any]) -> str:
    """The table's last column: the event's data, compact, on one line."""
    text = orjson.dumps(data).decode()
    return text if len(text) <= 120 else text[:117] + "..."


def _line(event: Any, as_json: bool) -> str:
    if as_json:
        return orjson.dumps(event.document()).decode()
    seq = "" if event.agent_seq is None else str(event.agent_seq)
    return (
        f"{iso(event.ts)}  {event.agent_id or '-':<24} {seq:>6}  {event.kind:<22} "
        f"{_summary(event.data)}"
    )


@app.command("tail")
def tail(
    after: Annotated[
        str | None, typer.Option("--after", help="Start after this cursor (from a JSON line).")
    ] = None,
    from_start: Annotated[
        bool, typer.Option("--from-start", help="Start at the oldest event kept.")
    ] = False,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's events.")] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option("--kind", help="Only events of this kind (repeatable), e.g. task.status."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON event per line (with its cursor).")
    ] = False,
    database_url: str | None = DATABASE_URL_OPTION,
) -> None:
    """Print events (table, or one JSON object per line with --json)."""
    from schemas.topics import is_agent_id
    from service.domains import events

    if after is not None and from_start:
        fail("--after and --from-start cannot be combined")
    if agent is not None and not is_agent_id(agent):
        fail(f"--agent {agent!r} is not a valid agent id")
    known = {k.value for k in EventKind}
    for k in kind or []:
        if k not in known:
            fail(f"--kind {k!r} is not an event kind ({', '.join(sorted(known))})")
    start: events.Position | None = None
    if after is not None:
        try:
            start = events.parse_cursor(after)
        except events.BadCursor as exc:
            fail(f"--after: {exc}")

    conn = open_database(database_url, autocommit=True)
    try:
        if start is None:
            start = (
                events.oldest_cursor_sync(conn) if from_start else events.current_cursor_sync(conn)
            )
        cursor = start
        if not as_json:
            typer.echo(f"{'TS':<32}  {'AGENT':<24} {'SEQ':>6}  {'KIND':<22} DATA")
        while True:
            try:
                page, cursor = events.read_after_sync(
                    conn, cursor, limit=PAGE, agent_id=agent, kinds=kind
                )
            except events.CursorTooOld as exc:
                fail(str(exc), EXIT_CURSOR_TOO_OLD)
            if page:
                sys.stdout.write("".join(_line(e, as_json) + "\n" for e in page))
                sys.stdout.flush()
            if len(page) < PAGE:
                if not follow:
                    break
                time.sleep(FOLLOW_POLL_S)
        if not as_json:
            typer.echo(f"next: --after {cursor}", err=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends --follow: a normal way to stop
    except BrokenPipeError:
        sys.stderr.close()  # `| head`: the reader left; nothing more to say
    finally:
        conn.close()


@app.command("retention")
def retention(
    days: Annotated[
        int | None, typer.Argument(help="Keep events this many days (default 30).", min=1)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    database_url: str | None = DATABASE_URL_OPTION,
) -> None:
    """Show, or set, how many days events are kept (the bridge deletes older ones)."""
    from service.domains import events

    with open_database(database_url) as conn:
        if days is not None:
            events.set_retention_sync(conn, days)
            conn.commit()
        kept = events.retention_days_sync(conn)
        oldest = events.oldest_cursor_sync(conn)
    if as_json:
        emit_json({"days": kept, "oldest_cursor": str(oldest)})
    else:
        typer.echo(f"events are kept {kept} days; the oldest cursor still valid is {oldest}")
