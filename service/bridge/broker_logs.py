"""Refused credentials, learnt from the brokers' log files (docs/broker.md, "Refused
credentials").

Mosquitto 2.0 tells nobody but its log that it refused a connection: no $SYS topic
counts it, and the client never gets in to say so. Its log says, at notice level:

    2025-01-15T10:30:00: New connection from 10.1.2.3:50052 on port 11883.
    2025-01-15T10:30:00: Client <unknown> disconnected, not authorised.

and never the username (measured with 2.0.11: a wrong password, an unknown user, MQTT
3.1.1 and 5, even at debug level). The client id is named only where the listener
does not replace it with the username, and the source address only on the "New
connection" line. So a refusal is attributed:
- to the client id the broker names, when it is an agent of the registry;
- else to the address of the connection it ended, when exactly one connection from
  the log is still waiting for its outcome (the line order cannot tell otherwise),
  and exactly one agent registered from that address;
- else to nobody (agent_id null): the event keeps the listener port and address.

`follow` tails the files a bridge is given (EUCORA_BROKER_LOGS: the stack passes its
brokers' logs), from their end when it starts, and records one `credentials_refused`
security event per refusal. A bridge on another host than its brokers sees nothing:
that is the limit of this source.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import psycopg

from schemas.topics import is_agent_id
from service.db.connect import OwnConnection
from service.domains import security

log = logging.getLogger("eucora.broker_logs")

POLL_S: Final = 1.0
READ_MAX: Final = 1 << 20  # bytes per file and round: a flood is read over several rounds
PENDING_MAX: Final = 10_000  # connections waiting for an outcome (bounded memory)
PENDING_S: Final = 30.0  # a connection without an outcome line after this is forgotten

_STAMP = r"^(?P<ts>\S+): "
_NEW = re.compile(_STAMP + r"New connection from (?P<addr>.+):(?P<port>\d+) on port (?P<lp>\d+)\.$")
_OK = re.compile(_STAMP + r"New client connected from (?P<addr>.+):(?P<port>\d+) as ")
_REFUSED = re.compile(_STAMP + r"Client (?P<client>\S+) disconnected, not authori[sz]ed\.$")


@dataclass(frozen=True)
class Refusal:
    """One refused connection as the log tells it."""

    client_id: str | None  # None: the broker did not name it
    address: str | None  # the source address, when the line order tells it
    listener_port: int | None
    logged_at: str  # the log line's own timestamp
    source: str = ""  # the log file


def _seconds(stamp: str) -> float | None:
    """A log timestamp as seconds: ISO (the project's config) or unix (the default)."""
    try:
        return float(stamp)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


class RefusalParser:
    """Feed it log lines in order; it returns the refusals they end with."""

    def __init__(self, source: str = "") -> None:
        self.source = source
        # "addr:port" -> (listener port, seconds logged) of connections not ended yet.
        self._pending: OrderedDict[str, tuple[int, float | None]] = OrderedDict()

    def feed(self, line: str) -> Refusal | None:
        line = line.rstrip("\r\n")
        if m := _NEW.match(line):
            self._forget_old(_seconds(m["ts"]))
            self._pending[f"{m['addr']}:{m['port']}"] = (int(m["lp"]), _seconds(m["ts"]))
            while len(self._pending) > PENDING_MAX:
                self._pending.popitem(last=False)
            return None
        if m := _OK.match(line):
            self._pending.pop(f"{m['addr']}:{m['port']}", None)
            return None
        if m := _REFUSED.match(line):
            client = m["client"]
            named = None if client == "<unknown>" or client.startswith("auto-") else client
            address, listener = None, None
            self._forget_old(_seconds(m["ts"]))
            if len(self._pending) == 1:
                key, (listener, _) = self._pending.popitem()
                address = key.rsplit(":", 1)[0]
            return Refusal(named, address, listener, m["ts"], self.source)
        return None

    def _forget_old(self, now: float | None) -> None:
        if now is None:
            return
        while self._pending:
            _, (_, when) = next(iter(self._pending.items()))
            if when is not None and now - when <= PENDING_S:
                break
            self._pending.popitem(last=False)


@dataclass
class _Tail:
    path: Path
    offset: int | None = None  # None: not opened yet (then start at its end)
    rest: bytes = b""  # a line not finished yet


def _read(tail: _Tail) -> list[str]:
    """The complete lines added since the last call (blocking: run in a thread)."""
    try:
        size = os.stat(tail.path).st_size
    except OSError:
        return []
    if tail.offset is None or size < tail.offset:  # first look, or rotated/truncated
        tail.offset, tail.rest = (size if tail.offset is None else 0), b""
    if size == tail.offset:
        return []
    with open(tail.path, "rb") as f:
        f.seek(tail.offset)
        data = f.read(READ_MAX)
    tail.offset += len(data)
    *lines, tail.rest = (tail.rest + data).split(b"\n")
    return [line.decode("utf-8", "replace") for line in lines]


async def record(conn: psycopg.AsyncConnection[Any], refusals: Sequence[Refusal]) -> None:
    """One `credentials_refused` security event per refusal, attributed as the module
    docstring says, in one transaction."""
    rows: list[security.SecurityEvent] = []
    for r in refusals:
        agent_id, how = None, None
        if r.client_id is not None and is_agent_id(r.client_id):
            cur = await conn.execute("SELECT 1 FROM agents WHERE agent_id = %s", (r.client_id,))
            if await cur.fetchone() is not None:
                agent_id, how = r.client_id, "client_id"
        if agent_id is None and r.address is not None:
            cur = await conn.execute(
                "SELECT agent_id FROM agents WHERE ip_address = %s LIMIT 2",
                (r.address,),
            )
            found = await cur.fetchall()
            if len(found) == 1:
                agent_id, how = found[0][0], "address"
        rows.append((agent_id, {
            "client_id": r.client_id, "address": r.address, "listener_port": r.listener_port,
            "logged_at": r.logged_at, "attributed_by": how, "broker_log": r.source,
        }))  # fmt: skip
    async with conn.transaction():
        await security.security_event_async(conn, "credentials_refused", rows)


async def follow(paths: Sequence[str], database_url: str, poll_s: float = POLL_S) -> None:
    """Tail `paths` for ever, recording refusals (a lost database: retried next round,
    the refusals kept meanwhile, at most PENDING_MAX of them)."""
    tails = [(_Tail(Path(p)), RefusalParser(p)) for p in paths]
    db = OwnConnection(database_url)
    waiting: list[Refusal] = []
    try:
        while True:
            for tail, parser in tails:
                for line in await asyncio.to_thread(_read, tail):
                    refusal = parser.feed(line)
                    if refusal is not None:
                        waiting.append(refusal)
            del waiting[:-PENDING_MAX]
            if waiting:
                try:
                    await record(await db.get(), waiting)
                    log.warning("broker refused credentials", extra={"count": len(waiting)})
                    waiting.clear()
                except (psycopg.Error, OSError) as exc:
                    log.info("refusals not recorded yet", extra={"error": str(exc)[:200]})
            await asyncio.sleep(poll_s)
    finally:
        await db.close()
