"""The agent domain: registration, online status, liveness (SPEC "Identity", "Online
status"); docs/agents.md.

Everything here runs in the caller's transaction (for the bridge: the batch's).
Every write starts by locking the agent's row, so two bridges handling the same
retained status (status is not a shared subscription: every bridge receives it)
serialise on that row: the second one sees the first one's committed result and
finds nothing left to do.

Deadlock freedom relies on the store locking every agent of a batch first, in sorted
order (`touch` runs before the handlers): the handlers then only re-lock
rows their transaction already holds, whatever the order of the batch's messages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import psycopg
from psycopg.types.json import Jsonb

from schemas.constants import WILL_REASON
from schemas.events import EventKind
from schemas.payloads import Register, Status
from schemas.states import AgentState
from service import metrics
from service.domains import events
from service.domains.events import NewEvent
from service.domains.security import as_events, security_event_async

log = logging.getLogger("eucora.agents")

Conn = psycopg.AsyncConnection[Any]


class Verdict(Enum):
    ACCEPT = "accept"  # a transition: store it
    DUPLICATE = "duplicate"  # the state we already have (redelivery, retained, 2nd bridge)
    IGNORE = "ignore"  # out of order: recorded with accepted=false, state unchanged


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    why: str = ""


def judge(
    current: str | None, current_epoch: int | None, state: AgentState, epoch: int
) -> Judgement:
    """How a status message relates to the agent's current (status, epoch).

    - Nothing known yet (no epoch): accept.
    - A newer epoch: accept, whatever the state. A newer `offline` means we missed
      that session's `online` (the bridge was down): the agent is still offline.
    - The same epoch: `offline` after `online` is that session ending (its own last
      will or a graceful stop): accept. The same state again is a duplicate, and so is
      `online` after that session's `offline`: an agent never sends it (a republish
      follows an *older* offline), so it is a late copy of the session's birth (a
      second bridge, a redelivery) and must not revive the session.
    - An older epoch: a previous session's message (an old will after a quick
      reconnect or a session takeover, a delayed redelivery): ignore.
    """
    if current_epoch is None or current not in (AgentState.ONLINE, AgentState.OFFLINE):
        return Judgement(Verdict.ACCEPT)
    if epoch > current_epoch:
        return Judgement(Verdict.ACCEPT)
    if epoch < current_epoch:
        return Judgement(
            Verdict.IGNORE, f"epoch {epoch} is older than the current epoch {current_epoch}"
        )
    if state is AgentState.OFFLINE and current == AgentState.ONLINE:
        return Judgement(Verdict.ACCEPT)
    return Judgement(Verdict.DUPLICATE)


_STATUS_KINDS: Final = {
    AgentState.ONLINE.value: EventKind.AGENT_ONLINE,
    AgentState.OFFLINE.value: EventKind.AGENT_OFFLINE,
    "stale": EventKind.AGENT_STALE,
}


def status_event(
    agent_id: str,
    state: str,
    epoch: int | None,
    reason: str | None,
    source: str,
    session_present: bool | None = None,
) -> NewEvent:
    """The event of an accepted agent_status_events row (online, offline, stale)."""
    return NewEvent(
        _STATUS_KINDS[state],
        agent_id,
        {"epoch": epoch, "reason": reason, "source": source, "session_present": session_present},
    )


async def ensure_agents(conn: Conn, ids: Sequence[str]) -> None:
    """Rows for agents never seen before (sorted: the same lock order everywhere)."""
    await conn.execute(
        "INSERT INTO agents (agent_id) SELECT id FROM unnest(%b::text[]) AS u(id) ORDER BY id"
        " ON CONFLICT (agent_id) DO NOTHING",
        (sorted(set(ids)),),
    )


# One statement for every status row of a batch. An ignored message is recorded once
# per (agent, state, epoch): a retained message seen again after a bridge restart is the
# same event, not a new one. Rows keep the batch's order (clock_timestamp per row).
_STATUS_ROWS = """
INSERT INTO agent_status_events
    (time, agent_id, state, epoch, reason, source, session_present, accepted)
SELECT clock_timestamp(), u.id, u.state, u.epoch, u.reason, u.source, u.sp, u.accepted
  FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::text[], %b::text[], %b::bool[],
              %b::bool[]) WITH ORDINALITY AS u(id, state, epoch, reason, source, sp, accepted, n)
 WHERE u.accepted OR NOT EXISTS (
        SELECT 1 FROM agent_status_events e
         WHERE e.agent_id = u.id AND e.state = u.state AND e.epoch = u.epoch AND NOT e.accepted)
 ORDER BY u.n
"""

_SET_STATUS = """
UPDATE agents a SET status = u.state, status_epoch = u.epoch,
       status_changed_at = clock_timestamp(), status_reason = u.reason,
       session_present = u.sp, updated_at = now()
  FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::text[], %b::bool[])
       AS u(id, state, epoch, reason, sp)
 WHERE a.agent_id = u.id
"""


@dataclass(frozen=True, slots=True)
class StatusRow:
    """One agent_status_events row a message makes (accepted: a transition)."""

    agent_id: str
    msg: Status
    accepted: bool
    reason: str | None
    source: str

    def event(self) -> NewEvent:
        m = self.msg
        return status_event(
            self.agent_id, m.state.value, m.epoch, m.reason, self.source, m.session_present
        )


async def apply_statuses(conn: Conn, msgs: Sequence[tuple[str, Status]]) -> list[StatusRow]:
    """Apply online/offline messages (a batch's, in arrival order) with a fixed number
    of statements however many there are: the agents' rows are locked and read once,
    every message judged here against the state the ones before it left, and the
    outcome written set-wise. Returns the transitions (accepted), in order."""
    if not msgs:
        return []
    ids = sorted({agent_id for agent_id, _ in msgs})
    await ensure_agents(conn, ids)
    cur = await conn.execute(
        "SELECT agent_id, status, status_epoch, status_reason, session_present FROM agents"
        " WHERE agent_id = ANY(%b) ORDER BY agent_id FOR UPDATE",
        (ids,),
    )
    # Each agent's (status, epoch, reason, session_present) as the messages so far left it.
    now: dict[str, tuple[Any, ...]] = {row[0]: row[1:] for row in await cur.fetchall()}
    rows: list[StatusRow] = []
    ignored_seen: set[tuple[str, str, int]] = set()
    changed: set[str] = set()
    for agent_id, msg in msgs:
        current, current_epoch, _, current_sp = now[agent_id]
        result = judge(current, current_epoch, msg.state, msg.epoch)
        source = "last_will" if msg.reason == WILL_REASON else "agent"
        if result.verdict is Verdict.DUPLICATE:
            continue
        if result.verdict is Verdict.IGNORE:
            metrics.STATUS_IGNORED.inc()
            key = (agent_id, msg.state.value, msg.epoch)
            if key not in ignored_seen:
                ignored_seen.add(key)
                why = f"ignored: {result.why}" + (f" ({msg.reason})" if msg.reason else "")
                rows.append(StatusRow(agent_id, msg, False, why, source))
            log.info(
                "status ignored",
                extra={"agent_id": agent_id, "state": msg.state.value, "epoch": msg.epoch,
                       "current_epoch": current_epoch, "why": result.why},
            )  # fmt: skip
            continue
        sp = msg.session_present if msg.state is AgentState.ONLINE else current_sp
        now[agent_id] = (msg.state.value, msg.epoch, msg.reason, sp)
        changed.add(agent_id)
        rows.append(StatusRow(agent_id, msg, True, msg.reason, source))
        metrics.STATUS_TRANSITIONS.labels(msg.state.value).inc()
    if changed:
        ids = sorted(changed)
        await conn.execute(_SET_STATUS, (ids, *([now[a][i] for a in ids] for i in range(4))))
    if rows:
        await conn.execute(
            _STATUS_ROWS,
            (
                [r.agent_id for r in rows],
                [r.msg.state.value for r in rows],
                [r.msg.epoch for r in rows],
                [r.reason for r in rows],
                [r.source for r in rows],
                [r.msg.session_present for r in rows],
                [r.accepted for r in rows],
            ),
        )
    accepted = [r for r in rows if r.accepted]
    await events.record(conn, [r.event() for r in accepted])
    return accepted


# Registration fields whose changes are kept in agent_changes.
TRACKED_FIELDS: Final = (
    "hostname", "platform", "os_version", "agent_version",
    "hardware", "ip_address", "mac_address", "tags",
)  # fmt: skip


def registration_record(reg: Register) -> dict[str, Any]:
    """The agents columns a registration sets, as stored (JSON-ready values)."""
    return {
        "hostname": reg.hostname,
        "platform": reg.platform.value,
        "os_version": reg.os_version,
        "agent_version": reg.agent_version,
        "hardware": reg.hardware.model_dump(mode="json"),
        "ip_address": str(reg.ip_address),
        "mac_address": reg.mac_address,
        "tags": dict(reg.tags),
    }


def change_event(agent_id: str, field: str, old: Any, new: Any) -> NewEvent:
    """The event of one agent_changes row."""
    return NewEvent(
        EventKind.AGENT_CHANGED, agent_id, {"field": field, "old_value": old, "new_value": new}
    )


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f for f in TRACKED_FIELDS if old.get(f) != new.get(f)]


_SET_REGISTRATION = f"""
UPDATE agents a SET {", ".join(f"{f} = u.{f}" for f in TRACKED_FIELDS)},
       registered_at = now(), registration_ts = u.ts, updated_at = now()
  FROM unnest(%b::text[], {
    ", ".join("%b::jsonb[]" if f in ("hardware", "tags") else "%b::text[]" for f in TRACKED_FIELDS)
}, %b::timestamptz[]) AS u(id, {", ".join(TRACKED_FIELDS)}, ts)
 WHERE a.agent_id = u.id
"""


async def apply_registrations(conn: Conn, regs: Sequence[tuple[str, Register]]) -> None:
    """Apply registrations (a batch's, in arrival order) set-wise, as `apply_statuses`
    does: each one is compared with what the ones before it left, its changes kept in
    agent_changes and as events, and every agent's row written once."""
    if not regs:
        return
    ids = sorted({agent_id for agent_id, _ in regs})
    await ensure_agents(conn, ids)
    cur = await conn.execute(
        f"SELECT agent_id, registered_at IS NOT NULL, registration_ts, {', '.join(TRACKED_FIELDS)}"
        " FROM agents WHERE agent_id = ANY(%b) ORDER BY agent_id FOR UPDATE",
        (ids,),
    )
    state: dict[str, tuple[bool, Any, dict[str, Any]]] = {
        row[0]: (row[1], row[2], dict(zip(TRACKED_FIELDS, row[3:], strict=True)))
        for row in await cur.fetchall()
    }
    written: set[str] = set()
    changes: list[tuple[str, str, Any, Any]] = []
    new_events: list[NewEvent] = []
    first: list[tuple[str, dict[str, Any]]] = []
    again: list[tuple[str, dict[str, Any]]] = []
    for agent_id, reg in regs:
        registered, registration_ts, old = state[agent_id]
        if registration_ts is not None and reg.ts < registration_ts:
            # An older registration committed after a newer one (two bridges, redelivery).
            metrics.REGISTRATIONS.labels("out_of_order").inc()
            continue
        new = registration_record(reg)
        state[agent_id] = (True, reg.ts, new)
        written.add(agent_id)
        if not registered:
            metrics.REGISTRATIONS.labels("new").inc()
            new_events.append(NewEvent(EventKind.AGENT_REGISTERED, agent_id, new))
            first.append((agent_id, {k: new[k] for k in ("hostname", "platform", "ip_address",
                                                         "agent_version")}))  # fmt: skip
            new_events += as_events("first_registration", first[-1:])
            continue
        fields = changed_fields(old, new)
        if not fields:
            metrics.REGISTRATIONS.labels("unchanged").inc()
            continue
        metrics.REGISTRATIONS.labels("changed").inc()
        changes += [(agent_id, f, old[f], new[f]) for f in fields]
        new_events += [change_event(agent_id, f, old[f], new[f]) for f in fields]
        again.append((agent_id, {"fields": fields, "registration_ts": reg.ts.isoformat()}))
        new_events += as_events("re_registration", again[-1:])
        log.info("agent re-registered with changes", extra={"agent_id": agent_id, "fields": fields})
    if written:
        ids = sorted(written)  # each as its last registration in the batch left it
        await conn.execute(
            _SET_REGISTRATION,
            (
                ids,
                *(
                    [
                        Jsonb(state[a][2][f]) if f in ("hardware", "tags") else state[a][2][f]
                        for a in ids
                    ]
                    for f in TRACKED_FIELDS
                ),
                [state[a][1] for a in ids],
            ),
        )
    if changes:
        await conn.execute(
            "INSERT INTO agent_changes (time, agent_id, field, old_value, new_value)"
            " SELECT now(), * FROM unnest(%b::text[], %b::text[], %b::jsonb[], %b::jsonb[])",
            (
                [c[0] for c in changes],
                [c[1] for c in changes],
                [Jsonb(c[2]) for c in changes],
                [Jsonb(c[3]) for c in changes],
            ),
        )
    await security_event_async(conn, "first_registration", first, events_too=False)
    await security_event_async(conn, "re_registration", again, events_too=False)
    await events.record(conn, new_events)  # in the messages' order


async def touch(conn: Conn, seen: dict[str, tuple[bool, bool]]) -> None:
    """Refresh last_seen (and last_heartbeat_at / last_telemetry_at where the flags say
    so) of `seen`'s agents, creating unknown ones and clearing `stale`. Sorted, so two
    writers touching the same agents lock them in the same order."""
    ids = sorted(seen)
    await conn.execute(
        """
        INSERT INTO agents AS a (agent_id, last_seen, last_heartbeat_at, last_telemetry_at)
        SELECT id, now(), CASE WHEN hb THEN now() END, CASE WHEN tel THEN now() END
          FROM unnest(%b::text[], %b::bool[], %b::bool[]) AS u(id, hb, tel)
        ON CONFLICT (agent_id) DO UPDATE SET
            last_seen = now(),
            last_heartbeat_at = coalesce(EXCLUDED.last_heartbeat_at, a.last_heartbeat_at),
            last_telemetry_at = coalesce(EXCLUDED.last_telemetry_at, a.last_telemetry_at),
            stale = false
        """,
        (ids, [seen[i][0] for i in ids], [seen[i][1] for i in ids]),
    )


async def record_buffers(conn: Conn, buffers: dict[str, tuple[int | None, int]]) -> None:
    """The offline buffer counts agents put in a heartbeat (buffered, dropped)."""
    ids = sorted(buffers)
    await conn.execute(
        """
        UPDATE agents a SET buffered_samples = u.buffered, dropped_samples = u.dropped
          FROM unnest(%b::text[], %b::bigint[], %b::bigint[]) AS u(id, buffered, dropped)
         WHERE a.agent_id = u.id
        """,
        (ids, [buffers[i][0] for i in ids], [buffers[i][1] for i in ids]),
    )


# Stale: the status says online but nothing came for `offline_after` (SPEC "Online
# status": stale-offline). Any message from the agent clears it again (`touch`).
# Candidates are the connected agents as migration 0008 defines them (agent_connected).
_STALE = """
WITH due AS (
    SELECT agent_id FROM agents
     WHERE agent_connected(agents)
       AND coalesce(last_seen, status_changed_at, first_seen)
           < now() - make_interval(secs => %(after)s)
     ORDER BY agent_id
     FOR UPDATE SKIP LOCKED
), marked AS (
    UPDATE agents a SET stale = true, updated_at = now()
      FROM due WHERE a.agent_id = due.agent_id
    RETURNING a.agent_id, a.status_epoch
)
INSERT INTO agent_status_events (time, agent_id, state, epoch, reason, source)
SELECT clock_timestamp(), agent_id, 'stale', status_epoch, %(reason)s, 'bridge' FROM marked
RETURNING agent_id, epoch, reason
"""


async def mark_stale(conn: Conn, offline_after_s: float) -> int:
    """Mark what is due; returns how many agents became stale. Several bridges may
    sweep at once: rows are claimed with SKIP LOCKED and re-checked under the lock, so
    each stale transition is recorded once."""
    cur = await conn.execute(
        _STALE,
        {
            "after": offline_after_s,
            "reason": f"nothing received for {offline_after_s:g} s",
        },
    )
    rows = await cur.fetchall()
    await events.record(
        conn, [status_event(a, "stale", epoch, reason, "bridge") for a, epoch, reason in rows]
    )
    if rows:
        metrics.MARKED_STALE.inc(len(rows))
    return len(rows)


class UnknownAgent(LookupError):
    """No agent with this id in the registry."""


async def set_labels(
    conn: Conn, agent_id: str, labels: dict[str, str], remove: Sequence[str] = ()
) -> dict[str, str]:
    """An operator's labels: drop the keys in `remove`, then set `labels` (the agent's
    own `tags` are never touched). A change is kept in agent_changes (field `labels`,
    old and new). Returns the agent's labels; UnknownAgent when there is no such agent."""
    cur = await conn.execute(
        "SELECT labels FROM agents WHERE agent_id = %s FOR UPDATE", (agent_id,)
    )
    row = await cur.fetchone()
    if row is None:
        raise UnknownAgent(agent_id)
    old: dict[str, str] = row[0]
    new = {k: v for k, v in old.items() if k not in set(remove)} | labels
    if new != old:
        await conn.execute(
            "UPDATE agents SET labels = %s, updated_at = now() WHERE agent_id = %s",
            (Jsonb(new), agent_id),
        )
        await conn.execute(
            "INSERT INTO agent_changes (time, agent_id, field, old_value, new_value)"
            " VALUES (now(), %s, 'labels', %s, %s)",
            (agent_id, Jsonb(old), Jsonb(new)),
        )
        await events.record(conn, [change_event(agent_id, "labels", old, new)])
    return new
