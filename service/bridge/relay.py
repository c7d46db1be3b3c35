"""The event relay: the events table, forwarded to NATS JetStream (docs/events.md).

When EUCORA_EVENTS_URL is set, every bridge runs a `Relay`; exactly one of them
relays at a time, the one holding a PostgreSQL advisory lock on a connection of its
own. A bridge that dies loses its connection and with it the lock; a standby, which
tries the lock every second, takes over from the position saved in the database.

One round, on the lock's connection (so only the holder writes the position):

  read_after(position)  -- the core's safe cursor: no event can commit behind it later
  publish each event    -- subject eucora.v1.events.{agent}.{kind}, header
                           Nats-Msg-Id = event_id, up to BATCH events a round
  await every PubAck    -- one per message: a message is only counted as stored by its
                           own ack (an ack-all can cover messages that were lost)
  save the position     -- only now; after a crash the events since the last save are
                           sent again, and JetStream drops those it already has (the
                           stream's duplicate window, DUPLICATE_WINDOW_S)

The next round is read and published while the previous one's acks are on their way
(at most ROUNDS_IN_FLIGHT rounds unacknowledged); rounds are settled, and the position
saved, in order.

Any failure (NATS away, a stream leader lost, the database away) ends the session:
the connections close, the lock is free, and the relay tries again after a back-off;
ingest never waits for any of this. `watch_lag` measures, on every bridge, how far the
relay is behind (exported on /metrics), from the database alone, so a stuck relay
shows as a growing lag.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import nats
import orjson
import psycopg
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from schemas.config import redact_url
from service import metrics
from service.db.connect import OwnConnection, connect_async
from service.domains import event_relays, events
from service.logs import scrub

log = logging.getLogger("eucora.bridge.relay")

STREAM: Final = "EUCORA_EVENTS"
SUBJECT_PREFIX: Final = "eucora.v1.events"
SUBJECTS: Final = f"{SUBJECT_PREFIX}.>"
# The subject token of an event about no single agent (an agent id never is "_": it
# starts with a letter or digit).
NO_AGENT: Final = "_"
# JetStream drops a message whose Nats-Msg-Id it stored within this window. A resend
# comes within seconds of the first try (a restart, a new holder taking over), so two
# minutes (JetStream's default) cover it; a relay down for longer may store a few
# events twice (at most one BATCH), which a consumer keyed on event_id ignores.
DUPLICATE_WINDOW_S: Final = 120.0
# Events read and published per round, and rounds published before the oldest one's
# acks are awaited: at most BATCH x ROUNDS_IN_FLIGHT events unacknowledged at once.
BATCH: Final = 1000
ROUNDS_IN_FLIGHT: Final = 2
# How long the relay waits for the acks of one round before it gives up the session.
ACK_TIMEOUT_S: Final = 5.0
# A relay that found nothing new looks again after this long (live latency).
IDLE_POLL_S: Final = 0.02
# A standby tries the lock this often (how soon it takes over from a dead holder).
STANDBY_POLL_S: Final = 1.0
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_CAP_S: Final = 5.0
# The advisory lock of the relay, one for the whole database (pg_try_advisory_lock).
LOCK_KEY: Final = 0x6575636F72614556  # "eucoraEV"


def subject(agent_id: str | None, kind: str) -> str:
    """eucora.v1.events.{agent}.{kind}: the agent id with its dots written %2E (a dot
    separates subject tokens), `_` for an event about no single agent; the kind as it
    is (`task.status` is two tokens)."""
    agent = NO_AGENT if agent_id is None else agent_id.replace(".", "%2E")
    return f"{SUBJECT_PREFIX}.{agent}.{kind}"


def stream_config(replicas: int) -> StreamConfig:
    """The stream the relay creates when it does not exist (an existing one is used as
    it is: an operator may size it)."""
    return StreamConfig(
        name=STREAM,
        subjects=[SUBJECTS],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        description="EUCORA events (docs/events.md), relayed from the events table",
    )


def servers(url: str) -> list[str]:
    """EUCORA_EVENTS_URL: one server, or several (one cluster) comma-separated."""
    return [u.strip() for u in url.split(",") if u.strip()]


def describe_target(url: str) -> str:
    return ",".join(redact_url(u) for u in servers(url)) + f" stream {STREAM}"


class RelayError(Exception):
    """A round that cannot go on (a stream that does not take our subjects, ...)."""


@dataclass
class Relay:
    """Forwards events to JetStream while this bridge holds the relay lock."""

    database_url: str
    events_url: str
    client_id: str
    replicas: int = 1
    batch: int = BATCH
    # The current session got as far as relaying (a failure after that is retried at
    # once, repeated failures before it back off).
    _relayed: bool = field(default=False, init=False, repr=False)

    @property
    def target(self) -> str:
        return describe_target(self.events_url)

    async def run(self) -> None:
        """Relay until cancelled: hold the lock or wait for it; retry every failure."""
        delay = BACKOFF_FIRST_S
        while True:
            self._relayed = False
            try:
                await self._session()
            except (psycopg.Error, OSError, TimeoutError, nats.errors.Error, RelayError) as exc:
                metrics.RELAY_FAILURES.inc()
                log.warning(
                    "event relay failed, retrying",
                    extra={"target": self.target, "error": _one_line(exc)},
                )
            except Exception:
                # Forwarding is optional: a failure nobody foresaw must not stop the
                # bridge's ingest; it is logged with its traceback and retried.
                metrics.RELAY_FAILURES.inc()
                log.exception("event relay failed unexpectedly, retrying")
            finally:
                metrics.RELAY_ACTIVE.set(0)
            # A session that relayed starts again quickly; repeated failures back off.
            delay = BACKOFF_FIRST_S if self._relayed else min(delay * 2, BACKOFF_CAP_S)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """Wait for the lock, then relay until something fails (raises)."""
        async with await connect_async(
            self.database_url, autocommit=True, application_name="eucora-relay"
        ) as conn:
            while not await _try_lock(conn):  # noqa: ASYNC110 (the lock is the database's)
                await asyncio.sleep(STANDBY_POLL_S)
            log.info("event relay active", extra={"target": self.target})
            try:
                nc = await self._connect()
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                await event_relays.touch(conn, STREAM, self.client_id, self.target, _one_line(exc))
                raise
            try:
                await self._ensure_stream(nc)
                position = await event_relays.claim(conn, STREAM, self.client_id, self.target)
                metrics.RELAY_ACTIVE.set(1)
                self._relayed = True
                await self._relay(conn, nc, position)
            except (TimeoutError, nats.errors.Error, RelayError) as exc:
                # The database still answers: say why, for `eucora status`.
                if not conn.broken:
                    await event_relays.touch(
                        conn, STREAM, self.client_id, self.target, _one_line(exc)
                    )
                raise
            finally:
                await _close(nc)

    async def _connect(self) -> NatsClient:
        async def on_error(exc: Exception) -> None:
            log.info("nats connection error", extra={"error": _one_line(exc)})

        connecting = nats.connect(
            servers=servers(self.events_url),
            name=f"eucora-relay {self.client_id}",
            connect_timeout=2,
            # A lost connection ends the session (the relay resends from its saved
            # position); reconnecting inside the client would hide lost acks.
            allow_reconnect=False,
            # At connect: each server of the list at most twice, then our back-off.
            max_reconnect_attempts=1,
            reconnect_time_wait=0.2,
            error_cb=on_error,
        )
        return await asyncio.wait_for(connecting, 15)

    async def _ensure_stream(self, nc: NatsClient) -> None:
        js = nc.jetstream(timeout=ACK_TIMEOUT_S)
        try:
            info = await js.stream_info(STREAM)
        except NotFoundError:
            await js.add_stream(stream_config(self.replicas))
            log.info(
                "created the events stream",
                extra={"stream": STREAM, "replicas": self.replicas},
            )
            return
        subjects = info.config.subjects or []
        if SUBJECTS not in subjects:
            raise RelayError(
                f"stream {STREAM} exists with subjects {subjects}, not {SUBJECTS}:"
                " add it to the stream or delete the stream"
            )

    async def _relay(self, conn: event_relays.Conn, nc: NatsClient, at: events.Position) -> None:
        js = nc.jetstream(
            timeout=ACK_TIMEOUT_S, publish_async_max_pending=self.batch * ROUNDS_IN_FLIGHT
        )
        loop = asyncio.get_running_loop()
        rounds: collections.deque[_Round] = collections.deque()
        touched = loop.time()
        while True:
            if nc.is_closed:
                raise RelayError("the connection to NATS closed")
            try:
                batch, after = await events.read_after(conn, at, limit=self.batch)
            except events.CursorTooOld as exc:
                # Retention deleted events this relay had not sent (it was off longer
                # than the retention period): go on from the oldest kept, loudly.
                log.error(
                    "events deleted before they were relayed; going on from the oldest kept",
                    extra={"cursor": str(at), "oldest": str(exc.oldest)},
                )
                batch, after = [], exc.oldest
            if batch:
                rounds.append(await self._send(js, batch, after))
            # Settle rounds in order: those whose acks are all in, the oldest when the
            # most are in flight, every one when there is nothing new to send.
            settled: _Round | None = None
            relayed = 0
            while rounds and (
                rounds[0].acks.done() or len(rounds) >= ROUNDS_IN_FLIGHT or not batch
            ):
                settled = rounds.popleft()
                relayed += await _settle(nc, settled)
            if settled is not None:
                await event_relays.advance(conn, STREAM, settled.after, relayed)
                touched = loop.time()
            elif not rounds and loop.time() - touched > event_relays.TOUCH_S:
                # Nothing sent: the position moves past what others skip, and the row
                # stays fresh for `eucora status`.
                await event_relays.advance(conn, STREAM, after, 0)
                touched = loop.time()
            at = after
            if not batch:
                await asyncio.sleep(IDLE_POLL_S)

    async def _send(
        self, js: JetStreamContext, batch: Sequence[events.Event], after: events.Position
    ) -> _Round:
        """Publish a round; its acks arrive later, one per message."""
        acks = [
            await js.publish_async(
                subject(event.agent_id, event.kind),
                orjson.dumps(event.document()),
                headers={"Nats-Msg-Id": str(event.event_id)},
            )
            for event in batch
        ]
        deadline = asyncio.get_running_loop().time() + ACK_TIMEOUT_S
        return _Round(after, asyncio.ensure_future(asyncio.gather(*acks)), deadline)


@dataclass
class _Round:
    """Events published together: the position after them, their acks, the deadline."""

    after: events.Position
    acks: asyncio.Future[list[PubAck]]
    deadline: float


async def _settle(nc: NatsClient, sent: _Round) -> int:
    """Wait for every ack of a round (each message its own); how many. A connection that
    closes meanwhile ends the wait at once: its acks will never come."""
    loop = asyncio.get_running_loop()
    try:
        while not sent.acks.done():
            if nc.is_closed:
                raise RelayError("the connection to NATS closed before every ack came")
            if loop.time() > sent.deadline:
                raise TimeoutError(f"no PubAck from JetStream within {ACK_TIMEOUT_S:g} s")
            await asyncio.wait({sent.acks}, timeout=0.1)
    finally:
        sent.acks.cancel()
    done = sent.acks.result()
    duplicates = sum(1 for ack in done if ack.duplicate)
    metrics.RELAYED.inc(len(done))
    if duplicates:
        metrics.RELAY_DUPLICATES.inc(duplicates)
    return len(done)


async def _try_lock(conn: event_relays.Conn) -> bool:
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def _close(nc: NatsClient) -> None:
    with contextlib.suppress(TimeoutError, nats.errors.Error, OSError):  # going anyway
        await asyncio.wait_for(nc.close(), 2)


async def watch_lag(database_url: str, interval_s: float = event_relays.TOUCH_S) -> None:
    """Every bridge with a relay: how far the relay is behind, on /metrics."""
    db = OwnConnection(database_url, application_name="eucora-relay-lag")
    try:
        while True:
            try:
                conn = await db.get()
                found = await event_relays.reports(conn, STREAM)
                if found:
                    metrics.RELAY_BEHIND.set(found[0].behind)
                    metrics.RELAY_LAG_SECONDS.set(found[0].lag_s)
            except (psycopg.Error, OSError) as exc:
                log.info("cannot measure the relay's lag", extra={"error": _one_line(exc)})
            await asyncio.sleep(interval_s)
    finally:
        await db.close()


def _one_line(exc: BaseException) -> str:
    return scrub(" ".join(str(exc).split()))[:300] or type(exc).__name__
