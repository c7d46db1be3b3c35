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

The worker wakes on NOTIFY (schemas.constants.OUTBOX_CHANNEL, sent in the same
transaction by whoever makes a message owed) and polls every second besides. The SQL
is the task domain's (service/domains/tasks.py); this module only publishes, through
the broker link it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from schemas.constants import OUTBOX_CHANNEL
from schemas.payloads import TaskCancel, TaskCommand
from schemas.states import UNSTARTED, TaskStatus
from schemas.topics import Kind, TopicTree
from schemas.validate import PayloadError, dump
from service import metrics
from service.bridge.brokers import BrokerSet
from service.db.connect import OwnConnection, listen
from service.domains import tasks

log = logging.getLogger("eucora.bridge.outbox")

POLL_S: Final = 1.0
BACKLOG_EVERY_S: Final = 5.0  # how often the backlog gauge is counted
BATCH: Final = 200  # rows per claim: short transactions, row locks held briefly
PUBACK_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    task_id: Any
    agent_id: str
    broker_id: int | None
    what: str  # "command" | "cancel" | "skip" (nothing owed any more: clear the row)
    topic: str = ""
    payload: bytes = b""
    properties: Properties | None = None


def stop_requested() -> bool:
    """Whether this task was cancelled, even if the CancelledError got lost: on Python
    3.11 asyncio.wait_for swallows a cancellation that lands just as what it waits for
    completes. The request count survives it, so the worker loops check it too."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


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


class Outbox:
    """Publishes what the tasks table says is owed, each task through its agent's home
    broker's link; rows of agents whose broker is down are not claimed."""

    def __init__(
        self,
        database_url: str,
        brokers: BrokerSet,
        tree: TopicTree,
        *,
        redelivery_s: float,
    ) -> None:
        self.database_url = database_url
        self.db = OwnConnection(database_url)
        self.brokers = brokers
        self.tree = tree
        self.redelivery_s = redelivery_s
        self.wake = asyncio.Event()
        self._counted_at = -BACKLOG_EVERY_S  # the first round counts

    def _outgoing(self, row: dict[str, Any]) -> Outgoing | str:
        """The message a claimed row owes, or why it owes none."""
        topic = self.tree.agent(row["agent_id"], Kind.TASKS)
        if row["cancel_requested"]:
            props = _properties(row["timeout_seconds"], row["correlation_id"])
            return Outgoing(
                row["task_id"], row["agent_id"], row["broker_id"], "cancel", topic,
                cancel_payload(row), props,
            )  # fmt: skip
        if TaskStatus(row["status"]) not in UNSTARTED:
            return Outgoing(row["task_id"], row["agent_id"], row["broker_id"], "skip")
        if row["expired"]:
            # A PENDING one becomes EXPIRED below; an ASSIGNED one reached the agent,
            # which will not start it now: the timeout sweep ends it if the agent is silent.
            return "expired"
        try:
            payload = command_payload(row)
        except (PayloadError, ValueError) as exc:
            return f"unpublishable: {exc}"
        props = _properties(row["expiry_s"], row["correlation_id"])
        return Outgoing(
            row["task_id"], row["agent_id"], row["broker_id"], "command", topic, payload, props
        )

    async def round(self, limit: int = BATCH) -> int:
        """Claim, publish and record up to `limit` due rows; returns how many were claimed."""
        up = self.brokers.connected_ids()
        if up == []:
            return 0  # no broker to publish to: nothing claimed, nothing counted
        conn = await self.db.get()
        async with conn.transaction():
            rows = await tasks.claim_due(conn, limit, up, self.brokers.default_id)
            if not rows:
                return 0
            out: list[Outgoing] = []
            expired: list[Any] = []
            for row in rows:
                outgoing = self._outgoing(row)
                if isinstance(outgoing, Outgoing):
                    out.append(outgoing)
                    continue
                if outgoing == "expired":
                    if row["status"] == TaskStatus.PENDING:
                        expired.append(row["task_id"])
                else:
                    await tasks.mark_unpublishable(conn, row, outgoing)
                out.append(Outgoing(row["task_id"], row["agent_id"], row["broker_id"], "skip"))
            sending = [m for m in out if m.what != "skip"]
            acked = await asyncio.gather(*(self._publish(m) for m in sending))
            ok = {m.task_id for m, a in zip(sending, acked, strict=True) if a}
            await tasks.mark_sent(
                conn,
                [(m.task_id, m.what) for m in out if m.what == "skip" or m.task_id in ok],
                self.redelivery_s,
            )
            if expired:
                n = await tasks.expire(conn, expired)
                metrics.TASKS_SWEPT.labels(TaskStatus.EXPIRED.value).inc(n)
        by_id = {row["task_id"]: row for row in rows}
        for m in sending:
            if m.task_id in ok:
                metrics.TASKS_PUBLISHED.labels(m.what).inc()
                fields = tasks.task_log_fields(by_id[m.task_id])
                log.info("task message published", extra={**fields, "what": m.what})
        if len(ok) < len(sending):
            metrics.OUTBOX_FAILURES.inc()
            log.warning(
                "the broker did not acknowledge every task message; they stay due",
                extra={"sent": len(sending), "acknowledged": len(ok)},
            )
        return len(rows)

    async def _publish(self, m: Outgoing) -> bool:
        link = self.brokers.link_for(m.broker_id)
        if link is None:  # a broker registered since the bridge started: not linked yet
            return False
        return await link.publish(
            m.topic, m.payload, properties=m.properties, timeout=PUBACK_TIMEOUT_S
        )

    async def _count_backlog(self) -> None:
        """The backlog gauge, at most every BACKLOG_EVERY_S (a count is not free)."""
        now = time.monotonic()
        if now - self._counted_at >= BACKLOG_EVERY_S:
            self._counted_at = now
            metrics.OUTBOX_BACKLOG.set(await tasks.count_due(await self.db.get()))

    async def run(self) -> None:
        listener = asyncio.create_task(listen(self.database_url, OUTBOX_CHANNEL, self.wake))
        try:
            while True:
                self.wake.clear()
                more = False
                try:
                    await self._count_backlog()
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
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await self.db.close()
