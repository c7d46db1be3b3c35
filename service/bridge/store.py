"""Writes a batch of validated messages in one transaction (docs/ingest.md).

In order, inside one transaction:
  1. lock (touch) every agent the batch concerns, in sorted order: last_seen, and the
     deadlock-free order for everything after (see service/domains/agents.py);
  2. telemetry samples of the whole batch with one COPY (service/domains/telemetry.py);
  3. the other messages, each kind's all at once through its route (routes.py);
  4. dead letters: invalid messages, and messages their handler rejected or failed on.
     A payload naming another agent (identity) is a security event as well.
The caller acknowledges the batch only after `flush` returns, i.e. after COMMIT.

Failure isolation: a lost connection (psycopg.OperationalError / InterfaceError) is
raised, and the caller retries the whole batch. Anything else concerns a message, not
the stream. A handler that cannot apply a message raises `Rejected` before it writes
anything, so no savepoint is needed for it (a savepoint per message cost two round
trips and a fifth of the event loop's time at fleet scale). Any other failure rolls
the batch back, and it is written again message by message, each in a transaction of
its own: the failing message is dead-lettered (`internal_error`, or `storage` for values
the database refused) and never stalls the others.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import psycopg

from schemas.payloads import Heartbeat
from schemas.states import DeadLetterReason
from schemas.topics import Kind
from service import metrics
from service.bridge.message import Inbound
from service.bridge.routes import Reject, Routes
from service.db.connect import connect_async
from service.domains import agents, dead_letters, events, security, telemetry
from service.domains.dead_letters import DeadLetter

log = logging.getLogger("eucora.bridge.store")

Conn = psycopg.AsyncConnection[Any]


def is_connection_error(exc: BaseException) -> bool:
    """True when the database (or the way to it) failed, not the data: retry later."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError)


def _letter(item: Inbound, reason: str, detail: str) -> DeadLetter:
    return DeadLetter(
        item.topic, item.agent_id, item.kind.value if item.kind else None, reason, detail,
        bytes(item.payload),
    )  # fmt: skip


def _failure(exc: BaseException) -> tuple[DeadLetterReason, str]:
    reason = (
        DeadLetterReason.STORAGE
        if isinstance(exc, psycopg.Error)
        else DeadLetterReason.INTERNAL_ERROR
    )
    return reason, f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


class Store:
    """Writers of batches. Each writer has its own connection (its staging table lives
    with it); while one batch is copied, others wait for their commit's fsync or, for
    status and task reports, for one statement after another. Four: a fleet of 3,000
    reporting at once was all online in 31 s instead of 36 s with two, and its 6,000
    task reports stored in 23 s instead of 30 s (bench.fleet, docs/scale.md)."""

    def __init__(
        self, database_url: str, routes: Routes, *, writers: int = 4, touch_interval: float = 5.0
    ):
        self.url = database_url
        self.routes = routes
        self.writers = writers
        self._idle: list[Conn] = []
        # last_seen/last_*_at of an agent that only sends telemetry and heartbeats is
        # refreshed at most this often: updating (and so locking) its row in every batch
        # serialised the two writers and cost a statement per batch for nothing.
        self.touch_interval = touch_interval
        self._touched: dict[str, tuple[float, bool, bool]] = {}  # agent -> (when, hb, tel)

    async def open(self) -> None:
        self._idle.append(await self._connect())

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()

    async def _connect(self) -> Conn:
        conn = await connect_async(self.url, application_name="eucora-bridge-ingest")
        await telemetry.prepare(conn)
        await conn.commit()
        return conn

    async def _take(self) -> Conn:
        while self._idle:
            conn = self._idle.pop()
            if not (conn.closed or conn.broken):
                return conn
        return await self._connect()

    def _give(self, conn: Conn) -> None:
        if not (conn.closed or conn.broken) and len(self._idle) < self.writers:
            self._idle.append(conn)

    async def flush(self, batch: Sequence[Inbound]) -> None:
        """Store the batch in one transaction; raise only on a connection problem."""
        started = time.perf_counter()
        conn = await self._take()
        try:
            try:
                dead = await self._write(conn, batch)
            except Exception as exc:
                await _rollback(conn)
                if is_connection_error(exc):
                    raise
                log.warning(
                    "batch refused; storing message by message",
                    extra={"error": " ".join(str(exc).split())[:300]},
                )
                dead = await self._write_each(conn, batch)
        finally:
            self._give(conn)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        failed = set(dead)
        # Kind is a str enum: counted as is (Enum.value is a Python-level property).
        stored = Counter(
            i.kind for i in batch if i.error is None and i.kind is not None and id(i) not in failed
        )
        for kind, n in stored.items():
            metrics.STORED.labels(kind.value).inc(n)
        for reason, n in Counter(reason for reason in dead.values()).items():
            metrics.DEAD_LETTERS.labels(reason).inc(n)

    async def _write_each(self, conn: Conn, batch: Sequence[Inbound]) -> dict[int, str]:
        dead: dict[int, str] = {}
        for item in batch:
            try:
                dead |= await self._write(conn, [item])
            except Exception as exc:
                await _rollback(conn)
                if is_connection_error(exc):
                    raise
                log.error(
                    "message could not be stored; dead-lettered",
                    exc_info=True,
                    extra={"agent_id": item.agent_id, "topic": item.topic[:200]},
                )
                dead |= await self._write(conn, [], poison=[(item, *_failure(exc))])
        return dead

    async def _write(
        self,
        conn: Conn,
        batch: Sequence[Inbound],
        poison: Sequence[tuple[Inbound, str, str]] = (),
    ) -> dict[int, str]:
        """One transaction for the batch; returns {id(item): reason} of dead letters."""
        rows: list[telemetry.Row] = []
        seen: dict[str, list[bool]] = {}  # agent -> [heartbeat?, telemetry?]
        buffers: dict[str, tuple[int | None, int]] = {}  # agent -> its offline buffer's counts
        routed: list[Inbound] = []
        letters: list[DeadLetter] = []
        dead: dict[int, str] = {}
        mismatches: list[security.SecurityEvent] = []  # identity: also security events

        def reject(item: Inbound, reason: str, detail: str) -> None:
            letters.append(_letter(item, reason, detail))
            dead[id(item)] = reason

        for item in batch:
            if item.error is not None:
                reject(item, item.error.reason, item.error.detail)
                if item.error.reason == "identity":
                    metrics.IDENTITY_VIOLATIONS.inc()
                    mismatches.append((item.agent_id, {
                        "topic": item.topic[:1024],
                        "kind": item.kind.value if item.kind else None,
                        "detail": item.error.detail,
                    }))  # fmt: skip
                continue
            assert item.agent_id is not None and item.kind is not None
            flags = seen.get(item.agent_id)
            if flags is None:
                flags = seen[item.agent_id] = [False, False]
            if item.kind is Kind.TELEMETRY:
                flags[1] = True
                assert item.rows is not None
                rows += item.rows
            elif item.kind is Kind.HEARTBEAT:
                flags[0] = True
                beat = item.model
                if isinstance(beat, Heartbeat) and beat.dropped_samples is not None:
                    buffers[item.agent_id] = (beat.buffered_samples, beat.dropped_samples)
            else:
                routed.append(item)
        for item, reason, detail in poison:
            reject(item, reason, detail)
        # Agents with a routed message are always locked here (see above); the others
        # only when their last refresh is old or said less than this batch.
        # Those whose buffer counts are recorded too: their rows are then locked by the
        # sorted touch first, so two bridges never lock agents in different orders.
        needed = {i.agent_id for i in routed} | buffers.keys()
        now = time.monotonic()
        for agent_id, (hb, tel) in list(seen.items()):
            when, had_hb, had_tel = self._touched.get(agent_id, (-1e18, False, False))
            fresh = now - when < self.touch_interval and had_hb >= hb and had_tel >= tel
            if fresh and agent_id not in needed:
                del seen[agent_id]

        async with conn.transaction():
            if seen:
                await agents.touch(conn, {a: (f[0], f[1]) for a, f in seen.items()})
            if routed or letters:
                # The handlers' events number per agent: their locks in sorted order too.
                await events.lock_agents(
                    conn,
                    {i.agent_id for i in routed if i.agent_id}
                    | {x.agent_id for x in letters if x.agent_id},
                )
            if buffers:
                await agents.record_buffers(conn, buffers)
            if rows:
                inserted = await telemetry.store(conn, rows)
                metrics.ROWS.labels("telemetry").inc(inserted)
                metrics.DUPLICATES.inc(len(rows) - inserted)
            await self._route(conn, routed, reject)
            if letters:
                await dead_letters.write(conn, letters)
            if mismatches:
                await security.security_event_async(conn, "identity_mismatch", mismatches)
        for agent_id, (hb, tel) in seen.items():
            self._touched[agent_id] = (now, hb, tel)
        return dead

    async def _route(self, conn: Conn, routed: Sequence[Inbound], reject: Reject) -> None:
        """Each kind's messages to its handler, all at once, in the route table's order."""
        by_kind: dict[Kind, list[Inbound]] = {}
        for item in routed:
            assert item.kind is not None
            by_kind.setdefault(item.kind, []).append(item)
        for kind, items in by_kind.items():
            if kind not in self.routes.handlers:  # Routes refuses such a table; never ack silently
                for item in items:
                    reject(item, DeadLetterReason.UNSUPPORTED, f"no route for {kind.value}")
        for kind, handler in self.routes.handlers.items():
            if kind in by_kind:
                await handler(conn, by_kind[kind], reject)


async def _rollback(conn: Conn) -> None:
    try:
        await conn.rollback()
    except psycopg.Error:
        await conn.close()
