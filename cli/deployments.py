"""`eucora deployments create/list/show/abort/rollback` (docs/deployments.md).

A deployment is written to the database with its fixed target set; the bridge's
rollout engine drives it (rate, in-flight cap, abort threshold). Nothing here
publishes anything.

Exit codes: 0 done; 1 the request cannot be done (unknown deployment, nothing
matches, a state that does not allow it) or, with --wait, a deployment that did not
end COMPLETED; 2 usage or configuration error; 3 --wait-timeout passed first.
"""

from __future__ import annotations

import re
import sys
import time
import uuid
from typing import Annotated, Any

import orjson
import psycopg
import typer

from cli.common import (
    EXIT_NOT_OK,
    EXIT_WAIT_TIMEOUT,
    check_target,
    emit_json,
    fail,
    in_transaction,
    iso,
    parse_tag,
)
from cli.db import DATABASE_URL_OPTION
from cli.tasks import _user
from schemas.constants import DEPLOYMENT_ABORT_MIN_FINISHED, TASK_DEFAULT_EXPIRES_IN_S
from schemas.payloads import TaskCommand, check_task_payload
from schemas.states import DeploymentAgentStatus, DeploymentState, Platform, TaskType
from schemas.validate import PayloadError, dump
from service.domains import deployments
from service.domains.deployments import DeploymentView, Rollout

app = typer.Typer(
    help="Deployments: one software change rolled out to many agents.", no_args_is_help=True
)

WAIT_POLL_S = 0.5

JsonFlag = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def _id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        fail(f"{value!r} is not a deployment id (a UUID)", EXIT_NOT_OK)


def parse_abort_after(text: str) -> tuple[int | None, float | None]:
    """`5` -> abort after 5 failures; `10%` -> after 10% of finished agents failed."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text)
    if m is None:
        fail(f"--abort-after {text!r} must be a count (5) or a percent (10%)")
    number, percent = float(m.group(1)), bool(m.group(2))
    if percent:
        if not 0 < number <= 100:
            fail("--abort-after must be a percent above 0 and at most 100")
        return None, number
    if number != int(number) or number < 1:
        fail("--abort-after must be a whole number of failures, at least 1")
    return int(number), None


def _check_payload(text: str) -> dict[str, Any]:
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        fail(f"--payload is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        fail('--payload must be a JSON object, e.g. \'{"command": ["apt-get", "install", "x"]}\'')
    for reserved in ("deployment_id", "rollback"):
        if reserved in payload:
            fail(f"--payload must not set {reserved!r}: the deployment sets it")
    try:  # the DEPLOY payload schema (schemas/task-payload-deploy.schema.json)
        check_task_payload(TaskType.DEPLOY, payload)
    except ValueError as exc:
        fail(f"--payload: {exc}")
    # The DEPLOY task each agent gets must be valid (size included) with what the
    # deployment adds: checked now, so the bridge never holds one it cannot publish.
    now = "2026-01-01T00:00:00+00:00"
    try:
        dump(
            TaskCommand.model_validate(
                {
                    "task_id": str(uuid.uuid4()),
                    "type": "DEPLOY",
                    "payload": payload | {"deployment_id": str(uuid.uuid4()), "rollback": True},
                    "timeout_seconds": 3600,
                    "expires_at": now,
                    "correlation_id": str(uuid.uuid4()),
                    "created_at": now,
                    "attempt": 1,
                },
                strict=False,
            )
        )
    except (PayloadError, ValueError) as exc:
        fail(f"the DEPLOY task would not be valid: {' '.join(str(exc).split())[:300]}")
    return payload


def _document(view: DeploymentView, *, agents: bool = True) -> dict[str, Any]:
    doc = view.model_dump(mode="json", exclude=set() if agents else {"agents"})
    for key in ("created_at", "started_at", "finished_at"):
        doc[key] = iso(getattr(view, key))
    for target, src in zip(doc.get("agents", []), view.agents, strict=False):
        for key in ("updated_at", "started_at", "finished_at"):
            target[key] = iso(getattr(src, key))
    return doc


def _describe(
    database_url: str | None, deployment_id: uuid.UUID, agents: bool = True
) -> DeploymentView:
    async def read(conn: psycopg.AsyncConnection[Any]) -> DeploymentView | None:
        return await deployments.describe(conn, deployment_id, with_agents=agents)

    view = in_transaction(database_url, read)
    if view is None:
        fail(f"no deployment {deployment_id}", EXIT_NOT_OK)
    return view


def _summary(view: DeploymentView) -> str:
    width = 30
    done = round(view.progress / 100 * width)
    states = ", ".join(f"{s} {n}" for s, n in view.counts.items() if n)
    return (
        f"[{'#' * done}{'-' * (width - done)}] {view.progress:5.1f}% {view.status}:"
        f" {states}; in flight {view.in_flight}"
    )


@app.command()
def create(
    payload: Annotated[
        str,
        typer.Option(
            help='what the agents run, e.g. \'{"command": [...], "rollback_command": [...]}\''
        ),
    ],
    agent: Annotated[
        list[str] | None, typer.Option("--agent", help="an agent id (repeatable)")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="k=v in the tags or labels (repeatable: all)")
    ] = None,
    platform: Annotated[Platform | None, typer.Option(help="agents of this platform")] = None,
    intent_id: Annotated[
        str | None, typer.Option(help="the change-approval record this deployment implements")
    ] = None,
    rate: Annotated[
        int | None,
        typer.Option(min=1, help="agents started per minute at most (default: no limit)"),
    ] = None,
    max_in_flight: Annotated[
        int | None,
        typer.Option(min=1, help="agents started and not finished at most (default: no limit)"),
    ] = None,
    abort_after: Annotated[
        str | None,
        typer.Option(help="abort after N failures, or P% of finished agents failed (e.g. 10%)"),
    ] = None,
    abort_min_finished: Annotated[
        int, typer.Option(min=1, help="a percent applies only once this many agents finished")
    ] = DEPLOYMENT_ABORT_MIN_FINISHED,
    expires_in: Annotated[
        int, typer.Option(min=1, help="seconds a DEPLOY task may wait for an offline agent")
    ] = TASK_DEFAULT_EXPIRES_IN_S,
    wait: Annotated[bool, typer.Option("--wait", help="follow the rollout until it ends")] = False,
    wait_timeout: Annotated[
        float | None, typer.Option(min=0, help="with --wait: give up after this many seconds")
    ] = None,
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """Roll a change out to one agent, or to every agent matching --tag/--platform."""
    check_target(agent, tag, platform)
    if intent_id is not None and not 1 <= len(intent_id) <= 256:
        fail("--intent-id must be 1 to 256 characters")
    tags = dict(parse_tag(t) for t in tag or [])
    body = _check_payload(payload)
    count, percent = parse_abort_after(abort_after) if abort_after else (None, None)
    rollout = Rollout(rate, max_in_flight, count, percent, abort_min_finished, expires_in)

    async def make(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        return await deployments.create(
            conn,
            payload=body,
            agents=sorted(set(agent)) if agent else None,
            tags=tags,
            platform=platform,
            rollout=rollout,
            intent_id=intent_id,
            created_by=_user(),
        )

    try:
        made = in_transaction(database_url, make)
    except deployments.DeploymentError as exc:
        fail(str(exc), EXIT_NOT_OK)
    if wait:
        _wait(database_url, uuid.UUID(made["deployment_id"]), wait_timeout, json_output)
        return
    if json_output:
        emit_json(made)
        return
    typer.echo(
        f"deployment {made['deployment_id']} created ({made['status']}) for"
        f" {made['targets']} agent(s)"
    )


def _wait(
    database_url: str | None,
    deployment_id: uuid.UUID,
    wait_timeout: float | None,
    json_output: bool,
) -> None:
    """Follow until the deployment ended and nobody is at work; the progress bar goes to
    stderr so that --json keeps stdout to one document."""
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    tty = sys.stderr.isatty()
    last = ""
    while True:
        view = _describe(database_url, deployment_id, agents=False)
        line = _summary(view)
        if line != last:
            sys.stderr.write(("\r\033[K" if tty else "") + line + ("" if tty else "\n"))
            sys.stderr.flush()
            last = line
        timed_out = deadline is not None and time.monotonic() >= deadline
        if view.settled or timed_out:
            break
        time.sleep(WAIT_POLL_S)
    if tty:
        sys.stderr.write("\n")
    view = _describe(database_url, deployment_id)
    if json_output:
        emit_json(_document(view))
    else:
        _print(view)
    if not view.settled:
        typer.echo(f"error: not finished after {wait_timeout:g} s", err=True)
        raise typer.Exit(EXIT_WAIT_TIMEOUT)
    if view.status != DeploymentState.COMPLETED:
        raise typer.Exit(EXIT_NOT_OK)


def _print(view: DeploymentView) -> None:
    fields = {
        "deployment_id": view.deployment_id,
        "intent_id": view.intent_id,
        "status": view.status + (f" ({view.status_reason})" if view.status_reason else ""),
        "targets": view.targets,
        "progress": (
            f"{view.progress:g}% finished, {view.in_flight} in flight, {view.failed} failed"
        ),
        "rate": f"{view.rate_per_minute}/min" if view.rate_per_minute else "no limit",
        "max in flight": view.max_in_flight or "no limit",
        "abort after": (
            f"{view.abort_after_count} failures" if view.abort_after_count
            else f"{view.abort_after_percent:g}% of finished (from {view.abort_min_finished})"
            if view.abort_after_percent else "never"
        ),
        "created": f"{iso(view.created_at)} by {view.created_by or '-'}",
    }  # fmt: skip
    for key, value in fields.items():
        typer.echo(f"{key + ':':15} {'-' if value is None else value}")
    typer.echo(f"{'counts:':15} " + ", ".join(f"{s} {n}" for s, n in view.counts.items() if n))
    if view.agents:
        typer.echo("")
        rows = [
            [
                t.agent_id,
                t.status,
                f"{t.progress}%",
                str(t.task_id or "-"),
                t.reason or t.message or "",
            ]
            for t in view.agents
        ]
        headers = ["AGENT", "STATUS", "PROGRESS", "TASK", "NOTE"]
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
        for r in [headers, *rows]:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@app.command("list")
def list_deployments(
    limit: Annotated[int, typer.Option(min=1, help="newest first, at most this many")] = 100,
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """Deployments, newest first, with their counts."""

    async def read(conn: psycopg.AsyncConnection[Any]) -> list[DeploymentView]:
        return await deployments.listing(conn, limit=limit)

    views = in_transaction(database_url, read)
    if json_output:
        emit_json([_document(v, agents=False) for v in views])
        return
    if not views:
        typer.echo("no deployments")
        return
    for v in views:
        typer.echo(f"{v.deployment_id}  {iso(v.created_at)[:19]}  {_summary(v)}")  # type: ignore[index]


@app.command()
def show(
    deployment_id: Annotated[str, typer.Argument(help="the deployment's id")],
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """One deployment: its state, counts per agent state, and every target."""
    view = _describe(database_url, _id(deployment_id))
    if json_output:
        emit_json(_document(view))
        return
    _print(view)


@app.command()
def abort(
    deployment_id: Annotated[str, typer.Argument(help="the deployment's id")],
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """Stop a rollout: nobody new starts, unstarted tasks are CANCELLED (their agents
    SKIPPED), agents already at work finish."""
    did = _id(deployment_id)

    async def do(conn: psycopg.AsyncConnection[Any]) -> str:
        return await deployments.abort(conn, did, by=_user())

    try:
        previous = in_transaction(database_url, do)
    except deployments.DeploymentError as exc:
        fail(str(exc), EXIT_NOT_OK)
    doc = {
        "deployment_id": str(did),
        "status": DeploymentState.ABORTED.value,
        "previous_status": previous,
    }
    if json_output:
        emit_json(doc)
        return
    typer.echo(f"deployment {did} aborted (was {previous})")


@app.command()
def rollback(
    deployment_id: Annotated[str, typer.Argument(help="the deployment's id")],
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """Roll back a finished or aborted deployment: every agent that reported SUCCESS
    gets a DEPLOY task with "rollback": true."""
    did = _id(deployment_id)

    async def do(conn: psycopg.AsyncConnection[Any]) -> int:
        return await deployments.rollback(conn, did, by=_user())

    try:
        n = in_transaction(database_url, do)
    except deployments.DeploymentError as exc:
        fail(str(exc), EXIT_NOT_OK)
    doc = {
        "deployment_id": str(did),
        "status": DeploymentState.ROLLING_BACK.value,
        "agents": n,
        "rollback_of": DeploymentAgentStatus.SUCCESS.value,
    }
    if json_output:
        emit_json(doc)
        return
    typer.echo(f"deployment {did}: rolling back {n} agent(s)")
