"""The rollout engine: drives every active deployment a step at a time.

Each step runs in one transaction with the deployment's row locked (FOR UPDATE SKIP
LOCKED): with several bridges, exactly one drives a given deployment at any moment,
and whichever bridge comes next goes on from the database's state, so a restart or a
bridge killed mid-rollout changes nothing but a pause. The rules are the deployment
domain's (service/domains/deployments.py `step`).

It wakes on NOTIFY (schemas.constants.DEPLOYMENTS_CHANNEL: a deployment created or
aborted, an agent's report, a DEPLOY task ended) and every `interval_s` besides, which
is also the rate's resolution.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import psycopg

from schemas.constants import DEPLOYMENTS_CHANNEL
from service.db.connect import OwnConnection, listen
from service.domains import deployments

log = logging.getLogger("eucora.bridge.rollouts")


class RolloutEngine:
    def __init__(self, database_url: str, interval_s: float = 0.5) -> None:
        self.database_url = database_url
        self.interval_s = interval_s
        self.db = OwnConnection(database_url, application_name="eucora-bridge-rollouts")
        self.wake = asyncio.Event()

    async def round(self) -> int:
        """One step of every active deployment this bridge can lock; returns how many."""
        done: list[uuid.UUID] = []
        conn = await self.db.get()
        while True:
            async with conn.transaction():
                d = await deployments.claim_active(conn, done)
                if d is None:
                    return len(done)
                done.append(d["deployment_id"])
                await deployments.step(conn, d, d["db_now"])

    async def run(self) -> None:
        listener = asyncio.create_task(listen(self.database_url, DEPLOYMENTS_CHANNEL, self.wake))
        try:
            while True:
                self.wake.clear()
                try:
                    await self.round()
                except (psycopg.Error, OSError) as exc:
                    log.warning(
                        "rollout round failed; retrying",
                        extra={"error": " ".join(str(exc).split())[:300]},
                    )
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # a cancellation lost by 3.11
                    raise asyncio.CancelledError
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_s):
                        await self.wake.wait()
                # Coalesce a burst of notifications (one per agent report) into a step.
                await asyncio.sleep(0.05)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await self.db.close()
