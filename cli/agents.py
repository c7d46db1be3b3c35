"""`eucora agents list/show`: the fleet as the database sees it.

Connected and healthy are shown apart (docs/agents.md):
- connected: the retained status says `online` (epoch-ordered by the bridge) and the
  stale sweep has not flagged the agent (no message for offline_after);
- healthy: connected, and both a heartbeat and a telemetry sample arrived within
  --healthy-within seconds (default 180: three missed 60-s heartbeats).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from psycopg.types.json import Jsonb

from cli.common import emit_json, fail, iso, open_database, parse_tag
from cli.db import DATABASE_URL_OPTION
from schemas.states import Platform

if TYPE_CHECKING:
    import psycopg

    from service.db.models import AgentDetailPublic

app = typer.Typer(help="The agents: status, health, hardware, history.", no_args_is_help=True)

HEALTHY_WITHIN_S = 180.0
HealthyWithin = Annotated[
    float,
    typer.Option(
        "--healthy-within",
        envvar="EUCORA_HEALTHY_WITHIN",
        min=1,
        help="seconds within which a heartbeat and a telemetry sample make an agent healthy",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]

# The columns of AgentHealth (service/db/models.py), judged with the database's clock
# (IS TRUE: never null, without a heartbeat or a sample yet).
_STATE = """
    a.status_epoch AS epoch,
    (a.status = 'online' AND NOT a.stale) AS connected,
    (a.status = 'online' AND NOT a.stale
     AND a.last_heartbeat_at > now() - make_interval(secs => %(within)s)
     AND a.last_telemetry_at > now() - make_interval(secs => %(within)s)) IS TRUE AS healthy
"""


def ago(value: datetime | None, now: datetime | None = None) -> str:
    if value is None:
        return "never"
    seconds = max(((now or datetime.now(UTC)) - value).total_seconds(), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


@app.command("list")
def list_agents(
    platform: Annotated[Platform | None, typer.Option(help="only this platform")] = None,
    online: Annotated[
        bool | None, typer.Option("--online/--offline", help="only connected / not connected")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="k=v (repeatable: all must match)")
    ] = (None),
    healthy_within: HealthyWithin = HEALTHY_WITHIN_S,
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """List agents: connected and healthy apart, last seen, version, tags."""
    tags = dict(parse_tag(t) for t in tag or [])
    where = ["a.tags @> %(tags)s"]
    if platform is not None:
        where.append("a.platform = %(platform)s")
    if online is not None:
        connected = "(a.status = 'online' AND NOT a.stale)"
        where.append(connected if online else f"NOT {connected}")
    sql = (
        "SELECT a.agent_id, a.hostname, a.platform, a.tags, a.last_seen, a.agent_version,"
        f" a.status, {_STATE} FROM agents a WHERE {' AND '.join(where)} ORDER BY a.agent_id"
    )
    params = {
        "tags": Jsonb(tags),
        "platform": platform.value if platform else None,
        "within": healthy_within,
    }
    from service.db.models import AgentPublic, AgentRow, model_row

    with open_database(database_url, autocommit=True) as conn:
        rows = conn.cursor(row_factory=model_row(AgentRow)).execute(sql, params).fetchall()
    if json_output:
        emit_json([AgentPublic.model_validate(r).model_dump(mode="json") for r in rows])
        return
    if not rows:
        typer.echo("no agents match")
        return
    now = datetime.now(UTC)

    def connected_text(r: AgentRow) -> str:
        if r.connected:
            return "yes"
        return "stale" if r.status == "online" else "no"

    typer.echo(
        table(
            [
                "AGENT",
                "HOSTNAME",
                "PLATFORM",
                "VERSION",
                "CONNECTED",
                "HEALTHY",
                "LAST SEEN",
                "TAGS",
            ],
            [
                [
                    r.agent_id,
                    r.hostname or "-",
                    r.platform or "-",
                    r.agent_version or "-",
                    connected_text(r),
                    "yes" if r.healthy else "no",
                    ago(r.last_seen, now),
                    ",".join(f"{k}={v}" for k, v in sorted(r.tags.items())),
                ]
                for r in rows
            ],
        )
    )
    n_connected = sum(1 for r in rows if r.connected)
    n_healthy = sum(1 for r in rows if r.healthy)
    typer.echo(f"{len(rows)} agents, {n_connected} connected, {n_healthy} healthy")


def agent_document(
    conn: psycopg.Connection[Any], agent_id: str, healthy_within: float, history: int
) -> AgentDetailPublic | None:
    from service.db.models import (
        AgentChangePublic,
        AgentDetailPublic,
        AgentDetailRow,
        AgentStatusEventPublic,
        InventoryChangePublic,
        InventoryPublic,
        InventorySummaryRow,
        TelemetrySample,
        model_row,
    )

    row = (
        conn.cursor(row_factory=model_row(AgentDetailRow))
        .execute(
            "SELECT a.agent_id, a.hostname, a.platform, a.tags, a.last_seen, a.os_version,"
            " a.agent_version, a.hardware, a.ip_address, a.mac_address, a.first_seen,"
            " a.registered_at, a.status, a.status_changed_at, a.status_reason,"
            " a.session_present, a.last_heartbeat_at, a.last_telemetry_at, a.stale,"
            " a.buffered_samples, a.dropped_samples,"
            f" {_STATE} FROM agents a WHERE a.agent_id = %(id)s",
            {"id": agent_id, "within": healthy_within},
        )
        .fetchone()
    )
    if row is None:
        return None
    status_history = (
        conn.cursor(row_factory=model_row(AgentStatusEventPublic))
        .execute(
            "SELECT time, state, epoch, source, reason, accepted, session_present"
            " FROM agent_status_events WHERE agent_id = %s ORDER BY time DESC LIMIT %s",
            (agent_id, history),
        )
        .fetchall()
    )
    changes = (
        conn.cursor(row_factory=model_row(AgentChangePublic))
        .execute(
            "SELECT time, field, old_value, new_value FROM agent_changes"
            " WHERE agent_id = %s ORDER BY time DESC LIMIT %s",
            (agent_id, history),
        )
        .fetchall()
    )
    telemetry = (
        conn.cursor(row_factory=model_row(TelemetrySample))
        .execute(
            "SELECT time, cpu_percent, memory_percent, disk_percent, net_rx_bytes,"
            " net_tx_bytes FROM telemetry WHERE agent_id = %s ORDER BY time DESC LIMIT 1",
            (agent_id,),
        )
        .fetchone()
    )
    inventory = (
        conn.cursor(row_factory=model_row(InventorySummaryRow))
        .execute(
            "SELECT (SELECT count(*) FROM inventory i WHERE i.agent_id = a.agent_id) AS count,"
            " a.inventory_updated_at AS updated_at FROM agents a WHERE a.agent_id = %s",
            (agent_id,),
        )
        .fetchone()
    )
    if inventory is None:  # deleted meanwhile
        return None
    inventory_changes = (
        conn.cursor(row_factory=model_row(InventoryChangePublic))
        .execute(
            "SELECT time, name, change, old_version, new_version FROM inventory_changes"
            " WHERE agent_id = %s ORDER BY time DESC, name LIMIT %s",
            (agent_id, history),
        )
        .fetchall()
    )
    return AgentDetailPublic(
        **dict(row),
        status_history=status_history,
        changes=changes,
        telemetry=telemetry,
        inventory=InventoryPublic(**dict(inventory), recent_changes=inventory_changes),
    )


def _fmt_bytes(n: Any) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def render(doc: AgentDetailPublic) -> str:
    hw = doc.hardware
    state = "connected" if doc.connected else ("stale" if doc.stale else doc.status)
    out = [
        f"{doc.agent_id}  {state}, {'healthy' if doc.healthy else 'not healthy'}"
        f"  (epoch {doc.epoch}, last seen {iso(doc.last_seen) or 'never'})",
        f"  host      {doc.hostname or '-'}  {doc.platform or '-'}  {doc.os_version or ''}",
        f"  agent     {doc.agent_version or '-'}  registered {iso(doc.registered_at) or '-'}",
        f"  network   {doc.ip_address or '-'}  {doc.mac_address or '-'}",
        f"  hardware  {hw.get('cpu_count', '-')} CPUs, {_fmt_bytes(hw.get('memory_bytes'))} memory,"
        f" {_fmt_bytes(hw.get('disk_bytes'))} disk",
        "  tags      " + (", ".join(f"{k}={v}" for k, v in sorted(doc.tags.items())) or "-"),
        f"  heartbeat {iso(doc.last_heartbeat_at) or 'never'}",
    ]
    t = doc.telemetry
    if t:
        out.append(
            f"  telemetry {iso(t.time)}: cpu {t.cpu_percent:.1f}%  memory"
            f" {t.memory_percent:.1f}%  disk {t.disk_percent:.1f}%  rx"
            f" {_fmt_bytes(t.net_rx_bytes)}  tx {_fmt_bytes(t.net_tx_bytes)}"
        )
    else:
        out.append("  telemetry none")
    if doc.dropped_samples is not None:
        out.append(
            f"  buffer    {doc.buffered_samples or 0} samples waiting offline,"
            f" {doc.dropped_samples} dropped (full, or past its age bound)"
        )
    inv = doc.inventory
    out.append(f"  software  {inv.count} packages (list changed {iso(inv.updated_at) or 'never'})")
    for c in inv.recent_changes[:10]:
        versions = " -> ".join(v for v in (c.old_version, c.new_version) if v)
        out.append(f"    {iso(c.time)}  {c.change:<8} {c.name} {versions}")
    if doc.status_history:
        out.append("  status history (newest first)")
        for e in doc.status_history:
            note = "" if e.accepted else "  [ignored]"
            reason = f"  {e.reason}" if e.reason else ""
            out.append(
                f"    {iso(e.time)}  {e.state:<7} epoch {e.epoch}  by {e.source}{reason}{note}"
            )
    if doc.changes:
        out.append("  registration changes (newest first)")
        for ch in doc.changes:
            out.append(f"    {iso(ch.time)}  {ch.field}: {ch.old_value} -> {ch.new_value}")
    return "\n".join(out)


@app.command()
def show(
    agent_id: Annotated[str, typer.Argument(help="the agent's id")],
    history: Annotated[int, typer.Option(min=1, help="how many history entries of each kind")] = (
        20
    ),
    healthy_within: HealthyWithin = HEALTHY_WITHIN_S,
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """One agent: hardware, tags, status history, latest telemetry, software."""
    with open_database(database_url, autocommit=True) as conn:
        doc = agent_document(conn, agent_id, healthy_within, history)
    if doc is None:
        fail(f"agent {agent_id!r} not found", 1)
    if json_output:
        emit_json(doc.model_dump(mode="json"))
    else:
        typer.echo(render(doc))
