"""`eucora status`: what the control plane's parts look like from here.

The report has three sections, database, broker and bridge; each is a function that
never raises and returns what it found, with `reachable` true or false. The bridge is
found through the database: every running bridge writes a heartbeat there
(`bridges`), so status needs no address for it. A fourth, events, tells whether a
bridge forwards events to NATS JetStream and how far behind it is (its row in
`event_relays`); it is not OK only while forwarding is on and failing.

Exit code (cli/common.py): 0 when every section is healthy (each reachable; the schema
up to date; a bridge ready); 4 when the database or the broker cannot be reached (one
line on stderr says which); 1 otherwise. The report is printed either way, so scripts
can read the details from --json.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import psycopg
import typer

from cli.common import EXIT_NOT_OK, EXIT_UNREACHABLE, fail
from cli.db import DATABASE_URL_OPTION
from schemas.config import ConfigError, MqttUrl, redact_url
from service.config import check_database_url
from service.db import migrate
from service.db.connect import DatabaseUnavailable, connect

# How long status waits for each service: it must answer quickly when one is down.
STATUS_TIMEOUT_S = 3


@dataclass(frozen=True)
class StatusContext:
    """What sections may use: resolved options and the environment for the rest."""

    database_url: str | None
    mqtt_url: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    timeout_s: int = STATUS_TIMEOUT_S


@dataclass
class SectionReport:
    data: dict[str, Any]  # the section's object in --json
    healthy: bool
    lines: list[tuple[str, str]]  # (label, value) rows for the readable output
    unreachable: bool = False  # configured, but no answer (exit 4, not 1)


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
    unreachable = False
    try:
        if not ctx.database_url:
            raise ConfigError("EUCORA_DATABASE_URL is not set")
        check_database_url(ctx.database_url)
        with connect(ctx.database_url, connect_timeout=ctx.timeout_s) as conn:
            data["reachable"] = True
            data["mode"] = migrate.database_mode(conn)
            data["schema_version"] = migrate.current_version(conn)
            data["pending"] = len(migrate.pending(conn))
    except ConfigError as exc:
        data["error"] = str(exc)
    except DatabaseUnavailable as exc:
        data["error"] = str(exc)
        unreachable = True
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
    return SectionReport(data=data, healthy=bool(healthy), lines=lines, unreachable=unreachable)


def broker_section(ctx: StatusContext) -> SectionReport:
    """Connect with EUCORA_MQTT_URL's account (the operator's), CONNACK, disconnect; with
    broker shards registered in the database, the same with every one of them
    (`brokers`: each with its agents), and reachable only when all are."""
    raw = ctx.mqtt_url if ctx.mqtt_url is not None else ctx.env.get("EUCORA_MQTT_URL")
    data: dict[str, Any] = {"url": None, "reachable": False, "accepted": False, "error": None}
    ca_file = ctx.env.get("EUCORA_CA_FILE")
    shards: list[dict[str, Any]] = []
    try:
        if not raw:
            raise ConfigError("EUCORA_MQTT_URL is not set")
        url = MqttUrl.parse(raw)
        data["url"] = str(url)
        data["reachable"], data["accepted"], data["error"] = _probe_broker(
            url, ca_file, ctx.timeout_s
        )
        for broker_id, where, agents in _shards(ctx):
            shard = replace(url, host=where.host, port=where.port, tls=where.tls)
            reachable, accepted, error = _probe_broker(shard, ca_file, ctx.timeout_s)
            shards.append(
                {"broker_id": broker_id, "mqtt_url": str(shard), "reachable": reachable,
                 "accepted": accepted, "agents": agents, "error": error}
            )  # fmt: skip
    except ConfigError as exc:
        data["error"] = str(exc)
    lines = [
        ("url", data["url"] or "-"),
        ("reachable", "yes" if data["reachable"] else "no"),
    ]
    if data["reachable"]:
        lines.append(("credentials", "accepted" if data["accepted"] else "refused"))
    if data["error"]:
        lines.append(("error", data["error"]))
    healthy = bool(data["accepted"])
    if shards:
        data["brokers"] = shards
        healthy = all(b["accepted"] for b in shards)
        data["reachable"] = all(b["reachable"] for b in shards)
        for b in shards:
            state = "ok" if b["accepted"] else b["error"] or "refused"
            lines.append(
                (f"broker {b['broker_id']}", f"{b['mqtt_url']}, {b['agents']} agents: {state}")
            )
    return SectionReport(
        data=data,
        healthy=healthy,
        lines=lines,
        unreachable=data["url"] is not None and not data["reachable"],
    )


def _shards(ctx: StatusContext) -> list[tuple[int, MqttUrl, int]]:
    """(broker id, service URL, agents at home there) for each registered broker; none
    without a database or shards."""
    if not ctx.database_url:
        return []
    try:
        with connect(ctx.database_url, connect_timeout=ctx.timeout_s) as conn:
            rows = conn.execute("SELECT broker_id, url, agents FROM brokers ORDER BY 1").fetchall()
    except (DatabaseUnavailable, psycopg.Error):
        return []  # the database section says why
    return [(bid, MqttUrl.parse(u, var="brokers.url"), n) for bid, u, n in rows]


def _probe_broker(
    url: MqttUrl, ca_file: str | None, timeout: float
) -> tuple[bool, bool, str | None]:
    """(reachable, credentials accepted, error) for one broker."""
    import ssl
    import threading
    import uuid

    import paho.mqtt.client as paho

    from service.mqtt import make_client

    answered = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(c: paho.Client, u: Any, f: Any, reason: Any, p: Any) -> None:
        result["reason"] = reason
        answered.set()

    client = make_client(url, f"eucora-status-{uuid.uuid4().hex[:8]}", ca_file=ca_file)
    client.on_connect = on_connect
    try:
        client.connect(url.host, url.port, keepalive=10)
    except (OSError, ssl.SSLError) as exc:
        return False, False, f"cannot reach broker {url}: {exc}"
    client.loop_start()
    try:
        if not answered.wait(timeout):
            return False, False, f"no answer from broker {url} within {timeout:g} s"
        reason = result["reason"]
        if reason.is_failure:
            return True, False, f"broker {url} refused the connection: {reason}"
        return True, True, None
    finally:
        client.disconnect()
        client.loop_stop()


def bridge_section(ctx: StatusContext) -> SectionReport:
    """The bridges' heartbeats: reachable when one was seen recently and is ready."""
    from service.bridge.sweeps import HEARTBEAT_FRESH_S

    data: dict[str, Any] = {"reachable": False, "last_seen": None, "instances": [], "error": None}
    try:
        if not ctx.database_url:
            raise ConfigError("EUCORA_DATABASE_URL is not set")
        with connect(ctx.database_url, connect_timeout=ctx.timeout_s) as conn:
            rows = conn.execute(
                "SELECT client_id, hostname, pid, version, started_at, last_seen, ready, brokers,"
                " last_seen > now() - make_interval(secs => %s) AS fresh"
                " FROM bridges ORDER BY last_seen DESC",
                (HEARTBEAT_FRESH_S,),
            ).fetchall()
    except (ConfigError, DatabaseUnavailable) as exc:
        data["error"] = f"cannot read the bridges' heartbeats: {exc}"
        rows = []
    except psycopg.Error as exc:  # e.g. a database without the migrations
        data["error"] = f"cannot read the bridges' heartbeats: {exc.diag.message_primary or exc}"
        rows = []
    for client_id, host, pid, version, started, seen, ready, brokers, fresh in rows:
        data["instances"].append(
            {"client_id": client_id, "hostname": host, "pid": pid, "version": version,
             "started_at": started.isoformat(), "last_seen": seen.isoformat(),
             "running": bool(fresh), "ready": bool(fresh and ready), "brokers": brokers}
        )  # fmt: skip
    if rows:
        data["last_seen"] = rows[0][5].isoformat()
    data["reachable"] = any(i["ready"] for i in data["instances"])
    if not rows and data["error"] is None:
        data["error"] = "no bridge has ever run against this database"
    elif rows and not data["reachable"] and data["error"] is None:
        data["error"] = "no bridge is running and ready (see last_seen)"
    lines = [
        ("reachable", "yes" if data["reachable"] else "no"),
        ("last seen", data["last_seen"] or "-"),
    ]
    for i in data["instances"]:
        state = "ready" if i["ready"] else "running, not ready" if i["running"] else "gone"
        lines.append((i["client_id"], f"{state} on {i['hostname']} pid {i['pid']}, {i['version']}"))
    if data["error"]:
        lines.append(("error", data["error"]))
    return SectionReport(data=data, healthy=bool(data["reachable"]), lines=lines)


def events_section(ctx: StatusContext) -> SectionReport:
    """The event relay: on while a bridge relays (or retries) to JetStream, with its lag."""
    from service.domains import event_relays

    data: dict[str, Any] = {
        "forwarding": False, "stream": None, "target": None, "holder": None, "cursor": None,
        "relayed": None, "behind": None, "lag_s": None, "seen_at": None, "error": None,
    }  # fmt: skip
    found: list[event_relays.RelayReport] = []
    if ctx.database_url:
        try:
            with connect(ctx.database_url, connect_timeout=ctx.timeout_s) as conn:
                found = event_relays.reports_sync(conn)
        except DatabaseUnavailable:
            pass  # the database section says why
        except psycopg.Error as exc:  # e.g. a database without the migrations
            data["error"] = f"cannot read the event relay: {exc.diag.message_primary or exc}"
    # The relay in use: the fresh one, else the one seen last.
    found.sort(key=lambda r: (r.fresh, r.seen_at is not None, r.seen_at), reverse=True)
    if found:
        relay = found[0]
        data |= relay.document() | {"forwarding": relay.fresh}
    lines: list[tuple[str, str]] = []
    if data["forwarding"]:
        lines += [
            ("forwarding", f"on, to {data['target']}"),
            ("relayed by", data["holder"] or "-"),
            ("behind", f"{data['behind']} events, {data['lag_s']:.1f} s"),
        ]
    elif found:
        lines.append(("forwarding", f"off (a bridge last relayed at {data['seen_at']})"))
    else:
        lines.append(("forwarding", "off"))
    if data["error"]:
        lines.append(("error", data["error"]))
    healthy = not (data["forwarding"] and data["error"])
    return SectionReport(data=data, healthy=healthy, lines=lines)


SECTIONS: list[tuple[str, SectionFn]] = [
    ("database", database_section),
    ("broker", broker_section),
    ("bridge", bridge_section),
    ("events", events_section),
]


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
    mqtt_url: str | None = typer.Option(
        None, envvar="EUCORA_MQTT_URL", help="the broker, with the operator's account"
    ),
    json_output: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Database, broker and bridge: each reachable or not (exit 0 only when all are); and
    the event relay to NATS JetStream, when a bridge forwards events."""
    reports = collect(StatusContext(database_url=database_url, mqtt_url=mqtt_url))
    if json_output:
        typer.echo(orjson.dumps({name: r.data for name, r in reports.items()}).decode())
    else:
        typer.echo(render(reports))

    unreachable = [name for name, r in reports.items() if r.unreachable]
    if unreachable:
        fail(f"cannot reach the {' and the '.join(unreachable)}", EXIT_UNREACHABLE)
    if not all(r.healthy for r in reports.values()):
        raise typer.Exit(EXIT_NOT_OK)


# For tests and for running this command alone; cli/main.py registers `status` itself.
app = typer.Typer(name="status", add_completion=False)
app.command()(status)
