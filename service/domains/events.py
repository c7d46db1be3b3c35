"""The event stream: writing events with the state change they record, and reading
them from a cursor (docs/events.md).

Writing. `record` (the bridge's async connections) and `record_sync` (the CLI's)
insert events in the caller's transaction, one statement for any number of events.
Each event of an agent takes the next `agent_seq` from event_seqs, whose row stays
locked until COMMIT: numbers follow commit order and a rollback gives its numbers
back, so they have no gaps.

Reading: the safe cursor. Ids are taken in insertion order but commit in another
order, so "id > cursor" skips a row that commits after a reader passed its id.
Each row carries its transaction's id (`xid`), and a reader returns only rows whose
xid is below the oldest transaction still running (`pg_snapshot_xmin`): those
transactions have all ended, so no row can appear among them later. Rows come in
(xid, id) order; the cursor is that pair, "<xid>.<id>".

An agent's events must come in agent_seq order too. A transaction that got its xid
early may number an agent's event after a younger transaction numbered (and
committed) the previous one; its own xid would put it first. So an agent's event
takes as xid the higher of its transaction's and the previous event's (kept in
event_seqs.last_xid): still safe, since that previous transaction has ended.

Retention (`prune`, run by the bridge's task sweeper): events older than
event_retention.days are deleted, and the newest position deleted is kept as the
horizon. A cursor below it has lost events: `CursorTooOld`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg.types.json import Jsonb

from schemas.events import Envelope, EventKind
from service.db import migrate

log = logging.getLogger("eucora.events")

Conn = psycopg.AsyncConnection[Any]
SyncConn = psycopg.Connection[Any]

Event = Envelope  # what readers get: the typed envelope of schemas/events.py


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to record: the rest (event_id, position, agent_seq, ts) is the database's."""

    kind: EventKind
    agent_id: str | None
    data: dict[str, Any]
    correlation_id: str | None = None


# --- cursors --------------------------------------------------------------------------


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A place in the stream: after every event at or before (xid, id)."""

    xid: int
    id: int

    def __str__(self) -> str:
        return f"{self.xid}.{self.id}"


START: Final = Position(0, 0)


class BadCursor(ValueError):
    """Text that is not a cursor this stream gave out."""


class CursorTooOld(LookupError):
    """Events after this cursor were deleted by retention; `oldest` is where the
    events still kept begin."""

    def __init__(self, cursor: Position, oldest: Position, days: int) -> None:
        super().__init__(
            f"cursor {cursor} is older than the events kept (retention {days} days):"
            f" the oldest cursor still valid is {oldest}"
        )
        self.cursor = cursor
        self.oldest = oldest
        self.days = days


def parse_cursor(text: str) -> Position:
    xid, sep, id_ = text.strip().partition(".")
    if not sep or not xid.isdigit() or not id_.isdigit():
        raise BadCursor(f"{text!r} is not an event cursor (e.g. 1234.56)")
    return Position(int(xid), int(id_))


# --- writing --------------------------------------------------------------------------

_RECORD = """
WITH e AS MATERIALIZED (
    SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::jsonb[])
           WITH ORDINALITY AS e(agent_id, kind, correlation_id, data, n)
), numbered AS (
    INSERT INTO event_seqs AS s (agent_id, last_seq, last_xid)
    SELECT agent_id, count(*), pg_current_xact_id() FROM e
     WHERE agent_id IS NOT NULL GROUP BY agent_id ORDER BY agent_id
    ON CONFLICT (agent_id) DO UPDATE
       SET last_seq = s.last_seq + EXCLUDED.last_seq,
           last_xid = greatest(s.last_xid, EXCLUDED.last_xid)
    RETURNING agent_id, last_seq, last_xid
)
INSERT INTO events (xid, agent_id, agent_seq, kind, correlation_id, data)
SELECT coalesce(numbered.last_xid, pg_current_xact_id()), e.agent_id,
       numbered.last_seq - count(*) OVER agent + row_number() OVER agent,
       e.kind, e.correlation_id, e.data
  FROM e LEFT JOIN numbered USING (agent_id)
WINDOW agent AS (PARTITION BY e.agent_id ORDER BY e.n
                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
 ORDER BY e.n
"""


def _record_params(events: Sequence[NewEvent]) -> tuple[list[Any], ...]:
    return (
        [e.agent_id for e in events],
        [e.kind.value for e in events],
        [e.correlation_id for e in events],
        [Jsonb(e.data) for e in events],
    )


async def record(conn: Conn, events: Sequence[NewEvent]) -> None:
    """Record `events` in the caller's transaction, in this order (one statement)."""
    if events:
        await conn.execute(_RECORD, _record_params(events))


def record_sync(conn: SyncConn, events: Sequence[NewEvent]) -> None:
    """record() on a synchronous connection (the CLI's registry commands)."""
    if events:
        conn.execute(_RECORD, _record_params(events))


_LOCK_AGENTS = """
INSERT INTO event_seqs AS s (agent_id, last_seq, last_xid)
SELECT id, 0, '0' FROM unnest(%b::text[]) AS u(id) ORDER BY id
ON CONFLICT (agent_id) DO UPDATE SET last_seq = s.last_seq
"""


async def lock_agents(conn: Conn, agent_ids: Collection[str]) -> None:
    """Take the numbering locks of these agents now, in sorted order. A transaction
    that records events for several agents in several statements (the store's batch:
    one handler per message) calls this first, so that it never waits for one agent's
    lock while holding another's that the waiting side needs (a deadlock)."""
    if agent_ids:
        await conn.execute(_LOCK_AGENTS, (sorted(agent_ids),))


# --- reading --------------------------------------------------------------------------

_SAFE = "pg_snapshot_xmin(pg_current_snapshot())"

_READ = f"""
WITH s AS (SELECT {_SAFE} AS visible, r.horizon_xid, r.horizon_id, r.days
             FROM event_retention r)
SELECT s.visible::text, s.horizon_xid::text, s.horizon_id, s.days,
       e.xid::text, e.id, e.event_id, e.agent_id, e.agent_seq, e.kind, e.ts,
       e.correlation_id, e.data
  FROM s LEFT JOIN LATERAL (
       SELECT * FROM events
        WHERE (xid, id) > (%(xid)s::text::xid8, %(id)s::bigint)
          AND xid < s.visible
          AND (%(agent)s::text IS NULL OR agent_id = %(agent)s::text)
          AND (%(kinds)b::text[] IS NULL OR kind = ANY(%(kinds)b::text[]))
        ORDER BY xid, id
        LIMIT %(limit)s) e ON true
"""


def _read_params(
    cursor: Position, limit: int, agent_id: str | None, kinds: Sequence[str] | None
) -> dict[str, Any]:
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return {
        "xid": str(cursor.xid),
        "id": cursor.id,
        "agent": agent_id,
        "kinds": list(kinds) if kinds else None,
        "limit": limit,
    }


def _page(
    rows: Sequence[tuple[Any, ...]], cursor: Position, limit: int
) -> tuple[list[Event], Position]:
    visible, horizon_xid, horizon_id, days = rows[0][:4]
    horizon = Position(int(horizon_xid), horizon_id)
    if cursor < horizon:
        raise CursorTooOld(cursor, horizon, days)
    events: list[Event] = []
    for *_, xid, id_, event_id, agent_id, seq, kind, ts, correlation_id, data in rows:
        if id_ is None:  # the LEFT JOIN's row when nothing is there
            continue
        events.append(
            Envelope.model_construct(
                event_id=event_id,
                cursor=str(Position(int(xid), id_)),
                agent_id=agent_id,
                agent_seq=seq,
                kind=kind,
                ts=ts,
                correlation_id=correlation_id,
                data=data,
            )
        )
    after = parse_cursor(events[-1].cursor) if events else cursor
    if len(events) < limit:
        # Every matching event below `visible` was returned: later ones have a higher
        # position, so the next read can start there (and skip what did not match).
        after = max(after, Position(int(visible), 0))
    return events, after


async def read_after(
    conn: Conn,
    cursor: Position | str,
    *,
    limit: int = 1000,
    agent_id: str | None = None,
    kinds: Sequence[str] | None = None,
) -> tuple[list[Event], Position]:
    """Up to `limit` events after `cursor` that no later commit can precede, in stream
    order, and the cursor to read on from. Raises CursorTooOld, BadCursor."""
    at = parse_cursor(cursor) if isinstance(cursor, str) else cursor
    cur = await conn.execute(_READ, _read_params(at, limit, agent_id, kinds))
    return _page(await cur.fetchall(), at, limit)


def read_after_sync(
    conn: SyncConn,
    cursor: Position | str,
    *,
    limit: int = 1000,
    agent_id: str | None = None,
    kinds: Sequence[str] | None = None,
) -> tuple[list[Event], Position]:
    """read_after() on a synchronous connection (`eucora events tail`)."""
    at = parse_cursor(cursor) if isinstance(cursor, str) else cursor
    rows = conn.execute(_READ, _read_params(at, limit, agent_id, kinds)).fetchall()
    return _page(rows, at, limit)


_NOW = f"SELECT {_SAFE}::text"
_OLDEST = "SELECT horizon_xid::text, horizon_id FROM event_retention"


def _position(row: tuple[Any, ...] | None) -> Position:
    assert row is not None
    return Position(int(row[0]), int(row[1]) if len(row) > 1 else 0)


async def current_cursor(conn: Conn) -> Position:
    """A cursor after every event a reader can see now: reading from it gives only
    events committed from now on (and any still being written)."""
    return _position(await (await conn.execute(_NOW)).fetchone())


def current_cursor_sync(conn: SyncConn) -> Position:
    return _position(conn.execute(_NOW).fetchone())


async def oldest_cursor(conn: Conn) -> Position:
    """The cursor before the oldest event kept (where `--from-start` begins)."""
    return _position(await (await conn.execute(_OLDEST)).fetchone())


def oldest_cursor_sync(conn: SyncConn) -> Position:
    return _position(conn.execute(_OLDEST).fetchone())


# --- retention ------------------------------------------------------------------------


def set_retention_sync(conn: SyncConn, days: int) -> None:
    if days < 1:
        raise ValueError("retention must be at least 1 day")
    conn.execute("UPDATE event_retention SET days = %s", (days,))


def retention_days_sync(conn: SyncConn) -> int:
    row = conn.execute("SELECT days FROM event_retention").fetchone()
    assert row is not None
    return int(row[0])


# The newest position among the oldest `batch` events past retention whose
# transaction has ended (nothing can be written below it any more); everything up to
# it goes, so what is kept is exactly what lies after the horizon.
_PRUNE_HORIZON = f"""
SELECT xid::text, id FROM (
    SELECT xid, id FROM events
     WHERE ts < now() - make_interval(days => (SELECT days FROM event_retention))
       AND xid < {_SAFE}
     ORDER BY xid, id LIMIT %(batch)s) old
 ORDER BY xid DESC, id DESC LIMIT 1
"""
_OLDEST_EXPIRED = """
SELECT ts < now() - make_interval(days => (SELECT days FROM event_retention))
  FROM events ORDER BY xid, id LIMIT 1
"""
_PRUNE_MARK = """
UPDATE event_retention SET pruned_at = now(), horizon_xid = %(xid)s::text::xid8,
       horizon_id = %(id)s
"""
_PRUNE_DELETE = """
DELETE FROM events WHERE (xid, id) <= (%(xid)s::text::xid8, %(id)s::bigint)
"""
# TimescaleDB: drop the chunks the DELETE emptied. Only those that end at or before
# the oldest event kept: a batch short of the backlog leaves expired events past the
# horizon, and dropping every chunk past retention would take them away without moving
# the horizon (a reader between the two would skip them untold).
# (Two statements: one that reads `events` cannot drop its chunks.)
_DROP_BEFORE = """
SELECT least(now() - make_interval(days => (SELECT days FROM event_retention)),
             (SELECT min(ts) FROM events))
"""
_DROP_CHUNKS = "SELECT drop_chunks('events', older_than => %s::timestamptz)"


PRUNE_BATCH: Final = 20_000


async def prune(conn: Conn, batch: int = PRUNE_BATCH) -> int:
    """Delete up to about `batch` of the events past retention, oldest first, in the
    caller's transaction; how many (`batch` or more: call again)."""
    # Nothing past retention (the usual case): the oldest event by position, one index
    # entry, says so before any lock; the horizon query below would scan every event.
    cur = await conn.execute(_OLDEST_EXPIRED)
    oldest = await cur.fetchone()
    if oldest is None or not oldest[0]:
        return 0
    # One pruner at a time (several bridges): the others find the row locked and leave.
    cur = await conn.execute("SELECT 1 FROM event_retention FOR UPDATE SKIP LOCKED")
    if await cur.fetchone() is None:
        return 0
    row = await (await conn.execute(_PRUNE_HORIZON, {"batch": batch})).fetchone()
    if row is None:
        return 0
    params = {"xid": row[0], "id": row[1]}
    await conn.execute(_PRUNE_MARK, params)
    cur = await conn.execute(_PRUNE_DELETE, params)
    n = max(cur.rowcount, 0)
    if await migrate.uses_timescaledb(conn):
        before = await (await conn.execute(_DROP_BEFORE)).fetchone()
        assert before is not None
        await conn.execute(_DROP_CHUNKS, before)
    log.info("events pruned", extra={"deleted": n, "horizon": f"{row[0]}.{row[1]}"})
    return n
