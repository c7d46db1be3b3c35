"""`eucora tasks create/list/show/cancel`: commands for agents (docs/tasks.md).

A task is written to the database, never published from here: the bridge's outbox
publishes it (a task created while the bridge or the broker is down goes out when
they are back). Creating and cancelling are the task domain's
(service/domains/tasks.py), which also wakes a running bridge's outbox.

Exit codes: 0 done; 1 the request cannot be done (unknown task or agent, no agent
matches, a terminal task to cancel) or, with --wait, a task ended other than
COMPLETED; 2 usage or configuration error; 3 --wait-timeout passed first.
"""

from __future__ import annotations

import getpass
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import psycopg
import typer

from cli.common import (
    EXIT_NOT_OK,
    EXIT_WAIT_TIMEOUT,
    check_target,
    count_more,
    emit_json,
    fail,
    in_transaction,
    iso,
    more_not_shown,
    open_database,
    parse_duration,
    parse_tag,
)
from cli.db import DATABASE_URL_OPTION
from schemas.constants import TASK_DEFAULT_EXPIRES_IN_S, TASK_DEFAULT_TIMEOUT_S, TASK_MAX_TIMEOUT_S
from schemas.payloads import TaskCommand, check_task_payload
from schemas.states import TERMINAL, Platform, TaskStatus, TaskType
from schemas.validate import PayloadError, dump
from service.domains import tasks

if TYPE_CHECKING:
    from service.db.models import TaskDetailPublic

app = typer.Typer(
    help="Tasks: commands for agents, their lifecycle and history.", no_args_is_help=True
)

WAIT_POLL_S = 0.5


JsonFlag = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]
# Lifecycle order, for counts and tables.
ORDER = list(TaskStatus)


def _task_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        fail(f"{value!r} is not a task id (a UUID)", EXIT_NOT_OK)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _check_payload(text: str, type_: TaskType, timeout: int, correlation_id: str) -> dict[str, Any]:
    """The payload as a JSON object, checked against the task schema (and its size limit)
    now, so the bridge never holds a task it cannot publish."""
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        fail(f"--payload is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        fail('--payload must be a JSON object, e.g. \'{"command": ["true"]}\'')
    try:  # the type's payload schema (schemas/task-payload-<type>.schema.json)
        check_task_payload(type_, payload)
    except ValueError as exc:
        fail(f"--payload: {exc}")
    now = datetime.now(UTC).isoformat()
    try:
        dump(
            TaskCommand.model_validate(
                {
                    "task_id": str(uuid.uuid4()),
                    "type": type_.value,
                    "payload": payload,
                    "timeout_seconds": timeout,
                    "expires_at": now,
                    "correlation_id": correlation_id,
                    "created_at": now,
                    "attempt": 1,
                },
                strict=False,
            )
        )
    except (PayloadError, ValueError) as exc:
        fail(f"the task would not be valid: {' '.join(str(exc).split())[:300]}")
    return payload


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


@app.command()
def create(
    type_: Annotated[
        TaskType, typer.Option("--type", case_sensitive=False, help="what the agent does")
    ],
    agent: Annotated[
        list[str] | None, typer.Option("--agent", help="an agent id (repeatable)")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="k=v in the tags or labels (repeatable: all)")
    ] = None,
    platform: Annotated[
        Platform | None, typer.Option(help="agents of this platform (with --tag: both)")
    ] = None,
    payload: Annotated[
        str, typer.Option(help='type-specific JSON object, e.g. \'{"command": ["true"]}\'')
    ] = "{}",
    timeout: Annotated[
        int,
        typer.Option(
            min=1, max=TASK_MAX_TIMEOUT_S, help="seconds it may run once started, then TIMEOUT"
        ),
    ] = TASK_DEFAULT_TIMEOUT_S,
    expires_in: Annotated[
        float,
        typer.Option(min=1, help="seconds it may wait for delivery, then EXPIRED"),
    ] = TASK_DEFAULT_EXPIRES_IN_S,
    correlation_id: Annotated[
        str | None,
        typer.Option(help="shared by every task of this command (default: a new UUID)"),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="follow the tasks until they finish")
    ] = False,
    wait_timeout: Annotated[
        float | None, typer.Option(min=0, help="with --wait: give up after this many seconds")
    ] = None,
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """Create a task for one agent, or for every agent matching --tag/--platform."""
    check_target(agent, tag, platform)
    tags = dict(parse_tag(t) for t in tag or [])
    correlation_id = correlation_id or str(uuid.uuid4())
    if not 1 <= len(correlation_id) <= 128:
        fail("--correlation-id must be 1 to 128 characters")
    body = _check_payload(payload, type_, timeout, correlation_id)

    async def create_all(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
        made = await tasks.create_tasks(
            conn,
            type_=type_,
            payload=body,
            agents=sorted(set(agent)) if agent else None,
            tags=tags,
            platform=platform,
            timeout=timeout,
            expires_in=expires_in,
            correlation_id=correlation_id,
            created_by=_user(),
        )
        missing = sorted(set(agent or []) - {m["agent_id"] for m in made})
        if missing:
            raise tasks.TaskError(f"unknown agent(s): {', '.join(missing)}; no task created")
        if not made:
            raise tasks.TaskError("no agent matches; no task created")
        return made

    try:
        made = in_transaction(database_url, create_all)
    except tasks.TaskError as exc:
        fail(str(exc), EXIT_NOT_OK)
    if not json_output:
        # First, and with --wait too: the id to find these tasks in the logs and events.
        typer.echo(f"created {len(made)} task(s), correlation id {correlation_id}")
    if wait:
        with open_database(database_url) as conn:
            _wait(conn, made, wait_timeout, json_output)
        return
    if json_output:
        emit_json(made)
        return
    typer.echo(
        _table(
            ["TASK", "AGENT", "STATUS"], [[m["task_id"], m["agent_id"], m["status"]] for m in made]
        )
    )


def _summary(counts: Counter[str], total: int) -> str:
    done = sum(counts[s] for s in TERMINAL)
    parts = [f"{s.value} {counts[s]}" for s in ORDER if counts[s]]
    return f"{done}/{total} finished: " + ", ".join(parts)


def _wait(
    conn: psycopg.Connection[Any],
    made: list[dict[str, Any]],
    wait_timeout: float | None,
    json_output: bool,
) -> None:
    """Follow until every task is terminal; the progress line goes to stderr so that
    --json keeps stdout to one document."""
    from service.db.models import TaskProgressPublic, model_row

    ids = [uuid.UUID(m["task_id"]) for m in made]
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    tty = sys.stderr.isatty()
    last = ""
    cur = conn.cursor(row_factory=model_row(TaskProgressPublic))
    while True:
        rows = cur.execute(
            "SELECT task_id, agent_id, status, progress, error, correlation_id FROM tasks"
            " WHERE task_id = ANY(%s) ORDER BY agent_id",
            (ids,),
        ).fetchall()
        conn.commit()  # a fresh snapshot each round
        counts = Counter(r.status for r in rows)
        line = _summary(counts, len(ids))
        if line != last:
            sys.stderr.write(("\r\033[K" if tty else "") + line + ("" if tty else "\n"))
            sys.stderr.flush()
            last = line
        finished = all(r.status in TERMINAL for r in rows)
        timed_out = deadline is not None and time.monotonic() >= deadline
        if finished or timed_out:
            break
        time.sleep(WAIT_POLL_S)
    if tty:
        sys.stderr.write("\n")
    if json_output:
        emit_json([r.model_dump(mode="json") for r in rows])
    else:
        typer.echo(
            _table(
                ["TASK", "AGENT", "STATUS", "ERROR"],
                [[str(r.task_id), r.agent_id, r.status, (r.error or "")[:60]] for r in rows],
            )
        )
    if not finished:
        typer.echo(f"error: not finished after {wait_timeout:g} s", err=True)
        raise typer.Exit(EXIT_WAIT_TIMEOUT)
    if any(r.status != TaskStatus.COMPLETED for r in rows):
        raise typer.Exit(EXIT_NOT_OK)


@app.command("list")
def list_tasks(
    agent: Annotated[str | None, typer.Option(help="only this agent's tasks")] = None,
    status: Annotated[
        list[TaskStatus] | None,
        typer.Option(case_sensitive=False, help="only these states (repeatable)"),
    ] = None,
    type_: Annotated[
        TaskType | None, typer.Option("--type", case_sensitive=False, help="only this type")
    ] = None,
    correlation_id: Annotated[
        str | None, typer.Option(help="only the tasks of one create command")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="only tasks created this recently: 30m, 1h, 7d...")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="newest first, at most this many")] = 100,
    after: Annotated[
        str | None,
        typer.Option(help="the next page: the tasks listed after this task id (older ones)"),
    ] = None,
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """List tasks, newest first, a page at a time (--limit, --after)."""
    where = ["true"]
    if since is not None:
        where.append("created_at >= now() - %(since)s")
    if agent is not None:
        where.append("agent_id = %(agent)s")
    if status:
        where.append("status = ANY(%(status)s)")
    if type_ is not None:
        where.append("type = %(type)s")
    if correlation_id is not None:
        where.append("correlation_id = %(correlation_id)s")
    params = {
        "agent": agent,
        "status": [s.value for s in status or []],
        "type": type_.value if type_ is not None else None,
        "correlation_id": correlation_id,
        "since": parse_duration(since, "--since") if since is not None else None,
        "limit": limit + 1,  # one more tells whether there is a next page
        "after": _task_id(after) if after is not None else None,
    }
    from service.db.models import TaskPublic, model_row

    # Keyset paging in (created_at, task_id) order, newest first: the index
    # tasks_created_id_idx (migration 0008) serves it at any depth. A task id alone
    # would not do: ids are random, and the newest come first.
    matches = " AND ".join(where)
    page = (
        "(created_at, task_id) < (SELECT created_at, task_id FROM tasks WHERE task_id = %(after)s)"
    )
    with open_database(database_url, autocommit=True) as conn:
        if after is not None:
            found = conn.execute("SELECT 1 FROM tasks WHERE task_id = %(after)s", params)
            if found.fetchone() is None:
                fail(f"--after: task {after} not found", EXIT_NOT_OK)
        rows = (
            conn.cursor(row_factory=model_row(TaskPublic))
            .execute(
                "SELECT task_id, agent_id, type, status, progress, attempts, correlation_id,"
                " created_at, updated_at, finished_at FROM tasks"
                f" WHERE {matches}{' AND ' + page if after is not None else ''}"
                " ORDER BY created_at DESC, task_id DESC LIMIT %(limit)s",
                params,
            )
            .fetchall()
        )
        more: str | None = None
        if len(rows) > limit:
            rows = rows[:limit]
            if not json_output:
                more = count_more(
                    conn,
                    f"SELECT 1 FROM tasks WHERE {matches} AND {page}",
                    params | {"after": rows[-1].task_id},
                )
    if json_output:
        emit_json([r.model_dump(mode="json") for r in rows])
        return
    if not rows:
        typer.echo("no tasks match")
        return
    typer.echo(
        _table(
            ["TASK", "AGENT", "TYPE", "STATUS", "PROGRESS", "ATTEMPTS", "CREATED"],
            [
                [
                    str(r.task_id),
                    r.agent_id,
                    r.type,
                    r.status,
                    "-" if r.progress is None else f"{r.progress}%",
                    str(r.attempts),
                    (iso(r.created_at) or "")[:19],
                ]
                for r in rows
            ],
        )
    )
    if more is not None:
        more_not_shown(more, str(rows[-1].task_id))


def task_document(conn: psycopg.Connection[Any], task_id: uuid.UUID) -> TaskDetailPublic | None:
    from service.db.models import TaskDetailPublic, TaskDetailRow, TaskEventPublic, model_row

    task = (
        conn.cursor(row_factory=model_row(TaskDetailRow))
        .execute(
            "SELECT task_id, agent_id, type, status, progress, attempts, correlation_id,"
            " created_at, finished_at, payload, result, error, timeout_seconds, expires_at,"
            " created_by, published_at, assigned_at, started_at, cancel_requested,"
            " deployment_id, next_publish_at IS NOT NULL AS owed FROM tasks WHERE task_id = %s",
            (task_id,),
        )
        .fetchone()
    )
    if task is None:
        return None
    # Every event, including reports that changed nothing (accepted false + reason).
    events = (
        conn.cursor(row_factory=model_row(TaskEventPublic))
        .execute(
            "SELECT time AS ts, status, previous_status, source, correlation_id, progress,"
            " accepted, reason, detail FROM task_events WHERE task_id = %s ORDER BY time, status",
            (task_id,),
        )
        .fetchall()
    )
    return TaskDetailPublic(**dict(task), events=events)


@app.command()
def show(
    task_id: Annotated[str, typer.Argument(help="the task's id")],
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """One task: its state, result and every event (time, status, source, correlation id)."""
    tid = _task_id(task_id)
    with open_database(database_url) as conn:
        doc = task_document(conn, tid)
    if doc is None:
        fail(f"no task {task_id}", EXIT_NOT_OK)
    shown = doc.model_dump(mode="json")
    if json_output:
        emit_json(shown)
        return
    fields = [
        "task_id", "agent_id", "type", "status", "progress", "attempts", "correlation_id",
        "timeout_seconds", "expires_at", "created_at", "created_by", "published_at",
        "assigned_at", "started_at", "finished_at", "error",
    ]  # fmt: skip
    for f in fields:
        value = shown[f]
        typer.echo(f"{f + ':':17} {'-' if value is None else value}")
    typer.echo(f"{'payload:':17} {orjson.dumps(doc.payload).decode()}")
    if doc.result is not None:
        typer.echo(f"{'result:':17} {orjson.dumps(doc.result).decode()[:2000]}")
    typer.echo("")
    typer.echo(
        _table(
            ["TIME", "STATUS", "FROM", "SOURCE", "ACCEPTED", "REASON"],
            [
                [
                    (iso(e.ts) or "")[:23],
                    e.status,
                    e.previous_status or "-",
                    e.source,
                    "yes" if e.accepted else "no",
                    e.reason or "",
                ]
                for e in doc.events
            ],
        )
    )


def _cancelled_doc(c: tasks.Cancelled) -> dict[str, Any]:
    return {
        "task_id": str(c.task_id),
        "agent_id": c.agent_id,
        "status": TaskStatus.CANCELLED.value,
        "previous_status": c.previous,
        "agent_told": c.agent_told,
    }


@app.command()
def cancel(
    task_id: Annotated[str | None, typer.Argument(help="the task's id")] = None,
    correlation_id: Annotated[
        str | None,
        typer.Option(help="instead of one task: every unfinished task of one create command"),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="also cancel a task the agent already started")
    ] = False,
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """Cancel a task (or a whole command with --correlation-id): PENDING or ASSIGNED at
    once, IN_PROGRESS only with --force.

    An agent that may have the task (it was published) is sent {"cancel": task_id}
    through the outbox: it never starts it, or stops it."""
    if (task_id is None) == (correlation_id is None):
        fail("give a task id or --correlation-id X (one of them)")
    if correlation_id is not None:
        cid = correlation_id

        async def do_all(
            conn: psycopg.AsyncConnection[Any],
        ) -> tuple[list[tasks.Cancelled], list[str]]:
            return await tasks.cancel_command(conn, cid, force=force, by=_user())

        done_all, refused = in_transaction(database_url, do_all)
        for why in refused:
            typer.echo(f"not cancelled: {why}", err=True)
        if json_output:
            emit_json([_cancelled_doc(c) for c in done_all])
        else:
            typer.echo(f"cancelled {len(done_all)} task(s) of command {cid}")
        if not done_all:
            fail(f"no unfinished task of command {cid} was cancelled", EXIT_NOT_OK)
        return
    assert task_id is not None
    tid = _task_id(task_id)

    async def do(conn: psycopg.AsyncConnection[Any]) -> tasks.Cancelled:
        return await tasks.cancel_task(conn, tid, force=force, by=_user())

    try:
        done = in_transaction(database_url, do)
    except tasks.TaskError as exc:
        fail(str(exc), EXIT_NOT_OK)
    if json_output:
        emit_json(_cancelled_doc(done))
        return
    tell, status = done.agent_told, done.previous
    told = "; the agent is told to stop" if tell else " (it was never sent to the agent)"
    typer.echo(f"task {tid} cancelled (was {status}){told}")
