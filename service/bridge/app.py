"""The bridge's composition root: builds every part, wires them, runs them, stops them.

Nothing registers itself at import time; this module is where the parts meet
(docs/architecture.md):

  BrokerLink (link.py)  -- messages -->  Ingest (ingest.py)  --> Store (store.py)
       ^                                                            | Routes (routes.py)
       |  publish, PUBACK                                           v
  Outbox (outbox.py)  <-- tasks table --  domains (service/domains/: agents,
  Sweeps (sweeps.py)  --------------------> inventory, tasks, telemetry, dead letters)
  Relay (relay.py)    <-- events table --  (with EUCORA_EVENTS_URL) -> NATS JetStream

Start-up checks everything before it takes traffic: a wrong URL, a database without
the current migrations, a /metrics port in use or another running bridge with the same
client id is a configuration error (ConfigError: exit 2, one line on stderr); a broker
or database that is merely down is retried with back-off until the connect budget
(`connect_timeout_s`) is spent (Unreachable: exit 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from schemas.config import ConfigError, MqttUrl, redact_url
from schemas.topics import TopicTree
from service import metrics
from service.bridge import broker_logs
from service.bridge import health as health_http
from service.bridge.brokers import BrokerSet
from service.bridge.ingest import Ingest, IngestLimits
from service.bridge.link import BrokerLink
from service.bridge.outbox import Outbox
from service.bridge.relay import Relay, watch_lag
from service.bridge.rollouts import RolloutEngine
from service.bridge.routes import Routes, default_routes
from service.bridge.store import Store
from service.bridge.sweeps import (
    ClientIdTaken,
    chunk_sweeper,
    claim_client_id,
    heartbeat,
    last_heartbeat,
    stale_sweeper,
    task_sweeper,
)
from service.config import Settings
from service.db import migrate
from service.db.connect import connect_async
from service.mqtt import MqttConnectError

log = logging.getLogger("eucora.bridge")
T = TypeVar("T")

# Errors where retrying cannot help: the operator must fix the configuration.
_FATAL_DB_HINTS = (
    "password authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "role",
    "invalid dsn",
    "invalid connection option",
    'missing "="',
)


class Unreachable(Exception):
    """A broker or database still down when the connect budget is spent (exit 4)."""


class Backoff:
    """Exponential back-off with a total budget."""

    def __init__(self, budget: float, first: float = 0.5, cap: float = 5.0):
        self.deadline = asyncio.get_running_loop().time() + budget
        self.delay = first
        self.cap = cap

    async def wait(self) -> bool:
        """Sleep before the next try; False when the budget is spent."""
        now = asyncio.get_running_loop().time()
        if now >= self.deadline:
            return False
        await asyncio.sleep(min(self.delay, self.deadline - now))
        self.delay = min(self.delay * 2, self.cap)
        return True


async def retry(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    budget: float,
    fatal: Callable[[Exception], bool],
    retryable: tuple[type[Exception], ...],
) -> T:
    backoff = Backoff(budget)
    while True:
        try:
            return await attempt()
        except retryable as exc:
            if fatal(exc):
                raise ConfigError(f"{what}: {_one_line(exc)}") from exc
            log.warning("%s failed, retrying", what, extra={"error": _one_line(exc)})
            if not await backoff.wait():
                raise Unreachable(
                    f"{what}: still failing after {budget:.0f} s: {_one_line(exc)}"
                ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _db_fatal(exc: Exception) -> bool:
    text = str(exc).lower()
    return isinstance(exc, psycopg.ProgrammingError) or any(h in text for h in _FATAL_DB_HINTS)


async def check_database(settings: Settings) -> None:
    """Connect (with retries) and insist that the schema is current."""
    target = f"database {redact_url(settings.database_url)}"

    async def attempt() -> None:
        async with await connect_async(settings.database_url) as conn:
            await migrate.require_current_async(conn)

    try:
        return await retry(
            f"cannot use {target}",
            attempt,
            budget=settings.connect_timeout_s,
            fatal=_db_fatal,
            retryable=(psycopg.Error, OSError, TimeoutError),
        )
    except migrate.SchemaNotCurrent as exc:
        raise ConfigError(str(exc)) from exc


@dataclass
class Bridge:
    """Every part of one bridge process, built and wired by `build`."""

    settings: Settings
    health: health_http.Health
    brokers: BrokerSet
    store: Store
    ingest: Ingest
    outbox: Outbox
    rollouts: RolloutEngine
    relay: Relay | None = None  # None: EUCORA_EVENTS_URL unset, no forwarding

    @property
    def links(self) -> list[BrokerLink]:
        return self.ingest.links

    def workers(self) -> list[Coroutine[Any, Any, None]]:
        """The background work beside ingest, started once the bridge is ready."""
        s = self.settings
        return [
            self.outbox.run(),
            self.rollouts.run(),
            self.brokers.run(),
            task_sweeper(s.database_url, s.task_sweep_interval_s),
            stale_sweeper(s.database_url, s.offline_after_s),
            chunk_sweeper(s.database_url),
            heartbeat(s.database_url, s.client_id, self.heartbeat_state),
            *([broker_logs.follow(s.broker_logs, s.database_url)] if s.broker_logs else []),
            *([self.relay.run(), watch_lag(s.database_url)] if self.relay else []),
        ]

    def heartbeat_state(self) -> tuple[bool, list[dict[str, Any]]]:
        brokers = [{"mqtt_url": str(link), "connected": link.connected} for link in self.links]
        return self.health.ready, brokers

    @property
    def connected(self) -> bool:
        return self.brokers.all_connected


def build(settings: Settings, *, routes: Routes | None = None) -> Bridge:
    """Build the parts (nothing connects yet; the broker links come from the brokers
    table when the bridge starts). `routes` replaces the route table (tests)."""
    tree = TopicTree(settings.topic_root)
    health = health_http.Health()
    limits = IngestLimits(
        settings.ingest_max_batch, settings.ingest_max_delay_s, settings.ingest_max_pending
    )

    def make_link(url: MqttUrl) -> BrokerLink:
        # Its Receive Maximum is set by Ingest.add_link: its share of max_pending.
        return BrokerLink(url, settings.client_id, ca_file=settings.ca_file)

    brokers = BrokerSet(settings.database_url, settings.mqtt, make_link)
    # Well inside offline_after, so last_seen never lags enough to look stale.
    touch = min(5.0, settings.offline_after_s / 4)
    store = Store(settings.database_url, routes or default_routes(), touch_interval=touch)
    ingest = Ingest([], store, tree, health, limits, share_group=settings.share_group)
    health.links = ingest.links  # the same list: links added later count too
    brokers.on_new_link = ingest.add_link
    metrics.MQTT_CONNECTED.set_function(lambda: float(brokers.all_connected))
    outbox = Outbox(settings.database_url, brokers, tree, redelivery_s=settings.task_redelivery_s)
    rollouts = RolloutEngine(settings.database_url, settings.rollout_interval_s)
    relay = None
    if settings.events_url:
        relay = Relay(
            settings.database_url,
            settings.events_url,
            settings.client_id,
            replicas=settings.events_replicas,
        )
    return Bridge(settings, health, brokers, store, ingest, outbox, rollouts, relay)


class BridgeApp:
    def __init__(self, settings: Settings, *, routes: Routes | None = None):
        self.settings = settings
        self.bridge = build(settings, routes=routes)
        self.health = self.bridge.health
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def _connect(self, link: BrokerLink) -> None:
        await retry(
            f"cannot connect to broker {link}",
            link.start,
            budget=self.settings.connect_timeout_s,
            fatal=lambda e: isinstance(e, MqttConnectError) and e.fatal,
            retryable=(MqttConnectError, TimeoutError),
        )

    async def _connect_brokers(self) -> None:
        """Link every broker. One broker: it must come up within the connect budget, as
        ever. Several: start once at least one is up; the others keep being retried in
        the background (a shard that is down affects only its own agents)."""
        bridge = self.bridge
        new = await retry(
            "cannot read the brokers table",
            bridge.brokers.load,
            budget=self.settings.connect_timeout_s,
            fatal=_db_fatal,
            retryable=(psycopg.Error, OSError),
        )
        for link in new:
            bridge.ingest.add_link(link)
        if len(new) == 1:
            await self._connect(new[0])
            return
        outcomes = await asyncio.gather(
            *(self._connect(link) for link in new), return_exceptions=True
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if len(errors) == len(new):
            raise errors[0]
        for link, outcome in zip(new, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.warning(
                    "a broker is unreachable; going on without it, retrying",
                    extra={"broker": str(link), "error": _one_line(outcome)},
                )
                bridge.brokers.keep_connecting(link)

    async def _serve_health(self) -> asyncio.Server:
        s = self.settings
        try:
            return await health_http.serve(self.health, s.metrics_port, host=s.metrics_bind)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve /metrics on {s.metrics_bind}:{s.metrics_port}:"
                f" {exc.strerror or exc}; choose another --metrics-port (EUCORA_METRICS_PORT,"
                " 0 = off) or --metrics-bind (EUCORA_METRICS_BIND)"
            ) from None

    async def run(self, *, signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        bridge = self.bridge
        server = None
        if self.settings.metrics_port:
            server = await self._serve_health()
        log.info(
            "bridge starting",
            extra={
                "mqtt": str(self.settings.mqtt),
                "database": redact_url(self.settings.database_url),
                "topic_root": self.settings.topic_root,
            },
        )
        await check_database(self.settings)
        try:
            await claim_client_id(self.settings.database_url, self.settings.client_id)
        except ClientIdTaken as exc:
            raise ConfigError(str(exc)) from None
        except (psycopg.Error, OSError) as exc:  # the database went away just now
            raise Unreachable(f"cannot read the bridges' heartbeats: {_one_line(exc)}") from None
        self.health.database_ok = True
        background: list[asyncio.Task[None]] = []
        try:
            await bridge.store.open()
            bridge.ingest.bind()
            await self._connect_brokers()
            tune_gc()
            log.info("bridge ready")
            stopper = asyncio.create_task(self._stop.wait())
            worker = asyncio.create_task(bridge.ingest.run())
            background = [asyncio.create_task(w) for w in bridge.workers()]
            done, _ = await asyncio.wait(
                {stopper, worker, *background}, return_when=asyncio.FIRST_COMPLETED
            )
            stopper.cancel()
            for task in done - {stopper}:
                task.result()  # a crashed worker is a crash of the bridge
            log.info("bridge stopping")
            self.health.stopping = True
            for task in background:
                task.cancel()
            if background:
                # Bounded: a worker stuck where a cancellation can be lost (Python 3.11's
                # wait_for inside a pool wait) must not keep the bridge from stopping.
                _, stuck = await asyncio.wait(background, timeout=5)
                for task in stuck:
                    log.warning("a background worker did not stop", extra={"task": task.get_name()})
            await bridge.ingest.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        finally:
            self.health.stopping = True
            for task in background:
                task.cancel()
            await bridge.brokers.close()
            await bridge.store.close()
            with contextlib.suppress(Exception):  # best effort: status sees it gone at once
                async with asyncio.timeout(2):
                    await last_heartbeat(self.settings.database_url, self.settings.client_id)
            if server is not None:
                server.close()
                await server.wait_closed()
            log.info("bridge stopped")


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the hot path, once start-up is done.

    Every message the bridge holds until its batch commits (thousands at a time, up to
    the pending bound) survives the young collections and is promoted, so with the
    default thresholds the collector ran every couple of hundred messages, walking the
    held batches and the whole start-up heap: ~3 us of a ~34 us message, the single
    largest cost of the bridge's own (py-spy, bench.ingest). Start-up objects live as
    long as the process: freeze them out of every collection; and collect the young
    generation every 50,000 allocations instead of 700 (about 2,000 messages' worth:
    a few MB of garbage at most waits for it).
    """
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


def run(settings: Settings) -> None:
    # paho's network thread is CPU-bound under load; with the default 5 ms switch
    # interval every database round trip of the event loop waited up to 5 ms for the
    # GIL, which made each flush several times slower than the database itself.
    sys.setswitchinterval(0.0005)
    asyncio.run(BridgeApp(settings).run())
