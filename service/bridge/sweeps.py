"""The bridge's periodic sweeps: stale agents, and task TIMEOUT/EXPIRED.

Each runs from the database's state alone (so it survives restarts of the bridge), on
a connection of its own, and is safe with several bridges sweeping at once (the
domains claim rows with SKIP LOCKED). The rules are the domains': agents.mark_stale,
tasks.sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from service.db.connect import OwnConnection
from service.domains import agents, tasks

log = logging.getLogger("eucora.bridge.sweeps")

Conn = psycopg.AsyncConnection[Any]


def stale_interval(offline_after_s: float) -> float:
    """A quarter of the period (a stale agent is flagged within 1.25 x offline_after),
    kept between 0.5 s and 60 s."""
    return min(max(offline_after_s / 4, 0.5), 60.0)


async def periodically(
    name: str, database_url: str, interval_s: float, work: Callable[[Conn], Awaitable[Any]]
) -> None:
    """Run `work` in a transaction every `interval_s`, until cancelled; a database that
    is away is tried again next round."""
    db = OwnConnection(database_url)
    try:
        while True:
            try:
                conn = await db.get()
                async with conn.transaction():
                    result = await work(conn)
                if result:
                    log.info("sweep", extra={"sweep": name, "result": result})
            except (psycopg.Error, OSError) as exc:
                log.warning(
                    "sweep failed", extra={"sweep": name, "error": " ".join(str(exc).split())[:300]}
                )
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # a cancellation lost by 3.11
                raise asyncio.CancelledError
            await asyncio.sleep(interval_s)
    finally:
        await db.close()


async def stale_sweeper(database_url: str, offline_after_s: float) -> None:
    async def work(conn: Conn) -> int:
        return await agents.mark_stale(conn, offline_after_s)

    await periodically("stale", database_url, stale_interval(offline_after_s), work)


async def task_sweeper(database_url: str, interval_s: float) -> None:
    async def work(conn: Conn) -> dict[str, int]:
        counts = await tasks.sweep(conn)
        return {k: v for k, v in counts.items() if v}

    await periodically("tasks", database_url, interval_s, work)
