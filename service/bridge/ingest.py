"""The bridge's consumer: messages from broker links in, validated batches committed,
then acknowledged.

Flow (see docs/ingest.md):
  paho network thread (per link)           event loop
  receive: parse topic, validate      ->   Ingest.run: gather a batch (size or time)
  (bounded: the bridge                        -> Store.flush: one transaction
   never holds more than `max_pending`        -> after COMMIT: PUBACK every message of it
   unacknowledged messages)                      on the link it came from

A message is acknowledged only after its rows (or its dead letter) are committed. When
the database is slow or down, flushes are retried and nothing is acknowledged; the
bound is reached, paho's thread waits, and the broker keeps the rest queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import paho.mqtt.client as paho

from schemas.states import DeadLetterReason
from schemas.topics import AGENT_KINDS, Kind, TopicError, TopicTree
from schemas.validate import PayloadError, parse
from service import metrics
from service.bridge.health import Health
from service.bridge.link import BrokerLink
from service.bridge.message import Inbound
from service.bridge.store import Store, is_connection_error

log = logging.getLogger("eucora.bridge.ingest")

# Kinds whose order per agent matters (a state machine reads them); telemetry and
# heartbeats are idempotent by key and may commit in any order.
_ORDERED = frozenset({Kind.STATUS, Kind.REGISTER, Kind.TASK_STATUS, Kind.DEPLOYMENT_STATUS})

# Retained online/offline must reach every bridge (a shared subscription gets no retained
# messages), so status is always a plain subscription; its handling is idempotent by epoch.
_UNSHARED = {Kind.STATUS}


@dataclass(frozen=True)
class IngestLimits:
    max_batch: int = 5000  # messages per transaction
    max_delay_s: float = 0.2  # a lone message waits at most this long for company
    max_pending: int = 20000  # messages received but not yet acknowledged


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
        links: Sequence[BrokerLink],
        store: Store,
        tree: TopicTree,
        health: Health,
        limits: IngestLimits,
        share_group: str | None = None,
    ):
        self.links: list[BrokerLink] = []
        self.store = store
        self.tree = tree
        self.health = health
        self.limits = limits
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: collections.deque[Inbound] = collections.deque()
        self._wake = asyncio.Event()
        self._wake_pending = False
        # How many waiting messages are worth waking the loop for: 1 while it has no
        # batch, the rest of a batch while it fills one (it wakes at its deadline
        # anyway). One wake-up per batch instead of one per message.
        self._wake_at = 1
        # Messages admitted (one counter per link, each written by that link's paho
        # thread only) and released (written by the event loop only): single-writer
        # counters, cheaper per message than a semaphore.
        self._taken: list[int] = []
        self._freed = 0
        metrics.PENDING.set_function(lambda: self.pending)
        self._stopping = False
        self._subscriptions = subscriptions(tree, share_group)
        for link in links:
            self.add_link(link)

    def add_link(self, link: BrokerLink) -> None:
        """Consume from one more broker (before that link starts)."""
        self._taken.append(0)  # its paho thread's counter, before it can receive
        self.links.append(link)
        # The brokers never send more unacknowledged QoS 1 messages than the links'
        # Receive Maximums, whose sum is max_pending. A link asks when it starts (paho
        # reconnects with the same CONNECT), so once brokers are added to a running
        # bridge the older links keep their larger share: the sum stays bounded.
        share = max(1, self.limits.max_pending // len(self.links))
        for each in self.links:
            each.receive_maximum = min(share, 65535)
        link.subscribe(self._subscriptions)
        link.consume(self._receive, len(self.links) - 1)

    # --- paho thread --------------------------------------------------------
    @property
    def pending(self) -> int:
        """Messages received and not yet released (acknowledged or left to the broker)."""
        return sum(self._taken) - self._freed

    def _receive(self, client: paho.Client, link: int, msg: paho.MQTTMessage) -> None:
        # Never blocks paho's thread: a network thread that waits sends no PINGREQ, and
        # its broker drops the bridge after 1.5 x keepalive with every unacknowledged
        # message to deliver again (seen at 100,000 agents on 7 brokers: each link
        # dropped every minute or two, the bridge storing nothing new). QoS 1 messages
        # are bounded by the brokers instead: each link asks for a Receive Maximum that
        # is its share of max_pending (add_link). QoS 0 has no flow control: past the
        # bound it is dropped (at most once, as its sender chose) and counted.
        if self._stopping:  # not acknowledged: the broker redelivers it to a bridge
            return
        taken = self._taken
        if msg.qos == 0 and sum(taken) - self._freed >= self.limits.max_pending:
            metrics.QOS0_DROPPED.inc()
            return
        taken[link] += 1  # counted in RECEIVED by the loop, a batch at a time (a
        # prometheus inc per message took 7% of the bridge's CPU: it takes a lock)
        item = self._validate(msg, self.links[link].generation, link)
        self._inbox.append(item)
        if not self._wake_pending and self._loop is not None and len(self._inbox) >= self._wake_at:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._wake.set)

    def _validate(self, msg: paho.MQTTMessage, generation: int, link: int) -> Inbound:
        topic = msg.topic  # a property that decodes the bytes: once
        item = Inbound(
            msg.mid, msg.qos, generation, topic, None, None, payload=msg.payload, link=link
        )
        try:
            where = self.tree.parse(topic)
        except TopicError as exc:
            item.error = PayloadError(DeadLetterReason.UNKNOWN_KIND.value, str(exc))
            return item
        item.agent_id, item.kind = where.agent_id, where.kind
        try:
            item.accept(parse(where.kind, where.agent_id, msg.payload))
        except PayloadError as exc:
            item.error = exc
        return item

    # --- event loop ---------------------------------------------------------
    def bind(self) -> None:
        """Before the links start: messages may arrive from then on."""
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Batch, store, acknowledge, until stop() is called and the inbox is empty."""
        # Batches being stored, each with the agents whose order-sensitive messages it
        # holds: two writers commit at once, but never two batches with such messages
        # of the same agent, so an agent's states arrive in the order it sent them.
        flushing: dict[asyncio.Task[None], set[str]] = {}

        async def settle(tasks: set[asyncio.Task[None]]) -> None:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                del flushing[task]
                task.result()

        try:
            while True:
                if len(flushing) >= self.store.writers:
                    await settle(set(flushing))
                    continue
                batch = await self._gather()
                if batch:
                    metrics.RECEIVED.inc(len(batch))
                    ordered = {i.agent_id for i in batch if i.kind in _ORDERED and i.agent_id}
                    while ordered and (
                        earlier := {t for t, a in flushing.items() if not a.isdisjoint(ordered)}
                    ):
                        await settle(earlier)
                    flushing[asyncio.create_task(self._commit(batch))] = ordered
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
        """Store a batch, retrying while the database is away; then acknowledge it.
        Only connection problems get here (the store dead-letters what concerns a
        message); anything else is a bug of the bridge and stops it."""
        delay = 0.2
        while True:
            try:
                await self.store.flush(batch)
                self.health.database_ok = True
                break
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
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
        if ack:
            if len(self.links) == 1:
                self.links[0].ack(batch)
            else:
                for index, link in enumerate(self.links):
                    link.ack(item for item in batch if item.link == index)
        self._freed += len(batch)

    async def stop(self) -> None:
        """Stop taking messages; what is already received is stored and acknowledged."""
        self._stopping = True
        self._wake.set()
