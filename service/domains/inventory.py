"""The inventory domain: the current software list per agent, and its history.

An inventory message carries the full list; the handler compares it with the stored
one and writes only the difference (`added`, `removed`, `changed` rows in
inventory_changes, the same rows applied to `inventory`). An unchanged list writes
nothing but the ordering guard; a changed one is also one `inventory.changed` event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from schemas.events import EventKind
from schemas.payloads import Inventory, Software
from service import metrics
from service.domains import events
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


async def apply_inventory(
    conn: psycopg.AsyncConnection[Any], agent_id: str, inv: Inventory
) -> None:
    """Apply a full software list (in the caller's transaction)."""
    await conn.execute(
        "INSERT INTO agents (agent_id) VALUES (%s) ON CONFLICT (agent_id) DO NOTHING", (agent_id,)
    )
    # The row lock serialises two bridges applying inventories of the same agent.
    cur = await conn.execute(
        "SELECT inventory_ts FROM agents WHERE agent_id = %s FOR UPDATE", (agent_id,)
    )
    row = await cur.fetchone()
    assert row is not None
    if row[0] is not None and inv.ts < row[0]:
        return  # an older list committed after a newer one: it must not roll back
    cur = await conn.execute(
        "SELECT name, version, publisher FROM inventory WHERE agent_id = %s", (agent_id,)
    )
    old: Listing = {name: (version, publisher) for name, version, publisher in await cur.fetchall()}
    d = diff(old, listing(inv.software))
    if not d:
        await conn.execute(
            "UPDATE agents SET inventory_ts = %s WHERE agent_id = %s", (inv.ts, agent_id)
        )
        return
    async with conn.cursor() as c:
        if d.removed:
            await c.execute(
                "DELETE FROM inventory WHERE agent_id = %s AND name = ANY(%s)",
                (agent_id, [r[0] for r in d.removed]),
            )
        if d.changed:
            await c.executemany(
                "UPDATE inventory SET version = %s, publisher = %s, updated_at = now()"
                " WHERE agent_id = %s AND name = %s",
                [(new, pub, agent_id, name) for name, _, new, pub in d.changed],
            )
        if d.added:
            async with c.copy(
                "COPY inventory (agent_id, name, version, publisher) FROM STDIN"
            ) as copy:
                for name, version, publisher in d.added:
                    await copy.write_row((agent_id, name, version, publisher))
        async with c.copy(
            "COPY inventory_changes (agent_id, name, change, old_version, new_version, publisher)"
            " FROM STDIN"
        ) as copy:
            for name, version, publisher in d.added:
                await copy.write_row((agent_id, name, "added", None, version, publisher))
            for name, version, publisher in d.removed:
                await copy.write_row((agent_id, name, "removed", version, None, publisher))
            for name, old_v, new_v, publisher in d.changed:
                await copy.write_row((agent_id, name, "changed", old_v, new_v, publisher))
        await c.execute(
            "UPDATE agents SET inventory_ts = %s, inventory_updated_at = now() WHERE agent_id = %s",
            (inv.ts, agent_id),
        )
    await events.record(conn, [change_event(agent_id, d)])
    metrics.INVENTORY_CHANGES.labels("added").inc(len(d.added))
    metrics.INVENTORY_CHANGES.labels("removed").inc(len(d.removed))
    metrics.INVENTORY_CHANGES.labels("changed").inc(len(d.changed))
