"""The bridge process: wires database, broker, ingest and health together, and stops cleanly.

Start-up checks everything before it takes traffic: a wrong URL or a database without
the current migrations is a configuration error (exit 2, one line on stderr); a broker
or database that is merely down is retried with back-off until the connect budget
(`connect_timeout_s`) is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from schemas.config import ConfigError, redact_url
from service.bridge import health as health_http
from service.bridge import workers
from service.config import Settings
from service.db import migrate
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
                raise ConfigError(
                    f"{what}: still failing after {budget:.0f} s: {_one_line(exc)}"
                ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _db_fatal(exc: Exception) -> bool:
    text = str(exc).lower()
    return isinstance(exc, psycopg.ProgrammingError) or any(h in text for h in _FATAL_DB_HINTS)


async def open_database(settings: Settings) -> AsyncConnectionPool:
    """Connect (with retries) and insist that the schema is current."""
    target = f"database {redact_url(settings.database_url)}"

    async def attempt() -> AsyncConnectionPool:
        # A plain connection first: its errors say what is wrong (a pool's would
        # only time out), and the schema check needs just one.
        async with await psycopg.AsyncConnection.connect(
            settings.database_url, connect_timeout=5
        ) as conn:
            await migrate.require_current_async(conn)
        pool = AsyncConnectionPool(
            settings.database_url, min_size=1, max_size=4, open=False, timeout=10
        )
        await pool.open(wait=True, timeout=10)
        return pool

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


class BridgeApp:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.health = health_http.Health()
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        server = None
        if self.settings.metrics_port:
            server = await health_http.serve(self.health, self.settings.metrics_port)
        log.info(
            "bridge starting",
            extra={
                "mqtt": str(self.settings.mqtt),
                "database": redact_url(self.settings.database_url),
                "topic_root": self.settings.topic_root,
            },
        )
        pool = await open_database(self.settings)
        self.health.database_ok = True
        from service.bridge.ingest import Ingest  # heavy imports only once config is good

        ingest = Ingest(self.settings, self.health)
        try:
            await retry(
                f"cannot connect to broker {self.settings.mqtt}",
                ingest.start,
                budget=self.settings.connect_timeout_s,
                fatal=lambda e: isinstance(e, MqttConnectError) and e.fatal,
                retryable=(MqttConnectError, TimeoutError),
            )
            log.info("bridge ready")
            stopper = asyncio.create_task(self._stop.wait())
            worker = asyncio.create_task(ingest.run())
            background = [
                asyncio.create_task(w(self.settings, pool, ingest)) for w in workers.workers()
            ]
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
            await ingest.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        finally:
            self.health.stopping = True
            await ingest.close()
            await pool.close()
            if server is not None:
                server.close()
                await server.wait_closed()
            log.info("bridge stopped")


def run(settings: Settings) -> None:
    # paho's network thread is CPU-bound under load; with the default 5 ms switch
    # interval every database round trip of the event loop waited up to 5 ms for the
    # GIL, which made each flush several times slower than the database itself.
    sys.setswitchinterval(0.0005)
    asyncio.run(BridgeApp(settings).run())
