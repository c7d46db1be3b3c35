"""The bridge's periodic work: stale agents, task TIMEOUT/EXPIRED and event retention,
TimescaleDB chunks made ahead, its own heartbeat.

Each runs from the database's state alone (so it survives restarts of the bridge), on
a connection of its own, and is safe with several bridges sweeping at once (the
domains claim rows with SKIP LOCKED). The rules are the domains': agents.mark_stale,
tasks.sweep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from schemas.version import product_version
from service.db import chunks
from service.db.connect import OwnConnection, connect_async
from service.domains import agents, events, tasks

log = logging.getLogger("eucora.bridge.sweeps")

Conn = psycopg.AsyncConnection[Any]


def stale_interval(offline_after_s: float) -> float:
    """A quarter of the period (a stale agent is flagged within 1.25 x offline_after),
    kept between 0.5 s and 60 s."""
    return min(max(offline_after_s / 4, 0.5), 60.0)


async def periodically(
    name: str,
    database_url: str,
    interval_s: float,
    work: Callable[[Conn], Awaitable[Any]],
    *,
    transaction: bool = True,
) -> None:
    """Run `work` in a transaction (or, `transaction=False`, on the autocommit
    connection, to make its own) every `interval_s`, until cancelled; a database that
    is away is tried again next round."""
    db = OwnConnection(database_url)
    try:
        while True:
            try:
                conn = await db.get()
                if transaction:
                    async with conn.transaction():
                        result = await work(conn)
                else:
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


# How often the task sweeper also deletes events past retention (sooner while a
# backlog remains).
PRUNE_EVERY_S = 60.0


async def task_sweeper(database_url: str, interval_s: float) -> None:
    next_prune = 0.0

    async def work(conn: Conn) -> dict[str, int]:
        nonlocal next_prune
        counts = await tasks.sweep(conn)
        result = {k: v for k, v in counts.items() if v}
        if time.monotonic() >= next_prune:
            pruned = await events.prune(conn)
            next_prune = time.monotonic() + (0 if pruned >= events.PRUNE_BATCH else PRUNE_EVERY_S)
            if pruned:
                result["events_pruned"] = pruned
        return result

    await periodically("tasks", database_url, interval_s, work)


# TimescaleDB's chunks for now and the next day, made ahead (service/db/chunks.py).
CHUNKS_EVERY_S = 3600.0


async def chunk_sweeper(database_url: str) -> None:
    async def work(conn: Conn) -> dict[str, int]:
        made = await chunks.make_ahead(conn, datetime.now(UTC))
        return {"chunks_made": len(made)} if made else {}

    await periodically("chunks", database_url, CHUNKS_EVERY_S, work, transaction=False)


HEARTBEAT_S = 5.0
# `eucora status` calls a bridge reachable when its heartbeat is younger than this.
HEARTBEAT_FRESH_S = 3 * HEARTBEAT_S

_BEAT = """
INSERT INTO bridges AS b (client_id, hostname, pid, version, started_at, last_seen, ready, brokers)
VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(started)s, now(), %(ready)s, %(brokers)s)
ON CONFLICT (client_id) DO UPDATE SET
    hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, version = EXCLUDED.version,
    started_at = EXCLUDED.started_at, last_seen = now(), ready = EXCLUDED.ready,
    brokers = EXCLUDED.brokers
"""


async def heartbeat(
    database_url: str, client_id: str, state: Callable[[], tuple[bool, list[dict[str, Any]]]]
) -> None:
    """Say in the database, every HEARTBEAT_S, that this bridge runs and whether it is
    ready (`state()`: ready, and each broker link's url and connected flag)."""
    started = datetime.now(UTC)
    host = socket.gethostname()

    async def work(conn: Conn) -> None:
        ready, brokers = state()
        await conn.execute(
            _BEAT,
            {
                "id": client_id, "host": host, "pid": os.getpid(),
                "version": product_version(), "started": started, "ready": ready,
                "brokers": Jsonb(brokers),
            },
        )  # fmt: skip

    await periodically("heartbeat", database_url, HEARTBEAT_S, work)


class ClientIdTaken(Exception):
    """Another bridge with this client id is alive: str() is the line for the operator."""


def _alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


async def _beat_of(database_url: str, client_id: str) -> tuple[Any, ...] | None:
    """(hostname, pid, last_seen, fresh) of the row for client_id, or None."""
    async with await connect_async(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT hostname, pid, last_seen,"
            " last_seen > now() - make_interval(secs => %s) AS fresh"
            " FROM bridges WHERE client_id = %s",
            (HEARTBEAT_FRESH_S, client_id),
        )
        return await cur.fetchone()


async def claim_client_id(database_url: str, client_id: str, watch_s: float = HEARTBEAT_S) -> None:
    """Raise ClientIdTaken when another bridge with `client_id` is running: two of them
    would take the broker session from each other every second.

    The rule never blocks a restart, even after kill -9: a heartbeat older than
    HEARTBEAT_FRESH_S belongs to no one; on this host, a pid that no longer exists (or
    is ours) is gone; otherwise the heartbeat is watched for `watch_s` plus a margin
    and only one that moves belongs to a running bridge (a dead one cannot write)."""
    row = await _beat_of(database_url, client_id)
    if row is None or not row[3]:
        return
    host, pid, seen, _ = row
    if host == socket.gethostname() and (pid == os.getpid() or not _alive_here(pid)):
        return
    log.info(
        "another bridge with this client id looks alive; watching its heartbeat",
        extra={"client_id": client_id, "hostname": host, "pid": pid},
    )
    await asyncio.sleep(watch_s * 1.5)
    again = await _beat_of(database_url, client_id)
    if again is None or again[2] == seen:
        return
    host, pid, seen, _ = again
    raise ClientIdTaken(
        f"a bridge with client id {client_id} is already running on {host} pid {pid}"
        f" (last seen {seen.astimezone(UTC).isoformat(timespec='seconds')});"
        " give this one another EUCORA_BRIDGE_CLIENT_ID"
    )


async def last_heartbeat(database_url: str, client_id: str) -> None:
    """On a clean stop: not ready any more (status need not wait for the heartbeat to age)."""
    async with await connect_async(database_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE bridges SET ready = false, last_seen = now() WHERE client_id = %s", (client_id,)
        )
