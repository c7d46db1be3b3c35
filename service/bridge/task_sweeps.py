"""The task sweeps: TIMEOUT and EXPIRED, set by the server (SPEC "Tasks"; docs/tasks.md).

- TIMEOUT: IN_PROGRESS for longer than timeout_seconds since started_at, or ASSIGNED
  for longer than timeout_seconds since assigned_at (received, never started: the
  agent went silent). The agent is told to stop (cancel through the outbox), since
  whatever it still does no longer counts.
- EXPIRED: still PENDING (never acknowledged by the agent) at expires_at. Nothing is
  sent: the broker drops the queued copy at its message expiry, and an agent checks
  expires_at before it starts anything.

Both run from the database's state alone, so they survive restarts of the bridge;
with several bridges, rows are claimed with FOR UPDATE SKIP LOCKED and re-checked
under the lock, so each transition is recorded once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from service.bridge import metrics
from service.bridge.outbox import CHANNEL, DEFAULT_EXPIRY_SQL, OwnConnection, stop_requested
from service.config import Settings

if TYPE_CHECKING:
    from service.bridge.ingest import Ingest

log = logging.getLogger("eucora.bridge.task_sweeps")

_TIMEOUT = """
WITH due AS (
    SELECT task_id, status FROM tasks
     WHERE status IN ('ASSIGNED', 'IN_PROGRESS')
       AND CASE WHEN status = 'IN_PROGRESS'
                THEN coalesce(started_at, assigned_at, updated_at)
                ELSE coalesce(assigned_at, updated_at) END
           + make_interval(secs => timeout_seconds) <= now()
     ORDER BY task_id
     FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE tasks t SET status = 'TIMEOUT', finished_at = now(), updated_at = now(),
           error = coalesce(t.error, 'no outcome within ' || t.timeout_seconds
                                     || ' s after it was ' || lower(due.status)),
           cancel_requested = true, next_publish_at = now()
      FROM due WHERE t.task_id = due.task_id
    RETURNING t.task_id, t.agent_id, t.correlation_id, due.status AS previous, t.timeout_seconds
)
INSERT INTO task_events
    (time, task_id, agent_id, status, previous_status, source, correlation_id, reason)
SELECT clock_timestamp(), task_id, agent_id, 'TIMEOUT', previous, 'server', correlation_id,
       'timeout: ' || timeout_seconds || ' s'
  FROM moved
"""

_EXPIRED = f"""
WITH due AS (
    SELECT task_id FROM tasks
     WHERE status = 'PENDING'
       AND coalesce(expires_at, created_at + {DEFAULT_EXPIRY_SQL}) <= now()
     ORDER BY task_id
     FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE tasks t SET status = 'EXPIRED', finished_at = now(), updated_at = now(),
           error = coalesce(t.error, 'not delivered before expires_at'), next_publish_at = NULL
      FROM due WHERE t.task_id = due.task_id
    RETURNING t.task_id, t.agent_id, t.correlation_id
)
INSERT INTO task_events
    (time, task_id, agent_id, status, previous_status, source, correlation_id, reason)
SELECT clock_timestamp(), task_id, agent_id, 'EXPIRED', 'PENDING', 'server', correlation_id,
       'expired before delivery'
  FROM moved
"""


async def sweep_tasks(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    """One pass of both sweeps in the caller's transaction; counts per new status."""
    timed_out = max((await conn.execute(_TIMEOUT)).rowcount, 0)
    expired = max((await conn.execute(_EXPIRED)).rowcount, 0)
    if timed_out:
        # The cancels are owed now: wake the outbox rather than wait for its poll.
        await conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
    return {"TIMEOUT": timed_out, "EXPIRED": expired}


async def task_sweeper(settings: Settings, pool: AsyncConnectionPool, ingest: Ingest) -> None:
    db = OwnConnection(settings.database_url)
    try:
        while True:
            try:
                conn = await db.get()
                async with conn.transaction():
                    counts = await sweep_tasks(conn)
                for status, n in counts.items():
                    if n:
                        metrics.TASKS_SWEPT.labels(status).inc(n)
                        log.info("tasks swept", extra={"status": status, "count": n})
            except (psycopg.Error, OSError) as exc:
                log.warning("task sweep failed", extra={"error": " ".join(str(exc).split())[:300]})
            if stop_requested():
                raise asyncio.CancelledError
            await asyncio.sleep(settings.task_sweep_interval_s)
    finally:
        await db.close()
