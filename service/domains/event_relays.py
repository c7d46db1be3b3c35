"""The event relays' rows (`event_relays`, migration 0011): a relay's position in the
event stream, its holder and health, and how far behind it is.

The bridge's relay (service/bridge/relay.py) writes its row only while it holds the
relay lock; `eucora status` and every bridge's lag gauges read it with `reports`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg

from service.domains.events import Position

Conn = psycopg.AsyncConnection[Any]
SyncConn = psycopg.Connection[Any]

# A bridge that relays (or retries) touches its row at least this often; status calls
# forwarding off when the row is older than FRESH_S.
TOUCH_S: Final = 2.0
FRESH_S: Final = 15.0
# Counting a backlog stops here (an index scan per status call must stay quick).
BEHIND_CAP: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class RelayReport:
    """A relay's row as `eucora status` shows it, with its lag computed from the events."""

    name: str
    cursor: Position
    relayed: int
    holder: str | None
    target: str | None
    error: str | None
    started_at: datetime | None
    moved_at: datetime | None
    seen_at: datetime | None
    fresh: bool  # a bridge touched the row within FRESH_S
    behind: int  # events after the position (at most BEHIND_CAP)
    lag_s: float  # age of the oldest of them; 0 when none

    def document(self) -> dict[str, Any]:
        def iso(t: datetime | None) -> str | None:
            return t.isoformat() if t else None

        return {
            "stream": self.name,
            "cursor": str(self.cursor),
            "relayed": self.relayed,
            "holder": self.holder,
            "target": self.target,
            "error": self.error,
            "started_at": iso(self.started_at),
            "moved_at": iso(self.moved_at),
            "seen_at": iso(self.seen_at),
            "behind": self.behind,
            "lag_s": round(self.lag_s, 3),
        }


_CLAIM = """
INSERT INTO event_relays AS r (name, holder, target, error, started_at, seen_at)
VALUES (%(name)s, %(holder)s, %(target)s, NULL, now(), now())
ON CONFLICT (name) DO UPDATE
   SET holder = EXCLUDED.holder, target = EXCLUDED.target, error = NULL,
       started_at = now(), seen_at = now()
RETURNING cursor_xid::text, cursor_id
"""


async def claim(conn: Conn, name: str, holder: str, target: str) -> Position:
    """Take the row for this bridge (it holds the relay lock); the saved position."""
    cur = await conn.execute(_CLAIM, {"name": name, "holder": holder, "target": target})
    row = await cur.fetchone()
    assert row is not None
    return Position(int(row[0]), int(row[1]))


async def advance(conn: Conn, name: str, position: Position, relayed: int) -> None:
    """Save the position: every event up to it is acknowledged by the stream."""
    await conn.execute(
        "UPDATE event_relays SET cursor_xid = %s::text::xid8, cursor_id = %s,"
        " relayed = relayed + %s, moved_at = CASE WHEN %s > 0 THEN now() ELSE moved_at END,"
        " seen_at = now(), error = NULL WHERE name = %s",
        (str(position.xid), position.id, relayed, relayed, name),
    )


async def touch(conn: Conn, name: str, holder: str, target: str, error: str | None) -> None:
    """A sign of life (and the last error, or None) from the bridge holding the lock."""
    await conn.execute(
        "INSERT INTO event_relays AS r (name, holder, target, error, seen_at)"
        " VALUES (%s, %s, %s, %s, now()) ON CONFLICT (name) DO UPDATE"
        " SET holder = EXCLUDED.holder, target = EXCLUDED.target, error = EXCLUDED.error,"
        " seen_at = now()",
        (name, holder, target, error),
    )


_REPORTS = f"""
SELECT r.name, r.cursor_xid::text, r.cursor_id, r.relayed, r.holder, r.target, r.error,
       r.started_at, r.moved_at, r.seen_at,
       coalesce(r.seen_at > now() - make_interval(secs => {FRESH_S}), false),
       (SELECT count(*) FROM (SELECT 1 FROM events e
                               WHERE (e.xid, e.id) > (r.cursor_xid, r.cursor_id)
                               LIMIT {BEHIND_CAP}) b),
       coalesce(extract(epoch FROM now() - (
           SELECT e.ts FROM events e WHERE (e.xid, e.id) > (r.cursor_xid, r.cursor_id)
            ORDER BY e.xid, e.id LIMIT 1)), 0)::float8
  FROM event_relays r
 WHERE %(name)s::text IS NULL OR r.name = %(name)s::text
 ORDER BY r.name
"""


def _reports(rows: list[tuple[Any, ...]]) -> list[RelayReport]:
    return [
        RelayReport(
            name=name, cursor=Position(int(xid), cid), relayed=relayed, holder=holder,
            target=target, error=error, started_at=started, moved_at=moved, seen_at=seen,
            fresh=bool(fresh), behind=int(behind), lag_s=max(float(lag), 0.0),
        )
        for name, xid, cid, relayed, holder, target, error, started, moved, seen, fresh,
        behind, lag in rows
    ]  # fmt: skip


async def reports(conn: Conn, name: str | None = None) -> list[RelayReport]:
    """Every relay's row (or `name`'s) with its lag."""
    cur = await conn.execute(_REPORTS, {"name": name})
    return _reports(await cur.fetchall())


def reports_sync(conn: SyncConn, name: str | None = None) -> list[RelayReport]:
    return _reports(conn.execute(_REPORTS, {"name": name}).fetchall())
