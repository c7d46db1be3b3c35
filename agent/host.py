"""This machine, as the reference agent reports it: facts for the registration, metrics
from psutil, software from agent.inventory."""

from __future__ import annotations

import contextlib
import platform
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import psutil

from agent import inventory
from agent.protocol import HostInfo, Metrics
from schemas.payloads import Software
from schemas.states import Platform


def this_platform() -> Platform:
    if sys.platform.startswith("linux"):
        return Platform.LINUX
    if sys.platform == "darwin":
        return Platform.MACOS
    if sys.platform in ("win32", "cygwin"):
        return Platform.WINDOWS
    raise RuntimeError(f"unsupported platform {sys.platform!r}: linux, macos or windows")


def os_version() -> str:
    if sys.platform.startswith("linux"):
        pretty = None
        with contextlib.suppress(OSError):
            for line in Path("/etc/os-release").read_text().splitlines():
                if line.startswith("PRETTY_NAME="):
                    pretty = line.partition("=")[2].strip().strip('"')
        return f"{pretty or 'Linux'} (kernel {platform.release()})"
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return platform.platform()


def disk_root() -> str:
    return "C:\\" if sys.platform == "win32" else "/"


def local_address(broker_host: str, broker_port: int) -> str:
    """The address this host uses to reach the broker (a UDP connect sends nothing)."""
    with contextlib.suppress(OSError):
        family = socket.AF_INET6 if ":" in broker_host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((broker_host, broker_port))
            return str(s.getsockname()[0])
    return "127.0.0.1"


def mac_for(address: str) -> str:
    """The MAC of the interface holding `address`, else of the first real interface."""
    addrs = psutil.net_if_addrs()
    fallback = None
    for nics in addrs.values():
        macs = [a.address for a in nics if a.family == psutil.AF_LINK]
        mac = next((m for m in macs if m and m.replace("-", ":") != "00:00:00:00:00:00"), None)
        if mac is None:
            continue
        if any(a.address == address for a in nics):
            return mac.replace("-", ":").lower()
        fallback = fallback or mac
    if fallback:
        return fallback.replace("-", ":").lower()
    node = uuid.getnode()
    return ":".join(f"{(node >> s) & 0xFF:02x}" for s in range(40, -8, -8))


class RealHost:
    """The machine the agent runs on."""

    def __init__(
        self, broker_host: str, broker_port: int, inventory_sources: Sequence[str]
    ) -> None:
        self._broker = (broker_host, broker_port)
        self._sources = tuple(inventory_sources)
        self._net = psutil.net_io_counters()
        psutil.cpu_percent(interval=None)  # primes the counter: the next call measures

    def info(self) -> HostInfo:
        address = local_address(*self._broker)
        return HostInfo(
            hostname=socket.gethostname()[:255] or "localhost",
            platform=this_platform(),
            os_version=os_version()[:256],
            cpu_count=psutil.cpu_count(logical=True) or 1,
            memory_bytes=psutil.virtual_memory().total,
            disk_bytes=psutil.disk_usage(disk_root()).total,
            ip_address=address,
            mac_address=mac_for(address),
        )

    def metrics(self) -> Metrics:
        net = psutil.net_io_counters()
        # Counters can reset (interface down/up, wrap): a negative delta counts as zero.
        rx = max(net.bytes_recv - self._net.bytes_recv, 0)
        tx = max(net.bytes_sent - self._net.bytes_sent, 0)
        self._net = net
        return Metrics(
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_percent=psutil.virtual_memory().percent,
            disk_percent=psutil.disk_usage(disk_root()).percent,
            net_rx_bytes=rx,
            net_tx_bytes=tx,
        )

    def software(self) -> Sequence[Software] | None:
        if not self._sources:
            return None
        return inventory.collect(self._sources)

    def uptime(self) -> float | None:
        return max(time.time() - psutil.boot_time(), 0.0)
