"""Security events: the one writer of security_events (provisioning, revocation,
deletion, a changed re-registration, an identity violation...). Each is also one
`security.event` event in the same transaction (docs/events.md).

`security_event` for the bridge's async connections, `security_event_sync` and
`security_events_sync` (many at once: a bulk provisioning) for the CLI's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from schemas.events import EventKind
from service.domains import events
from service.domains.events import NewEvent

# (agent_id, event, detail)
Row = tuple[str | None, str, dict[str, Any]]

_INSERT = """
INSERT INTO security_events (time, agent_id, event, detail)
SELECT now(), e.* FROM unnest(%s::text[], %s::text[], %s::jsonb[]) AS e
"""


def _params(rows: Sequence[Row]) -> tuple[list[Any], ...]:
    return ([r[0] for r in rows], [r[1] for r in rows], [Jsonb(r[2]) for r in rows])


def _events(rows: Sequence[Row]) -> list[NewEvent]:
    return [NewEvent(EventKind.SECURITY, a, {"event": e, "detail": d}) for a, e, d in rows]


async def security_event(
    conn: psycopg.AsyncConnection[Any], agent_id: str | None, event: str, detail: dict[str, Any]
) -> None:
    rows: list[Row] = [(agent_id, event, detail)]
    await conn.execute(_INSERT, _params(rows))
    await events.record(conn, _events(rows))


def security_events_sync(conn: psycopg.Connection[Any], rows: Sequence[Row]) -> None:
    if rows:
        conn.execute(_INSERT, _params(rows))
        events.record_sync(conn, _events(rows))


def security_event_sync(
    conn: psycopg.Connection[Any], agent_id: str | None, event: str, detail: dict[str, Any]
) -> None:
    security_events_sync(conn, [(agent_id, event, detail)])
