"""The stale sweep: agents whose status says online but that sent nothing for
`offline_after` are marked stale (SPEC "Online status": stale-offline).

Any message from the agent clears the flag again (store._touch_agents). Several
bridges may sweep at once: rows are claimed with FOR UPDATE SKIP LOCKED and re-checked
after the lock, so each stale transition is recorded exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from service.config import Settings

if TYPE_CHECKING:
    from service.bridge.ingest import Ingest

log = logging.getLogger("eucora.bridge.sweeper")

MARKED_STALE = Counter("eucora_agents_marked_stale", "Online agents marked stale by the sweep")

_SWEEP = """
WITH due AS (
    SELECT agent_id FROM agents
     WHERE status = 'online' AND NOT stale
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
"""


def sweep_interval(offline_after_s: float) -> float:
    """A quarter of the period (a stale agent is flagged within 1.25 x offline_after),
    kept between 0.5 s and 60 s."""
    return min(max(offline_after_s / 4, 0.5), 60.0)


async def sweep_once(conn: psycopg.AsyncConnection[Any], offline_after_s: float) -> int:
    """Mark what is due; returns how many agents became stale. The caller commits."""
    cur = await conn.execute(
        _SWEEP,
        {"after": offline_after_s, "reason": f"nothing received for {offline_after_s:g} s"},
    )
    return max(cur.rowcount, 0)


async def stale_sweeper(settings: Settings, pool: AsyncConnectionPool, ingest: Ingest) -> None:
    interval = sweep_interval(settings.offline_after_s)
    while True:
        try:
            async with pool.connection() as conn:
                marked = await sweep_once(conn, settings.offline_after_s)
            if marked:
                MARKED_STALE.inc(marked)
                log.info("agents marked stale", extra={"count": marked})
        except (psycopg.Error, OSError) as exc:
            # The database may be away; ingest reports that too. Try again next round.
            log.warning("stale sweep failed", extra={"error": " ".join(str(exc).split())[:300]})
        await asyncio.sleep(interval)
