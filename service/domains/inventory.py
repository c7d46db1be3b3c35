"""The inventory domain: the current software list per agent, and its history.

An inventory message carries the full list; the handler compares it with the stored
one and writes only the difference (`added`, `removed`, `changed` rows in
inventory_changes, the same rows applied to `inventory`). An unchanged list writes
nothing but the ordering guard; a changed one is also one `inventory.changed` event.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from schemas.events import EventKind
from schemas.payloads import Inventory, Software
from service import metrics
from service.domains import agents, events
from service.domains.events import NewEvent

# name -> (version, publisher)
Listing = dict[str, tuple[str | None, str | None]]


def listing(software: Iterable[Software]) -> Listing:
    """Key by name (the table's key). A name listed twice (two architectures, two
    installs) keeps every version, sorted and joined, so nothing is silently lost."""
    versions: dict[str, set[str]] = {}
    publishers: dict[str, str | None] = {}
    for s in software:
        versions.setdefault(s.name, set()).add(s.version)
        if publishers.get(s.name) is None:
            publishers[s.name] = s.publisher
    return {name: (", ".join(sorted(v)), publishers[name]) for name, v in versions.items()}


@dataclass
class Diff:
    added: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    removed: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    # name, old version, new version, publisher
    changed: list[tuple[str, str | None, str | None, str | None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def diff(old: Listing, new: Listing) -> Diff:
    d = Diff()
    for name in sorted(new.keys() - old.keys()):
        d.added.append((name, *new[name]))
    for name in sorted(old.keys() - new.keys()):
        d.removed.append((name, *old[name]))
    for name in sorted(old.keys() & new.keys()):
        if old[name] != new[name]:
            d.changed.append((name, old[name][0], new[name][0], new[name][1]))
    return d


def change_event(agent_id: str, d: Diff) -> NewEvent:
    """inventory.changed: every difference, as the rows of inventory_changes say it."""
    changes = (
        [{"name": n, "change": "added", "new_version": v, "publisher": p} for n, v, p in d.added]
        + [{"name": n, "change": "removed", "old_version": v, "publisher": p}
           for n, v, p in d.removed]
        + [{"name": n, "change": "changed", "old_version": o, "new_version": v, "publisher": p}
           for n, o, v, p in d.changed]
    )  # fmt: skip
    data = {
        "added": len(d.added),
        "removed": len(d.removed),
        "changed": len(d.changed),
        "changes": changes,
    }
    return NewEvent(EventKind.INVENTORY_CHANGED, agent_id, data)


async def apply_inventories(
    conn: psycopg.AsyncConnection[Any], invs: Sequence[tuple[str, Inventory]]
) -> None:
    """Apply full software lists (a batch's, in arrival order), in the caller's
    transaction, with a fixed number of statements: the agents' rows are locked (this
    serialises two bridges applying inventories of the same agent) and their lists read
    once; each list is compared with the one before it; the `inventory` table gets each
    agent's net difference, inventory_changes every list's own."""
    if not invs:
        return
    ids = sorted({agent_id for agent_id, _ in invs})
    await agents.ensure_agents(conn, ids)
    cur = await conn.execute(
        "SELECT agent_id, inventory_ts FROM agents WHERE agent_id = ANY(%b)"
        " ORDER BY agent_id FOR UPDATE",
        (ids,),
    )
    ts: dict[str, Any] = dict(await cur.fetchall())
    cur = await conn.execute(
        "SELECT agent_id, name, version, publisher FROM inventory WHERE agent_id = ANY(%b)",
        (ids,),
    )
    stored: dict[str, Listing] = {agent_id: {} for agent_id in ids}
    for agent_id, name, version, publisher in await cur.fetchall():
        stored[agent_id][name] = (version, publisher)
    current = dict(stored)  # each agent's list as the batch leaves it (replaced, not changed)
    applied: dict[str, bool] = {}  # agent -> its list changed
    history: list[tuple[str, str, str, str | None, str | None, str | None]] = []
    changed_events: list[NewEvent] = []
    for agent_id, inv in invs:
        if ts[agent_id] is not None and inv.ts < ts[agent_id]:
            continue  # an older list committed after a newer one: it must not roll back
        ts[agent_id] = inv.ts
        new = listing(inv.software)
        d = diff(current[agent_id], new)
        current[agent_id] = new
        applied[agent_id] = applied.get(agent_id, False) or bool(d)
        if not d:
            continue
        history += [(agent_id, n, "added", None, v, p) for n, v, p in d.added]
        history += [(agent_id, n, "removed", v, None, p) for n, v, p in d.removed]
        history += [(agent_id, n, "changed", o, v, p) for n, o, v, p in d.changed]
        changed_events.append(change_event(agent_id, d))
        metrics.INVENTORY_CHANGES.labels("added").inc(len(d.added))
        metrics.INVENTORY_CHANGES.labels("removed").inc(len(d.removed))
        metrics.INVENTORY_CHANGES.labels("changed").inc(len(d.changed))
    net = {agent_id: diff(stored[agent_id], current[agent_id]) for agent_id in applied}
    removed = [(a, n) for a, d in net.items() for n, _, _ in d.removed]
    updated = [(a, n, v, p) for a, d in net.items() for n, _, v, p in d.changed]
    added = [(a, n, v, p) for a, d in net.items() for n, v, p in d.added]
    async with conn.cursor() as c:
        if removed:
            await c.execute(
                "DELETE FROM inventory i USING unnest(%b::text[], %b::text[]) AS u(id, name)"
                " WHERE i.agent_id = u.id AND i.name = u.name",
                ([r[0] for r in removed], [r[1] for r in removed]),
            )
        if updated:
            await c.execute(
                "UPDATE inventory i SET version = u.version, publisher = u.publisher,"
                " updated_at = now()"
                " FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[])"
                " AS u(id, name, version, publisher)"
                " WHERE i.agent_id = u.id AND i.name = u.name",
                tuple([r[i] for r in updated] for i in range(4)),
            )
        if added:
            async with c.copy(
                "COPY inventory (agent_id, name, version, publisher) FROM STDIN"
            ) as copy:
                for row in added:
                    await copy.write_row(row)
        if history:
            async with c.copy(
                "COPY inventory_changes"
                " (agent_id, name, change, old_version, new_version, publisher) FROM STDIN"
            ) as copy:
                for change in history:
                    await copy.write_row(change)
        if applied:
            ids_applied = sorted(applied)
            await c.execute(
                "UPDATE agents a SET inventory_ts = u.ts, inventory_updated_at ="
                " CASE WHEN u.changed THEN now() ELSE a.inventory_updated_at END"
                " FROM unnest(%b::text[], %b::timestamptz[], %b::bool[]) AS u(id, ts, changed)"
                " WHERE a.agent_id = u.id",
                (ids_applied, [ts[a] for a in ids_applied], [applied[a] for a in ids_applied]),
            )
    await events.record(conn, changed_events)
