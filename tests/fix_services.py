"""A real Mosquitto (the project's mosquitto/eucora.conf) and a real bridge process.

Each test gets its own broker on a free port with its own data folder: starting one
takes a few milliseconds, and tests that restart or kill the broker then disturb no
one else. The bridge runs as `python -m cli bridge run`, exactly as the stack starts it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from service import identity
from service.stack.broker import Broker
from service.stack.process import alive, free_port, wait_for


@contextlib.contextmanager
def service_dir(prefix: str) -> Iterator[Path]:
    """A folder the broker and database accounts can reach even when we are root
    (pytest's tmp_path lives under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix=f"eucora-{prefix}-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def broker_passwords() -> dict[str, str]:
    """The service accounts' passwords (bridge, operator)."""
    return {u: identity.new_password() for u in identity.SERVICE_USERS}


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., Broker]]:
    """make(extra=..., tls=...) -> a started broker; killed and its folder removed after."""
    with contextlib.ExitStack() as cleanup:

        def make(extra: str = "", tls: bool = False) -> Broker:
            root = cleanup.enter_context(service_dir("mqtt"))
            b = Broker(
                data_dir=root / "mosquitto",
                port=free_port(),
                service_port=free_port(),
                passwords=broker_passwords(),
                extra=extra,
                # A CA and server certificate made for this broker (in root/ca): ~2 ms.
                tls_port=free_port() if tls else None,
                # With TLS, a certificate listener too (agents with a client certificate).
                cert_port=free_port() if tls else None,
            )
            cleanup.callback(b.kill)  # runs before the folder goes (last in, first out)
            b.start()
            return b

        yield make


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory()


def register_broker(broker: Broker, database_url: str, broker_id: int = 1) -> None:
    """The broker in the registry's `brokers` table, as `eucora stack up` does, so that
    `eucora agents provision` can give agents a home on it."""
    from service.db.connect import connect
    from service.domains import accounts

    with connect(database_url) as conn, conn.transaction():
        accounts.register_brokers(
            conn,
            [(broker_id, broker.service_endpoint, broker.agent_url, broker.cert_agent_url)],
        )


@dataclass
class BridgeProcess:
    env: dict[str, str]
    log_path: Path
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None
    runs: list[str] = field(default_factory=list)

    def start(self, wait_ready: bool = True) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "bridge", "run"],
            env=os.environ | self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        if wait_ready:
            wait_for(
                lambda: self.ready() or self.proc.poll() is not None,  # type: ignore[union-attr]
                30,
                "the bridge to be ready",
            )
            assert self.proc.poll() is None, f"bridge exited:\n{self.log()}"

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(resp.read().decode())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc is not None and alive(self.proc.pid) and self.proc.poll() is None


@pytest.fixture
def bridge_factory(tmp_path: Path) -> Iterator[object]:
    made: list[BridgeProcess] = []

    def make(
        broker: Broker,
        database_url: str,
        *,
        start: bool = True,
        client_id: str = "eucora-bridge-test",
        **env: str,
    ) -> BridgeProcess:
        port = free_port()
        b = BridgeProcess(
            env={
                "EUCORA_MQTT_URL": broker.url(identity.BRIDGE_USER),
                "EUCORA_DATABASE_URL": database_url,
                "EUCORA_METRICS_PORT": str(port),
                "EUCORA_BRIDGE_CLIENT_ID": client_id,
                "EUCORA_CONNECT_TIMEOUT": "30",
                **env,
            },
            log_path=tmp_path / f"bridge-{len(made)}.log",
            metrics_port=port,
        )
        made.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in made:
        if b.running:
            b.kill()


@pytest.fixture
def bridge(bridge_factory, broker: Broker, database: str) -> BridgeProcess:  # type: ignore[no-untyped-def]
    return bridge_factory(broker, database)  # type: ignore[no-any-return]
