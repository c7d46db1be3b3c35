"""`eucora agents list/show/label`: the fleet as the database sees it.

State, connected, stale and healthy are judged in SQL by the functions of migration
0008 (docs/agents.md, "Connected, stale, healthy"), the same the dashboards count:
- state: never_connected, online, offline or revoked;
- connected: online, not stale, not revoked; stale: online but silent for offline_after;
- healthy: connected, and both a heartbeat and a telemetry sample arrived within
  --healthy-within seconds (default 180: three missed 60-s heartbeats).
`agents list` pages in agent_id order with --limit and --after.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import (
    count_more,
    emit_json,
    fail,
    in_transaction,
    iso,
    more_not_shown,
    open_database,
    parse_tag,
)
from cli.db import DATABASE_URL_OPTION
from cli.watch import watch
from schemas.states import Platform
from service.domains.targets import Target, target_where

if TYPE_CHECKING:
    import psycopg

    from service.db.models import AgentDetailPublic

app = typer.Typer(help="The agents: status, health, hardware, history.", no_args_is_help=True)
app.command("watch")(watch)

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

# AgentHealth's columns (service/db/models.py): the functions of migration 0008, the
# one definition of state, connected, stale and healthy (the dashboards read the same
# through the agent_health view). %(within)s is the healthy window, an interval.
_HEALTH = """
    agent_state(a) AS state, agent_connected(a) AS connected, agent_stale(a) AS stale,
    agent_healthy(a, %(within)s) AS healthy, a.status_epoch AS epoch
"""
TABLE_LIMIT = 100  # a screenful or two
JSON_LIMIT = 1000  # a script pages with --after (docs/agents.md, "Paging")


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
    stale: Annotated[
        bool, typer.Option("--stale", help="only stale agents (online but silent)")
    ] = False,
    unhealthy: Annotated[
        bool, typer.Option("--unhealthy", help="only agents that are not healthy")
    ] = False,
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", help="k=v in the agent's tags or labels (repeatable: all match)"),
    ] = None,
    version: Annotated[
        str | None, typer.Option("--version", help="only this agent version")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"at most this many (default {TABLE_LIMIT}, with --json {JSON_LIMIT})",
        ),
    ] = None,
    after: Annotated[
        str | None, typer.Option("--after", help="start after this agent_id (the next page)")
    ] = None,
    healthy_within: HealthyWithin = HEALTHY_WITHIN_S,
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """List agents by agent_id, a page at a time: state, connected, stale and healthy
    apart, version, last seen, tags and labels."""
    where, params = target_where(Target(tags=dict(parse_tag(t) for t in tag or []),
                                        platform=platform))  # fmt: skip
    conditions = [where]
    if online is not None:
        conditions.append("agent_connected(a)" if online else "NOT agent_connected(a)")
    if stale:
        conditions.append("agent_stale(a)")
    if unhealthy:
        conditions.append("NOT agent_healthy(a, %(within)s)")
    if version is not None:
        conditions.append("a.agent_version = %(version)s")
    matches = " AND ".join(conditions)
    if after is not None:
        conditions.append("a.agent_id > %(after)s")
    page = limit or (JSON_LIMIT if json_output else TABLE_LIMIT)
    params |= {
        "within": timedelta(seconds=healthy_within),
        "version": version,
        "after": after,
        "limit": page + 1,  # one more tells whether there is a next page
    }
    sql = (
        "SELECT a.agent_id, a.hostname, a.platform, a.tags, a.labels, a.agent_version,"
        f" a.last_seen, {_HEALTH} FROM agents a"
        f" WHERE {' AND '.join(conditions)}"
        " ORDER BY a.agent_id LIMIT %(limit)s"
    )
    from service.db.models import AgentPublic, model_row

    with open_database(database_url, autocommit=True) as conn:
        rows = conn.cursor(row_factory=model_row(AgentPublic)).execute(sql, params).fetchall()
        more: str | None = None
        if len(rows) > page and not json_output:
            rows = rows[:page]
            more = count_more(
                conn,
                f"SELECT 1 FROM agents a WHERE {matches} AND a.agent_id > %(last)s",
                params | {"last": rows[-1].agent_id},
            )
    if json_output:
        emit_json([r.model_dump(mode="json") for r in rows[:page]])
        return
    if not rows:
        typer.echo("no agents match")
        return
    now = datetime.now(UTC)
    typer.echo(
        table(
            ["AGENT", "HOSTNAME", "PLATFORM", "VERSION", "STATE", "CONNECTED", "HEALTHY",
             "LAST SEEN", "TAGS", "LABELS"],
            [
                [
                    r.agent_id,
                    r.hostname or "-",
                    r.platform or "-",
                    r.agent_version or "-",
                    r.state,
                    "yes" if r.connected else ("stale" if r.stale else "no"),
                    "yes" if r.healthy else "no",
                    ago(r.last_seen, now),
                    pairs(r.tags),
                    pairs(r.labels),
                ]
                for r in rows
            ],
        )
    )  # fmt: skip
    n_connected = sum(1 for r in rows if r.connected)
    n_healthy = sum(1 for r in rows if r.healthy)
    typer.echo(f"{len(rows)} agents, {n_connected} connected, {n_healthy} healthy")
    if more is not None:
        more_not_shown(more, rows[-1].agent_id)


def pairs(values: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(values.items()))


@app.command()
def label(
    agent_id: Annotated[str, typer.Argument(help="the agent's id")],
    labels: Annotated[
        list[str] | None, typer.Argument(help="k=v to set (an existing key is replaced)")
    ] = None,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", help="a key to remove (repeatable)")
    ] = None,
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: JsonFlag = False,
) -> None:
    """Set or remove an agent's operator labels (kept apart from the tags it reports;
    --tag k=v targets either)."""
    from pydantic import TypeAdapter, ValidationError

    from schemas.payloads import TagKey, TagValue
    from service.domains import agents

    chosen = dict(parse_tag(x) for x in labels or [])
    if not (chosen or remove):
        fail("give labels to set (k=v) or --remove k")
    key_ok, value_ok = TypeAdapter(TagKey), TypeAdapter(TagValue)
    for key, value in [*chosen.items(), *((k, "") for k in remove or [])]:
        try:
            key_ok.validate_python(key)
        except ValidationError:
            fail(f"label key {key!r}: letters, digits and _.:/- (as tags), up to 64")
        try:
            value_ok.validate_python(value)
        except ValidationError:
            fail(f"label {key!r}: a value has at most 256 characters")

    async def work(conn: psycopg.AsyncConnection[Any]) -> dict[str, str] | None:
        try:
            return await agents.set_labels(conn, agent_id, chosen, remove or [])
        except agents.UnknownAgent:
            return None

    result = in_transaction(database_url, work)
    if result is None:
        fail(f"agent {agent_id!r} not found", 1)
    if json_output:
        emit_json({"agent_id": agent_id, "labels": result})
    else:
        typer.echo(f"{agent_id} labels: {pairs(result) or '(none)'}")


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
        SecurityEventPublic,
        TelemetrySample,
        model_row,
    )

    row = (
        conn.cursor(row_factory=model_row(AgentDetailRow))
        .execute(
            "SELECT a.agent_id, a.hostname, a.platform, a.tags, a.labels, a.last_seen,"
            " a.os_version, a.agent_version, a.hardware, a.ip_address, a.mac_address,"
            " a.first_seen, a.registered_at, a.status, a.status_changed_at, a.status_reason,"
            " a.session_present, a.last_heartbeat_at, a.last_telemetry_at, a.revoked_at,"
            " a.buffered_samples, a.dropped_samples,"
            f" {_HEALTH} FROM agents a WHERE a.agent_id = %(id)s",
            {"id": agent_id, "within": timedelta(seconds=healthy_within)},
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
    # The audit trail: the newest security events (provisioning, registration,
    # identity, refused credentials...), bounded like the other histories.
    security_events = (
        conn.cursor(row_factory=model_row(SecurityEventPublic))
        .execute(
            "SELECT time, event, detail FROM security_events"
            " WHERE agent_id = %s ORDER BY time DESC LIMIT %s",
            (agent_id, history),
        )
        .fetchall()
    )
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
        security_events=security_events,
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
    state = "connected" if doc.connected else ("stale" if doc.stale else doc.state)
    out = [
        f"{doc.agent_id}  {state}, {'healthy' if doc.healthy else 'not healthy'}"
        f"  (epoch {doc.epoch}, last seen {iso(doc.last_seen) or 'never'})",
        f"  host      {doc.hostname or '-'}  {doc.platform or '-'}  {doc.os_version or ''}",
        f"  agent     {doc.agent_version or '-'}  registered {iso(doc.registered_at) or '-'}",
        f"  network   {doc.ip_address or '-'}  {doc.mac_address or '-'}",
        f"  hardware  {hw.get('cpu_count', '-')} CPUs, {_fmt_bytes(hw.get('memory_bytes'))} memory,"
        f" {_fmt_bytes(hw.get('disk_bytes'))} disk",
        "  tags      " + (", ".join(f"{k}={v}" for k, v in sorted(doc.tags.items())) or "-"),
        "  labels    " + (", ".join(f"{k}={v}" for k, v in sorted(doc.labels.items())) or "-"),
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
        out.append("  changes: registration, labels (newest first)")
        for ch in doc.changes:
            out.append(f"    {iso(ch.time)}  {ch.field}: {ch.old_value} -> {ch.new_value}")
    if doc.security_events:
        out.append("  security events (newest first)")
        for ev in doc.security_events:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(ev.detail.items()) if v is not None)
            out.append(f"    {iso(ev.time)}  {ev.event:<20} {detail}"[:200].rstrip())
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
    """One agent: hardware, tags, status history, latest telemetry, software, and its
    audit trail (security events)."""
    with open_database(database_url, autocommit=True) as conn:
        doc = agent_document(conn, agent_id, healthy_within, history)
    if doc is None:
        fail(f"agent {agent_id!r} not found", 1)
    if json_output:
        emit_json(doc.model_dump(mode="json"))
    else:
        typer.echo(render(doc))
