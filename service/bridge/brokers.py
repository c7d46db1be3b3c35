"""The bridge's links to every broker shard, keyed by broker id (docs/scale.md).

With rows in the `brokers` table the bridge holds one link per registered broker, all
with its own account (every broker reads the same account files); without rows, the
one broker of EUCORA_MQTT_URL (key None). Ingest consumes from every link; the outbox
publishes each task through its agent's home broker's link and claims nothing for a
broker whose link is down, so a broker that goes away stalls only its own agents.

A broker registered later (`eucora stack up --brokers N+1`) is picked up by `run`
within REFRESH_S, without a restart; a broker that is down when the bridge starts is
retried in the background instead of holding the others back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import psycopg

from schemas.config import MqttUrl
from service.bridge.link import BrokerLink
from service.db.connect import connect_async
from service.domains import brokers
from service.mqtt import MqttConnectError

log = logging.getLogger("eucora.bridge.brokers")

REFRESH_S: Final = 10.0
RETRY_MAX_S: Final = 30.0

# Builds a link for a URL (the composition root knows the client id, CA and limits).
MakeLink = Callable[[MqttUrl], BrokerLink]


class BrokerSet:
    def __init__(self, database_url: str, credentials: MqttUrl, make_link: MakeLink) -> None:
        self.database_url = database_url
        self.credentials = credentials
        self.make_link = make_link
        self.links: dict[int | None, BrokerLink] = {}
        self.default_id: int | None = None  # the home of agents without one recorded
        self.on_new_link: Callable[[BrokerLink], None] = lambda link: None
        self._connecting: set[asyncio.Task[None]] = set()
        self._told_restart = False

    # --- what the outbox asks ------------------------------------------------------
    def link_for(self, broker_id: int | None) -> BrokerLink | None:
        if None in self.links:  # the one broker of EUCORA_MQTT_URL: home to every agent
            return self.links[None]
        return self.links.get(broker_id if broker_id is not None else self.default_id)

    def connected_ids(self) -> list[int] | None:
        """The broker ids whose link is up; None when the bridge has the single broker
        of EUCORA_MQTT_URL and it is up (then every agent's home is that one)."""
        if None in self.links:
            return None if self.links[None].connected else []
        return [bid for bid, link in self.links.items() if bid is not None and link.connected]

    @property
    def all_connected(self) -> bool:
        return bool(self.links) and all(link.connected for link in self.links.values())

    # --- building -----------------------------------------------------------------
    async def load(self) -> list[BrokerLink]:
        """Read the brokers table; make a link for each broker not linked yet. Returns
        the new links (not started)."""
        async with await connect_async(self.database_url) as conn:
            records = await brokers.load(conn)
        new: list[BrokerLink] = []
        if not records:
            if not self.links:
                self.links[None] = link = self.make_link(self.credentials)
                new.append(link)
            return new
        if None in self.links:
            # The table was empty at start: the broker of EUCORA_MQTT_URL serves every
            # agent. That stays right for one registered broker; more need a restart.
            if len(records) > 1 and not self._told_restart:
                self._told_restart = True
                log.warning("broker shards were registered after the bridge started: restart"
                            " it to link them")  # fmt: skip
            return new
        self.default_id = records[0].broker_id
        for record in records:
            if record.broker_id not in self.links:
                url = brokers.with_credentials(record, self.credentials)
                self.links[record.broker_id] = link = self.make_link(url)
                new.append(link)
        return new

    def keep_connecting(self, link: BrokerLink) -> None:
        """Retry a link that never connected, in the background, with back-off."""
        task = asyncio.create_task(self._retry(link), name=f"connect {link}")
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _retry(self, link: BrokerLink) -> None:
        delay = 1.0
        while True:
            try:
                await link.start()
                log.info("broker link up", extra={"broker": str(link)})
                return
            except (MqttConnectError, TimeoutError, OSError) as exc:
                if isinstance(exc, MqttConnectError) and exc.fatal:
                    log.error("broker refused the bridge", extra={"broker": str(link),
                                                                  "error": str(exc)})  # fmt: skip
                log.warning(
                    "broker unreachable, retrying", extra={"broker": str(link), "error": str(exc)}
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def run(self) -> None:
        """Pick up brokers registered later."""
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                new = await self.load()
            except (psycopg.Error, OSError) as exc:
                log.warning("cannot read the brokers table", extra={"error": str(exc)})
                continue
            for link in new:
                log.info("a new broker was registered: linking it", extra={"broker": str(link)})
                self.on_new_link(link)
                self.keep_connecting(link)

    async def close(self) -> None:
        for task in self._connecting:
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        for link in self.links.values():
            await link.close()
