"""`eucora stack up/down/status`: the whole product on one machine, in one folder."""

from __future__ import annotations

import os
import signal
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import emit_json, fail
from service.stack import tls
from service.stack.process import StackError, stop_pid
from service.stack.stack import DEFAULT_DIR, Stack

app = typer.Typer(
    help="Start, stop and inspect a local broker + database + bridge.", no_args_is_help=True
)


class EventsTarget(StrEnum):
    none = "none"
    nats = "nats"


DirOption = Annotated[
    Path,
    typer.Option(
        "--dir", envvar="EUCORA_STACK_DIR", help="folder holding the stack's data and state"
    ),
]


@app.command()
def up(
    dir: DirOption = DEFAULT_DIR,
    mqtt_port: Annotated[
        int | None,
        typer.Option(help="agents' port of broker 1 (default 11883); broker i: P + i - 1"),
    ] = None,
    mqtts_port: Annotated[
        int | None, typer.Option(help="broker 1's TLS port (default 18883 beside 11883)")
    ] = None,
    mqtts_cert_port: Annotated[
        int | None,
        typer.Option(
            help="broker 1's port for agents with a client certificate (default 19883 beside 18883)"
        ),
    ] = None,
    service_port: Annotated[
        int | None,
        typer.Option(
            help="bridge and operator port of broker 1 (default: --mqtt-port + 1000); "
            "broker i: this + i - 1"
        ),
    ] = None,
    brokers: Annotated[
        int | None,
        typer.Option(min=1, help="run this many brokers (default 1, or as many as the stack has)"),
    ] = None,
    db_port: Annotated[int | None, typer.Option(help="PostgreSQL port (default 15432)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="bridge metrics port")] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            envvar="EUCORA_DATABASE_URL",
            help="use this database instead of creating a cluster in the folder",
        ),
    ] = None,
    bind: Annotated[
        str | None, typer.Option(help="address the broker listens on (default 127.0.0.1)")
    ] = None,
    foreground: Annotated[
        bool,
        typer.Option("--foreground", help="stay until SIGTERM/Ctrl-C, then stop the stack"),
    ] = False,
    no_bridge: Annotated[
        bool, typer.Option("--no-bridge", help="start broker and database only")
    ] = False,
    tls_name: Annotated[
        list[str] | None,
        typer.Option(
            "--tls-name",
            help="a DNS name or IP address agents dial, added to the brokers' TLS "
            "certificate (repeatable; also EUCORA_TLS_NAMES=a,b; kept by later `up`s)",
        ),
    ] = None,
    events: Annotated[
        EventsTarget | None,
        typer.Option(
            help="forward events: nats (a local nats-server with JetStream), none "
            "(default, or as the stack was)"
        ),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="print one JSON document")] = False,
) -> None:
    """Start broker, database (and migrations) and bridge; print the URLs to use."""
    names = _tls_names([*(tls_name or []), *os.environ.get(TLS_NAMES_ENV, "").split(",")])
    try:
        urls = Stack(dir).up(
            mqtt_port=mqtt_port,
            mqtts_port=mqtts_port,
            mqtts_cert_port=mqtts_cert_port,
            service_port=service_port,
            brokers=brokers,
            bind=bind,
            db_port=db_port,
            metrics_port=metrics_port,
            database_url=database_url,
            bridge=not no_bridge,
            topic_root=os.environ.get("EUCORA_TOPIC_ROOT", "eucora/v1"),
            tls_names=names,
            events=events.value if events else None,
        )
    except (StackError, OSError) as exc:
        fail(str(exc))
    if json:
        emit_json(urls)
    else:
        _print_urls(urls)
    if foreground:
        _wait_then_down(Stack(dir))


TLS_NAMES_ENV = "EUCORA_TLS_NAMES"


def _tls_names(given: list[str]) -> list[str]:
    """--tls-name and EUCORA_TLS_NAMES, checked (one line, exit 2, for a bad one)."""
    names = []
    for name in (n.strip() for n in given):
        if name:
            try:
                names.append(tls.check_name(name))
            except ValueError as exc:
                fail(f"--tls-name / {TLS_NAMES_ENV}: {exc}")
    return names


def _wait_then_down(stack: Stack) -> None:
    """For containers and service managers: the stack lives as long as this process."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(5):
        st = stack.status()
        events_ok = st["events"]["running"] if "events" in st else True
        if not (all(b["running"] for b in st["brokers"]) and st["bridge"]["running"] and events_ok):
            typer.echo("error: a part of the stack stopped; restarting what is down", err=True)
            try:
                stack.up(topic_root=stack.state().get("topic_root", "eucora/v1"))
            except (StackError, OSError) as exc:
                typer.echo(f"error: {exc}", err=True)
    stack.down()


def _print_urls(urls: dict[str, Any]) -> None:
    typer.echo(f"stack is up in {urls['dir']}")
    for url in urls["mqtt_urls"]:
        typer.echo(f"  broker    {url}")
    typer.echo(f"  database  {urls['database_url']}")
    typer.echo(f"  bridge    {urls['metrics_url']}/metrics")
    if "events_url" in urls:
        typer.echo(f"  events    {urls['events_url']}")
    typer.echo("use it with:")
    typer.echo(f"  export EUCORA_MQTT_URL='{urls['mqtt_url']}'")
    typer.echo(f"  export EUCORA_DATABASE_URL='{urls['database_url']}'")
    if "events_url" in urls:
        typer.echo(f"  export EUCORA_EVENTS_URL='{urls['events_url']}'")


@app.command()
def down(dir: DirOption = DEFAULT_DIR) -> None:
    """Stop the bridge, the broker (which saves its store), the NATS server and the database."""
    try:
        stack = Stack(dir)
        # A simulator the demo started in the folder goes first (scripts/demo.sh).
        pidfile = stack.dir / "simulate.pid"
        if pidfile.exists():
            stop_pid(int(pidfile.read_text().split()[0]))
            pidfile.unlink()
        stack.down()
    except (StackError, OSError) as exc:
        fail(str(exc))
    typer.echo("stack stopped")


@app.command()
def status(
    dir: DirOption = DEFAULT_DIR,
    json: Annotated[bool, typer.Option("--json", help="print one JSON document")] = False,
) -> None:
    """Tell which parts of the stack run; exit 1 when any part is down."""
    stack = Stack(dir)
    if not stack.state_file.exists():
        fail(f"no stack in {stack.dir}: run `eucora stack up --dir {dir}`", code=1)
    doc = stack.status()
    if json:
        emit_json(doc)
    else:
        for part in ("broker", "database", "bridge", "events"):
            if part not in doc:
                continue
            info = doc[part]
            state = (
                "external"
                if info.get("external")
                else ("running" if info["running"] else "stopped")
            )
            typer.echo(f"{part:<9} {state:<8} pid {info.get('pid') or '-'}")
        if len(doc["brokers"]) > 1:
            for i, b in enumerate(doc["brokers"], 1):
                state = "running" if b["running"] else "stopped"
                agents = "-" if b["agents"] is None else b["agents"]
                typer.echo(f"  broker {i:<2} {state:<8} pid {b['pid'] or '-'}  agents {agents}")
    parts = [*(b["running"] for b in doc["brokers"]), doc["bridge"]["running"]]
    if "events" in doc:
        parts.append(doc["events"]["running"])
    if not doc["database"]["external"]:
        parts.append(doc["database"]["running"])
    if not all(parts):
        raise typer.Exit(1)


@app.command()
def env(dir: DirOption = DEFAULT_DIR) -> None:
    """Print `export` lines for the stack's operator URLs: eval "$(eucora stack env)"."""
    stack = Stack(dir)
    if not stack.state_file.exists():
        fail(f"no stack in {stack.dir}: run `eucora stack up --dir {dir}`", code=1)
    for key, value in stack.env().items():
        typer.echo(f"export {key}='{value}'")
