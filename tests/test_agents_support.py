"""Helpers for the agent tests (no tests here): provisioning, agent processes,
in-process sessions on a loop thread, database polling."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from agent.loop import Loop, run_in_thread
from agent.protocol import EpochClock, HostInfo, Metrics
from agent.session import AgentSession, Timing
from schemas.config import MqttUrl
from schemas.payloads import Software
from schemas.states import Platform
from service import identity
from service.stack.broker import Broker

T = TypeVar("T")


def provision(broker: Broker, *agent_ids: str) -> dict[str, str]:
    """Broker accounts for these agents (the files only, no registry rows: the
    bridge adds those on first contact); returns their passwords."""
    passwords = {a: identity.new_password() for a in agent_ids}
    identity.add_agents(broker.auth, {a: identity.hash_password(p) for a, p in passwords.items()})
    return passwords


def agent_url(broker: Broker, agent_id: str, password: str) -> str:
    return f"mqtt://{agent_id}:{password}@{broker.bind}:{broker.port}"


def wait(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll until `check()` returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def query(database: str, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
    with psycopg.connect(database, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def agent_status(database: str, agent_id: str) -> tuple[str, int | None, bool] | None:
    rows = query(
        database, "SELECT status, status_epoch, stale FROM agents WHERE agent_id = %s", (agent_id,)
    )
    return tuple(rows[0]) if rows else None  # type: ignore[return-value]


@dataclass
class AgentProcess:
    """`python -m agent run` as an operator would start it."""

    agent_id: str
    env: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", *self.args],
            env=os.environ | self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    made: list[AgentProcess] = []

    def make(
        broker: Broker, agent_id: str, password: str, *args: str, start: bool = True, **env: str
    ) -> AgentProcess:
        p = AgentProcess(
            agent_id,
            {
                "EUCORA_AGENT_ID": agent_id,
                "EUCORA_MQTT_URL": agent_url(broker, agent_id, password),
                "EUCORA_AGENT_INVENTORY": "none",
                **env,
            },
            tmp_path / f"agent-{agent_id}-{len(made)}.log",
            list(args),
        )
        made.append(p)
        return p.start() if start else p

    yield make
    for p in made:
        if p.proc is not None and p.proc.poll() is None:
            p.kill()


class FakeHost:
    """A host whose facts and software the test sets."""

    def __init__(self, hostname: str = "test-host") -> None:
        self.host_info = HostInfo(
            hostname=hostname,
            platform=Platform.LINUX,
            os_version="Debian GNU/Linux 12",
            cpu_count=4,
            memory_bytes=8 << 30,
            disk_bytes=256 << 30,
            ip_address="192.0.2.10",
            mac_address="02:00:00:00:00:01",
        )
        self.packages: list[Software] | None = None
        self.samples = 0

    def info(self) -> HostInfo:
        return self.host_info

    def metrics(self) -> Metrics:
        self.samples += 1
        return Metrics(10.0 + self.samples % 50, 40.0, 50.0, 1000 * self.samples, 500)

    def software(self) -> list[Software] | None:
        return None if self.packages is None else list(self.packages)

    def uptime(self) -> float | None:
        return 1234.5


class LoopThread:
    """An agent Loop served by a thread; `call` runs a function on it and waits."""

    def __init__(self) -> None:
        self.loop = Loop()
        self.thread = run_in_thread(self.loop)

    def call(self, fn: Callable[[], T], timeout: float = 10) -> T:
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:
                box.append((False, exc))
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(timeout), "the agent loop did not answer"
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def session(
        self,
        broker: Broker,
        agent_id: str,
        password: str,
        *,
        host: FakeHost | None = None,
        timing: Timing | None = None,
        epochs: EpochClock | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> AgentSession:
        def make() -> AgentSession:
            s = AgentSession(
                self.loop,
                agent_id=agent_id,
                url=MqttUrl.parse(agent_url(broker, agent_id, password)),
                host=host or FakeHost(),
                timing=timing or Timing(keepalive=5, telemetry_interval=3600,
                                        heartbeat_interval=3600, inventory_interval=3600),
                epochs=epochs,
                **kwargs,
            )  # fmt: skip
            if start:
                s.start()
            return s

        return self.call(make)

    def session_at(
        self,
        url: MqttUrl,
        agent_id: str,
        *,
        host: FakeHost | None = None,
        timing: Timing | None = None,
        start_delay: float = 0.0,
        **kwargs: Any,
    ) -> AgentSession:
        """A session to any URL (e.g. a peer that misbehaves), started."""

        def make() -> AgentSession:
            s = AgentSession(self.loop, agent_id=agent_id, url=url, host=host or FakeHost(),
                             timing=timing or Timing(), **kwargs)  # fmt: skip
            s.start(delay=start_delay)
            return s

        return self.call(make)

    def close(self) -> None:
        self.loop.stop()
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


class Proxy:
    """A TCP relay on loopback to the broker that the test can cut and restore: an
    agent's network outage while the broker and the bridge stay up."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        from service.stack.process import free_port

        self.host, self.target = host, target_port
        self.port = free_port()
        self._conns: list[Any] = []
        self._listener: Any = None
        self.accepted: list[float] = []  # time.monotonic() of each accepted connection
        self.flowing = threading.Event()
        self.flowing.set()
        self._lock = threading.Lock()
        self.start()

    def start(self) -> None:
        import socket

        listener = socket.create_server((self.host, self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: Any) -> None:
        import socket

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            try:
                upstream = socket.create_connection((self.host, self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                if self.flowing.is_set():
                    dst.sendall(data)
                # else: black-holed, as on a dead path: nothing gets through either way
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def black_hole(self) -> None:
        """Half-open: every connection stays open and new ones are accepted, but no
        byte gets through either way (no FIN, no RST), until `restore`."""
        self.flowing.clear()

    def restore(self) -> None:
        self.flowing.set()

    def cut(self) -> None:
        """Refuse new connections and drop the open ones (both sides see them close)."""
        import socket

        # shutdown() first: close() alone does not wake a thread blocked in accept().
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self.cut()
