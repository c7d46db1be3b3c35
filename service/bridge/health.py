"""/metrics, /healthz and /readyz on one small asyncio HTTP endpoint.

healthz: the process is alive and its loop answers. readyz: broker and database are
both connected, so the bridge can take traffic (used by `eucora stack up` and probes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest


class Link(Protocol):
    connected: bool


@dataclass
class Health:
    links: Sequence[Link] = ()
    database_ok: bool = False
    stopping: bool = False
    details: dict[str, str] = field(default_factory=dict)

    @property
    def mqtt_connected(self) -> bool:
        return bool(self.links) and all(link.connected for link in self.links)

    @property
    def ready(self) -> bool:
        return self.mqtt_connected and self.database_ok and not self.stopping


async def serve(
    health: Health, port: int, registry: CollectorRegistry = REGISTRY, host: str = "127.0.0.1"
) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            path = request.split(b" ")[1].decode() if request.count(b" ") >= 2 else "/"
            status, ctype, body = _route(path, health, registry)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)


def _route(path: str, health: Health, registry: CollectorRegistry) -> tuple[str, str, bytes]:
    path = path.split("?", 1)[0]
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
    if path == "/healthz":
        return "200 OK", "text/plain", b"ok\n"
    if path == "/readyz":
        parts = f"mqtt={'up' if health.mqtt_connected else 'down'} " + (
            f"database={'up' if health.database_ok else 'down'}\n"
        )
        return (
            ("200 OK" if health.ready else "503 Service Unavailable"),
            "text/plain",
            parts.encode(),
        )
    return "404 Not Found", "text/plain", b"not found\n"
