"""The bridge's consumer: MQTT in, validated batches committed, then acknowledged.

Flow (see docs/ingest.md):
  paho network thread                      event loop
  on_message: parse topic, validate   ->   Ingest.run: gather a batch (size or time)
  (bounded: the bridge                        -> Store.flush: one transaction
   never holds more than `max_pending`        -> after COMMIT: PUBACK every message of it
   unacknowledged messages)

A message is acknowledged only after its rows (or its dead letter) are committed. When
the database is slow or down, flushes are retried and nothing is acknowledged; the
bound is reached, paho's thread waits, and the broker keeps the rest queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from schemas.topics import AGENT_KINDS, Kind, TopicError, TopicTree
from schemas.validate import PayloadError, parse
from service import mqtt
from service.bridge import handlers, metrics
from service.bridge.health import Health
from service.bridge.store import Store
from service.config import Settings

log = logging.getLogger("eucora.bridge.ingest")
assert handlers  # importing the package registers the per-kind handlers

# Retained online/offline must reach every bridge (a shared subscription gets no retained
# messages), so status is always a plain subscription; its handling is idempotent by epoch.
_UNSHARED = {Kind.STATUS}


@dataclass(frozen=True)
class IngestLimits:
    max_batch: int = 5000  # messages per transaction
    max_delay_s: float = 0.2  # a lone message waits at most this long for company
    max_pending: int = 20000  # messages received but not yet acknowledged


@dataclass(slots=True)
class Inbound:
    """One received message, validated on paho's thread."""

    mid: int
    qos: int
    generation: int
    topic: str
    agent_id: str | None
    kind: Kind | None
    model: Any = None
    error: PayloadError | None = None
    payload: bytes | bytearray = b""
    received: float = field(default_factory=time.monotonic)


def subscriptions(tree: TopicTree, share_group: str | None) -> list[tuple[str, int]]:
    subs = []
    for kind in AGENT_KINDS:
        topic = tree.wildcard(kind)
        shared = share_group and kind not in _UNSHARED
        subs.append((f"$share/{share_group}/{topic}" if shared else topic, 1))
    return subs


class Ingest:
    def __init__(
        self,
        settings: Settings,
        health: Health,
        limits: IngestLimits | None = None,
    ):
        self.settings = settings
        self.tree = TopicTree(settings.topic_root)
        self.health = health
        self.limits = limits or IngestLimits(
            settings.ingest_max_batch, settings.ingest_max_delay_s, settings.ingest_max_pending
        )
        # Well inside offline_after, so last_seen never lags enough to look stale.
        touch = min(5.0, settings.offline_after_s / 4)
        self.store = Store(settings.database_url, touch_interval=touch)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: collections.deque[Inbound] = collections.deque()
        self._wake = asyncio.Event()
        self._wake_pending = False
        # How many waiting messages are worth waking the loop for: 1 while it has no
        # batch, the rest of a batch while it fills one (it wakes at its deadline
        # anyway). One wake-up per batch instead of one per message.
        self._wake_at = 1
        # Messages admitted (written by paho's thread only) and released (by the event
        # loop only): single-writer counters, cheaper per message than a semaphore.
        self._taken = 0
        self._freed = 0
        self._room = threading.Event()
        metrics.PENDING.set_function(lambda: self._taken - self._freed)
        self._generation = 0
        self._stopping = False
        self._client = mqtt.make_client(
            settings.mqtt, settings.client_id, manual_ack=True, ca_file=settings.ca_file
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # --- paho thread --------------------------------------------------------
    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            return
        # Messages received on an earlier connection will be redelivered by the
        # broker; their packet ids mean nothing on this one, so they are never acked.
        self._generation += 1
        client.subscribe(subscriptions(self.tree, self.settings.share_group))
        self.health.mqtt_connected = True
        metrics.MQTT_CONNECTED.set(1)
        log.info("connected to broker", extra={"session_present": bool(flags.session_present)})

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        self.health.mqtt_connected = False
        metrics.MQTT_CONNECTED.set(0)
        if not self._stopping:
            log.warning("disconnected from broker", extra={"reason": str(reason)})

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        # Blocks paho's thread when max_pending messages are unacknowledged: that is
        # the back-pressure that leaves the rest queued at the broker.
        while self._taken - self._freed >= self.limits.max_pending:
            self._room.clear()
            if self._taken - self._freed < self.limits.max_pending:
                break  # released between the check and the clear
            if not self._room.wait(1.0) and self._stopping:
                return
        if self._stopping:  # not acknowledged: the broker redelivers it to a bridge
            return
        self._taken += 1
        metrics.RECEIVED.inc()
        item = self._validate(msg)
        self._inbox.append(item)
        if not self._wake_pending and self._loop is not None and len(self._inbox) >= self._wake_at:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._wake.set)

    def _validate(self, msg: paho.MQTTMessage) -> Inbound:
        item = Inbound(
            msg.mid, msg.qos, self._generation, msg.topic, None, None, payload=msg.payload
        )
        try:
            where = self.tree.parse(msg.topic)
        except TopicError as exc:
            item.error = PayloadError("unknown_kind", str(exc))
            return item
        item.agent_id, item.kind = where.agent_id, where.kind
        try:
            item.model = parse(where.kind, where.agent_id, msg.payload)
        except PayloadError as exc:
            item.error = exc
        return item

    # --- event loop ---------------------------------------------------------
    async def start(self) -> None:
        """Connect to the broker (raises MqttConnectError); messages start flowing."""
        self._loop = asyncio.get_running_loop()
        await self.store.open()
        props = mqtt.connect_properties(receive_maximum=min(self.limits.max_pending, 65535))
        await mqtt.connect(self._client, self.settings.mqtt, clean_start=False, properties=props)

    async def run(self) -> None:
        """Batch, store, acknowledge, until stop() is called and the inbox is empty."""
        flushing: set[asyncio.Task[None]] = set()
        try:
            while True:
                if len(flushing) >= self.store.writers:
                    done, flushing = await asyncio.wait(
                        flushing, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        task.result()
                    continue
                batch = await self._gather()
                if batch:
                    flushing.add(asyncio.create_task(self._commit(batch)))
                elif self._stopping:
                    break
        finally:
            for outcome in await asyncio.gather(*flushing, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome

    async def _gather(self) -> list[Inbound]:
        """Up to max_batch messages.

        Under load, what piled up during the last flush is taken at once: the batch
        size follows the database's pace. Only an idle bridge lingers, at most
        max_delay_s after the first message, to give a trickle some company.
        """
        batch: list[Inbound] = []
        deadline: float | None = None
        backlog = bool(self._inbox)
        while True:
            while self._inbox and len(batch) < self.limits.max_batch:
                batch.append(self._inbox.popleft())
            if len(batch) >= self.limits.max_batch or self._stopping or (batch and backlog):
                return batch
            if batch:
                deadline = deadline or batch[0].received + self.limits.max_delay_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return batch
            else:
                remaining = 1.0  # wake now and then to notice stop()
            # Re-arm the wake-up before looking again, so an append racing with us
            # either is seen by the check below or schedules a new wake-up.
            self._wake_at = self.limits.max_batch - len(batch) if batch else 1
            self._wake_pending = False
            self._wake.clear()
            if self._inbox:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    async def _commit(self, batch: list[Inbound]) -> None:
        """Store a batch, retrying while the database is away; then acknowledge it."""
        delay = 0.2
        while True:
            try:
                await self.store.flush(batch)
                self.health.database_ok = True
                break
            except Exception as exc:  # any database failure: keep the batch, retry
                self.health.database_ok = False
                metrics.FLUSH_FAILURES.inc()
                log.warning(
                    "storing a batch failed; retrying, nothing acknowledged",
                    extra={"error": " ".join(str(exc).split())[:300], "batch": len(batch)},
                )
                if self._stopping and delay > 2:
                    # Stopping with the database away: leave the rest to the broker.
                    self._release(batch, ack=False)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._release(batch, ack=True)

    def _release(self, batch: list[Inbound], *, ack: bool) -> None:
        generation = self._generation
        if ack:
            for item in batch:
                if item.qos > 0 and item.generation == generation:
                    self._client.ack(item.mid, item.qos)
        self._freed += len(batch)
        self._room.set()

    @property
    def connected(self) -> bool:
        return self.health.mqtt_connected

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, properties: Properties | None = None
    ) -> paho.MQTTMessageInfo:
        """Publish on the bridge's own connection (thread-safe in paho); the caller
        awaits the PUBACK through the returned info (e.g. with asyncio.to_thread)."""
        return self._client.publish(topic, payload, qos=qos, properties=properties)

    async def stop(self) -> None:
        """Stop taking messages; what is already received is stored and acknowledged."""
        self._stopping = True
        self._wake.set()

    async def close(self) -> None:
        self._stopping = True
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        await self.store.close()
