"""Security events: the audit trail (`eucora agents show`), written here and only here.

Every row of security_events goes through `security_event` (the CLI's synchronous
connections) or `security_event_async` (the bridge's), with the same SQL: one INSERT
for any number of rows (a bulk provisioning is one statement). Each row is also one
`security` event in the same transaction (docs/events.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import psycopg
from psycopg.types.json import Jsonb

from schemas.events import EventKind
from service.domains import events
from service.domains.events import NewEvent

SecurityEventKind = Literal[
    "provisioned",  # an account given (broker_id; a certificate: identity, serial)
    "credentials_rotated",  # a new password (broker_id)
    "credentials_revoked",  # the account taken away (broker_id, by: revoked | deleted;
    # a certificate: serial)
    "deleted",  # removed from the registry
    "first_registration",  # the agent's first register message (hostname, platform...)
    "re_registration",  # a later one that changed fields (fields, registration_ts)
    "identity_mismatch",  # a payload naming another agent (topic, claimed, kind)
    "foreign_task_report",  # a report on another agent's task (task_id, owner, status)
    "credentials_refused",  # the broker refused a connection (listener, address, line)
]
SecurityEvent = tuple[str | None, dict[str, Any]]  # (agent_id or None: unknown, detail)

_INSERT = """
INSERT INTO security_events (time, agent_id, event, detail)
SELECT now(), u.agent_id, %s, u.detail
  FROM unnest(%b::text[], %b::jsonb[]) AS u(agent_id, detail)
"""


def _params(
    event: SecurityEventKind, rows: Sequence[SecurityEvent]
) -> tuple[str, list[str | None], list[Jsonb]]:
    return event, [a for a, _ in rows], [Jsonb(d) for _, d in rows]


def as_events(event: SecurityEventKind, rows: Sequence[SecurityEvent]) -> list[NewEvent]:
    """The events of these rows (one `security` event each)."""
    return [NewEvent(EventKind.SECURITY, a, {"event": event, "detail": d}) for a, d in rows]


def security_event(
    conn: psycopg.Connection[Any], event: SecurityEventKind, rows: Sequence[SecurityEvent]
) -> None:
    """Record one kind of security event for each (agent_id, detail) of `rows`, in the
    caller's transaction."""
    if rows:
        conn.execute(_INSERT, _params(event, rows))
        events.record_sync(conn, as_events(event, rows))


async def security_event_async(
    conn: psycopg.AsyncConnection[Any],
    event: SecurityEventKind,
    rows: Sequence[SecurityEvent],
    *,
    events_too: bool = True,
) -> None:
    """`security_event` on an async connection (the bridge). With events_too=False the
    caller records `as_events(event, rows)` itself, among its own events in their order
    (a batch of registrations or task reports)."""
    if rows:
        await conn.execute(_INSERT, _params(event, rows))
        if events_too:
            await events.record(conn, as_events(event, rows))
