"""Writes a batch of validated messages in one transaction.

Telemetry goes through binary COPY into a session-local staging table, then
`INSERT ... ON CONFLICT DO NOTHING` into `telemetry`, so a redelivered or replayed
sample is stored once (the key is (agent_id, time)). Heartbeats and every other valid
message refresh the agent's last_seen; invalid messages become dead letters. The
caller acknowledges the batch only after `flush` returns, i.e. after COMMIT.

A batch that fails for a reason in the data rather than the connection (a value
PostgreSQL refuses) is retried message by message, so one poisonous message is
dead-lettered instead of stalling the stream.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from schemas.payloads import TelemetrySample
from schemas.topics import Kind
from schemas.validate import telemetry_samples
from service.bridge import metrics

if TYPE_CHECKING:
    from service.bridge.ingest import Inbound

log = logging.getLogger("eucora.bridge.store")

DEAD_LETTER_PAYLOAD_MAX = 4096
_TELEMETRY_COLS = (
    "time, agent_id, cpu_percent, memory_percent, disk_percent, net_rx_bytes, net_tx_bytes,"
    " correlation_id"
)
_TELEMETRY_TYPES = ["timestamptz", "text", "float8", "float8", "float8", "int8", "int8", "text"]
_DEAD_COLS = "topic, agent_id, kind, reason, detail, payload, payload_size"
_DEAD_TYPES = ["text", "text", "text", "text", "text", "bytea", "int4"]

# Per-kind handlers for the low-rate kinds (registration, status, inventory, task and
# deployment reports): each runs inside the batch's transaction, in its own savepoint.
Handler = Callable[["psycopg.AsyncConnection[Any]", "Inbound"], Awaitable[None]]
HANDLERS: dict[Kind, Handler] = {}


def handles(kind: Kind) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn

    return register


class Rejected(Exception):
    """Raised by a handler, before it writes anything, for a valid message that cannot
    be applied (e.g. a report on an unknown task): the message becomes a dead letter
    with this reason, and the rest of the batch is stored as usual."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _telemetry_row(agent_id: str, s: TelemetrySample) -> tuple[Any, ...]:
    return (
        s.ts, agent_id, s.cpu_percent, s.memory_percent, s.disk_percent,
        s.net_rx_bytes, s.net_tx_bytes, s.correlation_id,
    )  # fmt: skip


def _is_data_error(exc: BaseException) -> bool:
    """True when retrying the same rows cannot succeed (vs a lost connection)."""
    return isinstance(exc, psycopg.Error) and not isinstance(
        exc, psycopg.OperationalError | psycopg.InterfaceError
    )


class Store:
    """Writers of batches. Each writer has its own connection (its staging table lives
    with it); with two, one batch is copied while the other waits for its commit's
    fsync, which is most of a small batch's time."""

    def __init__(
        self,
        database_url: str,
        writers: int = 2,
        touch_interval: float = 5.0,
    ):
        self.url = database_url
        self.writers = writers
        self._idle: list[psycopg.AsyncConnection[Any]] = []
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

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self.url, connect_timeout=5)
        # No key and no index: COPY into it runs at full speed. Its rows go at every
        # COMMIT (a cheap in-place truncate); the table stays.
        await conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS telemetry_stage"
            " (LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.commit()
        return conn

    async def _take(self) -> psycopg.AsyncConnection[Any]:
        while self._idle:
            conn = self._idle.pop()
            if not (conn.closed or conn.broken):
                return conn
        return await self._connect()

    def _give(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if not (conn.closed or conn.broken) and len(self._idle) < self.writers:
            self._idle.append(conn)

    async def flush(self, batch: Sequence[Inbound]) -> None:
        """Store the batch in one transaction; raise on a connection problem."""
        started = time.perf_counter()
        conn = await self._take()
        try:
            try:
                dead = await self._write(conn, batch)
            except psycopg.Error as exc:
                await _rollback(conn)
                if not _is_data_error(exc):
                    raise
                log.warning(
                    "batch refused by the database; storing message by message",
                    extra={"error": " ".join(str(exc).split())[:300]},
                )
                dead = await self._write_each(conn, batch)
        finally:
            self._give(conn)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        stored = Counter(i.kind.value for i in batch if i.error is None and i.kind is not None)
        for kind, n in stored.items():
            metrics.STORED.labels(kind).inc(n)
        for reason, n in Counter(dead).items():
            metrics.DEAD_LETTERS.labels(reason).inc(n)

    async def _write_each(
        self, conn: psycopg.AsyncConnection[Any], batch: Sequence[Inbound]
    ) -> list[str]:
        reasons: list[str] = []
        for item in batch:
            try:
                reasons += await self._write(conn, [item])
            except psycopg.Error as exc:
                await _rollback(conn)
                if not _is_data_error(exc):
                    raise
                reasons += await self._write(conn, [], poison=[(item, exc)])
        return reasons

    async def _write(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: Sequence[Inbound],
        poison: Sequence[tuple[Inbound, BaseException]] = (),
    ) -> list[str]:
        """One transaction for the batch; returns the dead-letter reasons written."""
        telemetry: list[tuple[Any, ...]] = []
        seen: dict[str, list[bool]] = {}  # agent -> [heartbeat?, telemetry?]
        others: list[Inbound] = []
        dead: list[tuple[Any, ...]] = []
        for item in batch:
            if item.error is not None:
                dead.append(_dead_row(item, item.error.reason, item.error.detail))
                if item.error.reason == "identity":
                    metrics.IDENTITY_VIOLATIONS.inc()
                continue
            assert item.agent_id is not None and item.kind is not None
            flags = seen.setdefault(item.agent_id, [False, False])
            if item.kind is Kind.TELEMETRY:
                flags[1] = True
                telemetry.extend(
                    _telemetry_row(item.agent_id, s) for s in telemetry_samples(item.model)
                )
            elif item.kind is Kind.HEARTBEAT:
                flags[0] = True
            else:
                others.append(item)
        for item, exc in poison:
            dead.append(_dead_row(item, "storage", " ".join(str(exc).split())[:500]))
        # Agents with a message for a handler are always locked here (see below); the
        # others only when their last refresh is old or said less than this batch.
        needed = {i.agent_id for i in others}
        now = time.monotonic()
        for agent_id, (hb, tel) in list(seen.items()):
            when, had_hb, had_tel = self._touched.get(agent_id, (-1e18, False, False))
            fresh = now - when < self.touch_interval and had_hb >= hb and had_tel >= tel
            if fresh and agent_id not in needed:
                del seen[agent_id]

        async with conn.transaction():
            # First, and in sorted order: every writer (of this bridge or another) locks
            # the agents it will touch the same way before the handlers lock rows message
            # by message, so two concurrent batches cannot deadlock. (Agents left out
            # above have no row locked in this transaction at all.)
            if seen:
                await _touch_agents(conn, seen)
            if telemetry:
                await _copy_telemetry(conn, telemetry)
            for item in others:
                handler = HANDLERS.get(item.kind)  # type: ignore[arg-type]
                if handler is not None:
                    try:
                        await handler(conn, item)
                    except Rejected as exc:
                        dead.append(_dead_row(item, exc.reason, exc.detail))
            if dead:
                async with conn.cursor().copy(
                    f"COPY dead_letters ({_DEAD_COLS}) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(_DEAD_TYPES)
                    for row in dead:
                        await copy.write_row(row)
        for agent_id, (hb, tel) in seen.items():
            self._touched[agent_id] = (now, hb, tel)
        return [row[3] for row in dead]


async def _rollback(conn: psycopg.AsyncConnection[Any]) -> None:
    try:
        await conn.rollback()
    except psycopg.Error:
        await conn.close()


async def _touch_agents(conn: psycopg.AsyncConnection[Any], seen: dict[str, list[bool]]) -> None:
    # Sorted, so two bridges updating the same agents lock them in the same order.
    ids = sorted(seen)
    await conn.execute(
        """
        INSERT INTO agents AS a (agent_id, last_seen, last_heartbeat_at, last_telemetry_at)
        SELECT id, now(), CASE WHEN hb THEN now() END, CASE WHEN tel THEN now() END
          FROM unnest(%s::text[], %s::bool[], %s::bool[]) AS u(id, hb, tel)
        ON CONFLICT (agent_id) DO UPDATE SET
            last_seen = now(),
            last_heartbeat_at = coalesce(EXCLUDED.last_heartbeat_at, a.last_heartbeat_at),
            last_telemetry_at = coalesce(EXCLUDED.last_telemetry_at, a.last_telemetry_at),
            stale = false
        """,
        (ids, [seen[i][0] for i in ids], [seen[i][1] for i in ids]),
    )


async def _copy_telemetry(conn: psycopg.AsyncConnection[Any], rows: list[tuple[Any, ...]]) -> None:
    async with conn.cursor() as cur:
        async with cur.copy(
            f"COPY telemetry_stage ({_TELEMETRY_COLS}) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(_TELEMETRY_TYPES)
            for row in rows:
                await copy.write_row(row)
        await cur.execute(
            f"INSERT INTO telemetry ({_TELEMETRY_COLS}) SELECT {_TELEMETRY_COLS}"
            " FROM telemetry_stage ON CONFLICT DO NOTHING"
        )
        inserted = max(cur.rowcount, 0)
    metrics.ROWS.labels("telemetry").inc(inserted)
    metrics.DUPLICATES.inc(len(rows) - inserted)


def _dead_row(item: Inbound, reason: str, detail: str) -> tuple[Any, ...]:
    payload = bytes(item.payload)
    return (
        item.topic[:1024], item.agent_id, item.kind.value if item.kind else None, reason,
        detail, payload[:DEAD_LETTER_PAYLOAD_MAX], len(payload),
    )  # fmt: skip
