"""The task outbox: tasks are written to the database first, and this worker publishes
them (SPEC "Tasks": transactional outbox; docs/tasks.md).

A row is owed to its agent while `next_publish_at <= now()`. Each round, in one
transaction:

  claim    SELECT ... FOR UPDATE OF t SKIP LOCKED LIMIT n  (another bridge skips these)
  publish  QoS 1, not retained, on {root}/agents/{id}/tasks, MQTT 5 MessageExpiryInterval
           from expires_at and CorrelationData = correlation_id; off the event loop
  PUBACK   wait for the broker's acknowledgement of each message
  update   attempts + 1, published_at; next_publish_at = now() + redelivery interval
           (doubling with each attempt, up to 8 x) while PENDING (not yet acknowledged
           by the agent), NULL otherwise
  commit

so a crash before the commit publishes again (a duplicate, which agents ignore by
task_id), and nothing is marked published that the broker did not take. A PUBACK is
not delivery: only the agent's ASSIGNED report is (the task-status handler then clears
next_publish_at).

Redelivery: a PENDING task is published again every redelivery interval, but only
while its agent is online: an offline agent's copy waits in its persistent session,
and filling that queue with copies would only push real tasks out of it. When the
agent is back, an overdue task goes out at once. An agent that returns without its
session gets everything it is owed again through `owe_again` (a status hook).

Rows that are due but cannot be published: a PENDING task past its expires_at becomes
EXPIRED here (never published); a cancelled task sends `{"cancel": task_id}` once.

The worker wakes on NOTIFY eucora_outbox (sent by `eucora tasks create/cancel` in
their transaction) and polls every second besides, for writers that do not notify.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from schemas.payloads import TaskCancel, TaskCommand
from schemas.topics import Kind
from schemas.validate import PayloadError, dump
from service.bridge import metrics
from service.config import Settings

if TYPE_CHECKING:
    from service.bridge.ingest import Ingest

log = logging.getLogger("eucora.bridge.outbox")

CHANNEL: Final = "eucora_outbox"  # NOTIFY channel: "a task is owed, look now"
POLL_S: Final = 1.0
BATCH: Final = 200  # rows per claim: short transactions, row locks held briefly
PUBACK_TIMEOUT_S: Final = 10.0
# For rows written without expires_at (the CLI always sets it): the CLI's default.
DEFAULT_EXPIRY_SQL: Final = "interval '7 days'"

_EXPIRES = f"coalesce(t.expires_at, t.created_at + {DEFAULT_EXPIRY_SQL})"

# A redelivery (attempts > 0) of a task command waits for the agent to be online; first
# publications go into the agent's persistent session, online or not, and so do cancels.
_CLAIM = f"""
SELECT t.task_id, t.agent_id, t.type, t.payload, t.status, t.timeout_seconds,
       {_EXPIRES} AS expires_at, t.correlation_id, t.created_at, t.attempts,
       t.cancel_requested, {_EXPIRES} <= now() AS expired,
       greatest(1, ceil(extract(epoch FROM {_EXPIRES} - now())))::bigint AS expiry_s
  FROM tasks t
 WHERE t.next_publish_at <= now()
   AND (t.attempts = 0 OR t.cancel_requested OR t.status NOT IN ('PENDING', 'ASSIGNED')
        OR EXISTS (SELECT 1 FROM agents a
                    WHERE a.agent_id = t.agent_id AND a.status = 'online' AND NOT a.stale))
 ORDER BY t.next_publish_at
 LIMIT %(limit)s
 FOR UPDATE OF t SKIP LOCKED
"""

_DONE = """
UPDATE tasks t SET
    attempts = t.attempts + CASE WHEN u.what = 'command' THEN 1 ELSE 0 END,
    published_at = CASE WHEN u.what = 'command' THEN clock_timestamp() ELSE t.published_at END,
    next_publish_at = CASE WHEN u.what = 'command' AND t.status = 'PENDING'
                           THEN clock_timestamp() + make_interval(
                               secs => %(redelivery)s * power(2, least(t.attempts, 3))) END,
    updated_at = now()
  FROM unnest(%(ids)s::uuid[], %(what)s::text[]) AS u(id, what)
 WHERE t.task_id = u.id
"""

_EXPIRE = """
WITH moved AS (
    UPDATE tasks SET status = 'EXPIRED', next_publish_at = NULL, finished_at = now(),
           updated_at = now(), error = coalesce(error, 'not delivered before expires_at')
     WHERE task_id = ANY(%(ids)s::uuid[]) AND status = 'PENDING'
    RETURNING task_id, agent_id, correlation_id
)
INSERT INTO task_events
    (time, task_id, agent_id, status, previous_status, source, correlation_id, reason)
SELECT clock_timestamp(), task_id, agent_id, 'EXPIRED', 'PENDING', 'server', correlation_id,
       'expired before delivery'
  FROM moved
"""

_UNPUBLISHABLE = """
INSERT INTO task_events (time, task_id, agent_id, status, previous_status, source,
                         correlation_id, accepted, reason)
SELECT clock_timestamp(), task_id, agent_id, status, status, 'server', correlation_id, false,
       %(reason)s
  FROM tasks WHERE task_id = %(id)s
"""

# What an agent that came back without its session is owed again: its open tasks that
# can still start, and the cancels of tasks that could still be running there (an
# agent stops a task itself at timeout_seconds).
_OWE_AGAIN = f"""
UPDATE tasks t SET next_publish_at = now()
 WHERE t.agent_id = %(agent_id)s
   AND (t.next_publish_at IS NULL OR t.next_publish_at > now())
   AND ((t.status IN ('PENDING', 'ASSIGNED') AND NOT t.cancel_requested
         AND {_EXPIRES} > now())
        OR (t.cancel_requested
            AND t.finished_at > now() - make_interval(secs => t.timeout_seconds)))
"""


@dataclass(frozen=True, slots=True)
class Outgoing:
    task_id: Any
    what: str  # "command" | "cancel" | "skip" (nothing owed any more: clear the row)
    topic: str = ""
    payload: bytes = b""
    properties: Properties | None = None


def stop_requested() -> bool:
    """Whether this task was cancelled, even if the CancelledError got lost: on Python
    3.11 asyncio.wait_for swallows a cancellation that lands just as what it waits for
    completes (psycopg_pool's getconn waits with it; a bridge then never stopped). The
    request count survives it, so the worker loops check it too."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class OwnConnection:
    """A worker's own database connection, reconnected when lost. Not from the pool:
    the outbox and the sweeps run all the time, and waiting in the pool's queue is
    where a cancellation could get lost (see stop_requested)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def get(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=5, application_name="eucora-bridge"
            )
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


async def owe_again(conn: psycopg.AsyncConnection[Any], agent_id: str) -> int:
    """Owe `agent_id` its open tasks again (it came back without its session): they
    are published on the outbox's next round. Runs in the caller's transaction;
    returns how many tasks were set."""
    cur = await conn.execute(_OWE_AGAIN, {"agent_id": agent_id})
    n = max(cur.rowcount, 0)
    if n:
        metrics.TASKS_OWED_AGAIN.inc(n)
        await conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
    return n


def _properties(expiry_s: int, correlation_id: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = min(int(expiry_s), 2**32 - 1)
    props.CorrelationData = correlation_id.encode()
    return props


def _iso(value: datetime) -> str:
    return value.isoformat()


def command_payload(row: dict[str, Any]) -> bytes:
    """The task message for a claimed row, validated by the schema agents use."""
    model = TaskCommand.model_validate(
        {
            "task_id": str(row["task_id"]),
            "type": row["type"],
            "payload": row["payload"],
            "timeout_seconds": row["timeout_seconds"],
            "expires_at": _iso(row["expires_at"]),
            "correlation_id": row["correlation_id"],
            "created_at": _iso(row["created_at"]),
            "attempt": row["attempts"] + 1,
        },
        strict=False,
    )
    return dump(model)


def cancel_payload(row: dict[str, Any]) -> bytes:
    model = TaskCancel.model_validate(
        {
            "cancel": str(row["task_id"]),
            "correlation_id": row["correlation_id"],
            "ts": _iso(datetime.now(UTC)),
        },
        strict=False,
    )
    return dump(model)


def _publish_all(
    ingest: Ingest, messages: list[Outgoing], timeout: float, abort: threading.Event
) -> list[bool]:
    """Publish, then wait for every PUBACK (in a worker thread: paho blocks). Gives up
    at the deadline, or at once when the bridge stops (`abort`): asyncio.run() waits
    for this thread before the process can exit."""
    infos = [ingest.publish(m.topic, m.payload, qos=1, properties=m.properties) for m in messages]
    deadline = time.monotonic() + timeout
    acked: list[bool] = []
    for info in infos:
        try:
            while not info.is_published() and not abort.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                info.wait_for_publish(min(left, 0.1))
            acked.append(info.is_published())
        except (RuntimeError, ValueError):
            # Not connected (paho may still send it after a reconnect: a harmless
            # duplicate), or its queue is full. The row stays due.
            acked.append(False)
    return acked


class Outbox:
    def __init__(self, settings: Settings, pool: AsyncConnectionPool, ingest: Ingest):
        self.settings = settings
        self.db = OwnConnection(settings.database_url)
        self.ingest = ingest
        self.wake = asyncio.Event()
        self.abort = threading.Event()

    async def round(self, limit: int = BATCH) -> int:
        """Claim, publish and record up to `limit` due rows; returns how many were claimed."""
        tree = self.ingest.tree
        conn = await self.db.get()
        async with conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            rows = await (await cur.execute(_CLAIM, {"limit": limit})).fetchall()
            if not rows:
                return 0
            out: list[Outgoing] = []
            expired: list[Any] = []
            for row in rows:
                topic = tree.agent(row["agent_id"], Kind.TASKS)
                if row["cancel_requested"]:
                    props = _properties(row["timeout_seconds"], row["correlation_id"])
                    out.append(
                        Outgoing(row["task_id"], "cancel", topic, cancel_payload(row), props)
                    )
                elif row["status"] not in ("PENDING", "ASSIGNED"):
                    out.append(Outgoing(row["task_id"], "skip"))
                elif row["expired"]:
                    if row["status"] == "PENDING":
                        expired.append(row["task_id"])
                    # An ASSIGNED one reached the agent, which will not start it now;
                    # the timeout sweep ends it if the agent says nothing.
                    out.append(Outgoing(row["task_id"], "skip"))
                else:
                    try:
                        payload = command_payload(row)
                    except (PayloadError, ValueError) as exc:
                        await self._unpublishable(conn, row, str(exc))
                        out.append(Outgoing(row["task_id"], "skip"))
                        continue
                    props = _properties(row["expiry_s"], row["correlation_id"])
                    out.append(Outgoing(row["task_id"], "command", topic, payload, props))
            sending = [m for m in out if m.what != "skip"]
            acked = (
                await asyncio.to_thread(
                    _publish_all, self.ingest, sending, PUBACK_TIMEOUT_S, self.abort
                )
                if sending
                else []
            )
            ok = {m.task_id for m, a in zip(sending, acked, strict=True) if a}
            done = [m for m in out if m.what == "skip" or m.task_id in ok]
            if done:
                await conn.execute(
                    _DONE,
                    {
                        "ids": [m.task_id for m in done],
                        "what": [m.what for m in done],
                        "redelivery": self.settings.task_redelivery_s,
                    },
                )
            if expired:
                await conn.execute(_EXPIRE, {"ids": expired})
                metrics.TASKS_SWEPT.labels("EXPIRED").inc(len(expired))
        for m in sending:
            if m.task_id in ok:
                metrics.TASKS_PUBLISHED.labels(m.what).inc()
        if len(ok) < len(sending):
            metrics.OUTBOX_FAILURES.inc()
            log.warning(
                "the broker did not acknowledge every task message; they stay due",
                extra={"sent": len(sending), "acknowledged": len(ok)},
            )
        return len(rows)

    async def _unpublishable(
        self, conn: psycopg.AsyncConnection[Any], row: dict[str, Any], why: str
    ) -> None:
        # Only a writer that bypassed the CLI's checks gets here (e.g. a payload over the
        # size limit): say so in the task's history rather than retry forever.
        reason = f"unpublishable: {' '.join(why.split())[:300]}"
        await conn.execute(_UNPUBLISHABLE, {"id": row["task_id"], "reason": reason})
        log.error("task cannot be published", extra={"task_id": str(row["task_id"]), "why": why})

    async def run(self) -> None:
        listener = asyncio.create_task(listen(self.settings.database_url, self.wake))
        try:
            while True:
                self.wake.clear()
                more = False
                if self.ingest.connected:
                    try:
                        more = await self.round() >= BATCH
                    except (psycopg.Error, OSError) as exc:
                        metrics.OUTBOX_FAILURES.inc()
                        log.warning(
                            "outbox round failed; retrying",
                            extra={"error": " ".join(str(exc).split())[:300]},
                        )
                if stop_requested():
                    raise asyncio.CancelledError
                if more:
                    continue
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a
                # cancellation that lands as the event is set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await self.wake.wait()
        finally:
            self.abort.set()
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await self.db.close()


async def listen(database_url: str, wake: asyncio.Event) -> None:
    """Set `wake` on every NOTIFY eucora_outbox; reconnect when the database goes away
    (the poll keeps the outbox going meanwhile)."""
    delay = 0.5
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                database_url, autocommit=True, connect_timeout=5
            ) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                delay = 0.5
                wake.set()  # anything written while we were not listening
                async for _ in conn.notifies():
                    wake.set()
        except (psycopg.Error, OSError) as exc:
            log.info("outbox listener reconnecting", extra={"error": str(exc)[:200]})
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


async def outbox_worker(settings: Settings, pool: AsyncConnectionPool, ingest: Ingest) -> None:
    await Outbox(settings, pool, ingest).run()
