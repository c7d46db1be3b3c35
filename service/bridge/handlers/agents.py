"""Registration and online status (SPEC "Identity", "Online status"); docs/agents.md.

Both run inside the batch's transaction. Every write starts by locking the agent's
row, so two bridges handling the same retained status (status is not a shared
subscription: every bridge receives it) serialise on that row: the second one sees
the first one's committed result and finds nothing left to do.

Deadlock freedom relies on the store locking every agent of a batch first, in sorted
order (store._touch_agents runs before the handlers): the handlers then only re-lock
rows their transaction already holds, whatever the order of the batch's messages.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

import psycopg
from prometheus_client import Counter
from psycopg.types.json import Jsonb

from schemas.payloads import Register, Status
from schemas.states import AgentState
from schemas.topics import Kind
from service.bridge.store import handles

if TYPE_CHECKING:
    from service.bridge.ingest import Inbound

log = logging.getLogger("eucora.bridge.agents")

# The reason an agent puts in its last will's payload (agent/protocol.py sets it):
# it lets the status history say "last_will" rather than "agent".
WILL_REASON: Final = "last will"

STATUS_TRANSITIONS = Counter(
    "eucora_status_transitions", "Accepted online/offline transitions", ["state"]
)
STATUS_IGNORED = Counter(
    "eucora_status_ignored", "Status messages ignored as out of order (older epoch)"
)
REGISTRATIONS = Counter(
    "eucora_registrations", "Registrations applied", ["outcome"]
)  # new, unchanged, changed, out_of_order


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


# Hooks run after an accepted transition, in the same transaction: e.g. the task
# outbox republishes what it owes an agent that came back without its session.
StatusHook = Callable[["psycopg.AsyncConnection[Any]", str, Status], Awaitable[None]]
STATUS_HOOKS: list[StatusHook] = []


async def _ensure_agent(conn: psycopg.AsyncConnection[Any], agent_id: str) -> None:
    await conn.execute(
        "INSERT INTO agents (agent_id) VALUES (%s) ON CONFLICT (agent_id) DO NOTHING", (agent_id,)
    )


@handles(Kind.STATUS)
async def handle_status(conn: psycopg.AsyncConnection[Any], item: Inbound) -> None:
    assert item.agent_id is not None
    agent_id: str = item.agent_id
    msg: Status = item.model
    await _ensure_agent(conn, agent_id)
    cur = await conn.execute(
        "SELECT status, status_epoch FROM agents WHERE agent_id = %s FOR UPDATE", (agent_id,)
    )
    row = await cur.fetchone()
    assert row is not None
    current, current_epoch = row
    result = judge(current, current_epoch, msg.state, msg.epoch)
    source = "last_will" if msg.reason == WILL_REASON else "agent"
    if result.verdict is Verdict.DUPLICATE:
        return
    if result.verdict is Verdict.IGNORE:
        STATUS_IGNORED.inc()
        reason = f"ignored: {result.why}" + (f" ({msg.reason})" if msg.reason else "")
        # Once per (state, epoch): a retained message seen again after a bridge restart
        # is the same event, not a new one.
        await conn.execute(
            """
            INSERT INTO agent_status_events
                (time, agent_id, state, epoch, reason, source, session_present, accepted)
            SELECT clock_timestamp(), %(id)s, %(state)s, %(epoch)s, %(reason)s, %(source)s,
                   %(sp)s, false
             WHERE NOT EXISTS (
                SELECT 1 FROM agent_status_events
                 WHERE agent_id = %(id)s AND state = %(state)s AND epoch = %(epoch)s
                   AND NOT accepted)
            """,
            {
                "id": agent_id,
                "state": msg.state.value,
                "epoch": msg.epoch,
                "reason": reason,
                "source": source,
                "sp": msg.session_present,
            },
        )
        log.info(
            "status ignored",
            extra={"agent_id": agent_id, "state": msg.state.value, "epoch": msg.epoch,
                   "current_epoch": current_epoch, "why": result.why},
        )  # fmt: skip
        return
    online = msg.state is AgentState.ONLINE
    await conn.execute(
        """
        UPDATE agents SET status = %(state)s, status_epoch = %(epoch)s,
               status_changed_at = clock_timestamp(), status_reason = %(reason)s,
               session_present = CASE WHEN %(online)s THEN %(sp)s ELSE session_present END,
               updated_at = now()
         WHERE agent_id = %(id)s
        """,
        {
            "id": agent_id,
            "state": msg.state.value,
            "epoch": msg.epoch,
            "reason": msg.reason,
            "online": online,
            "sp": msg.session_present,
        },
    )
    await conn.execute(
        """
        INSERT INTO agent_status_events
            (time, agent_id, state, epoch, reason, source, session_present, accepted)
        VALUES (clock_timestamp(), %s, %s, %s, %s, %s, %s, true)
        """,
        (agent_id, msg.state.value, msg.epoch, msg.reason, source, msg.session_present),
    )
    STATUS_TRANSITIONS.labels(msg.state.value).inc()
    for hook in STATUS_HOOKS:
        await hook(conn, agent_id, msg)


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


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f for f in TRACKED_FIELDS if old.get(f) != new.get(f)]


@handles(Kind.REGISTER)
async def handle_register(conn: psycopg.AsyncConnection[Any], item: Inbound) -> None:
    assert item.agent_id is not None
    agent_id: str = item.agent_id
    reg: Register = item.model
    await _ensure_agent(conn, agent_id)
    cur = await conn.execute(
        f"SELECT registered_at, registration_ts, {', '.join(TRACKED_FIELDS)}"
        " FROM agents WHERE agent_id = %s FOR UPDATE",
        (agent_id,),
    )
    row = await cur.fetchone()
    assert row is not None
    registered_at, registration_ts = row[0], row[1]
    old = dict(zip(TRACKED_FIELDS, row[2:], strict=True))
    if registration_ts is not None and reg.ts < registration_ts:
        # An older registration committed after a newer one (two bridges, redelivery).
        REGISTRATIONS.labels("out_of_order").inc()
        return
    new = registration_record(reg)
    changes = changed_fields(old, new) if registered_at is not None else []
    await conn.execute(
        f"""
        UPDATE agents SET {", ".join(f"{f} = %({f})s" for f in TRACKED_FIELDS)},
               registered_at = now(), registration_ts = %(ts)s, updated_at = now()
         WHERE agent_id = %(id)s
        """,
        {
            **{f: Jsonb(v) if isinstance(v, dict) else v for f, v in new.items()},
            "ts": reg.ts,
            "id": agent_id,
        },
    )
    if registered_at is None:
        REGISTRATIONS.labels("new").inc()
        return
    if not changes:
        REGISTRATIONS.labels("unchanged").inc()
        return
    REGISTRATIONS.labels("changed").inc()
    async with conn.cursor() as cur2:
        await cur2.executemany(
            "INSERT INTO agent_changes (time, agent_id, field, old_value, new_value)"
            " VALUES (now(), %s, %s, %s, %s)",
            [(agent_id, f, Jsonb(old[f]), Jsonb(new[f])) for f in changes],
        )
    await conn.execute(
        "INSERT INTO security_events (time, agent_id, event, detail)"
        " VALUES (now(), %s, 're_registration', %s)",
        (agent_id, Jsonb({"fields": changes, "registration_ts": reg.ts.isoformat()})),
    )
    log.info("agent re-registered with changes", extra={"agent_id": agent_id, "fields": changes})
