"""A NATS server with JetStream, in a folder of its own (`eucora stack up --events nats`).

The server is the system's `nats-server` (Debian's package). Its config, JetStream
store, log and pid file live in `data_dir`; clients log in with one account whose
password the stack keeps in its secrets. Several servers given each other's cluster
ports form a JetStream cluster (the tests' 3-node cluster on loopback).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from service.stack.process import (
    StackError,
    alive,
    check_reachable,
    chown_tree,
    find_program,
    log_tail,
    port_open,
    service_user,
    spawn,
    stop_pid,
    wait_for,
)

# The account the bridge (and an operator's consumer) uses.
NATS_USER = "eucora"


@dataclass
class NatsServer:
    """One nats-server with JetStream; `start()` is idempotent.

    With `cluster_port` it joins the cluster `cluster_name` and dials the members'
    cluster ports in `routes` (JetStream then replicates streams across them).
    """

    data_dir: Path
    port: int
    password: str = field(repr=False)
    bind: str = "127.0.0.1"
    name: str = "eucora-nats-1"
    cluster_name: str = "eucora"
    cluster_port: int | None = None
    routes: list[int] = field(default_factory=list)
    # JetStream limits of this server (the stream's own limits are the relay's).
    max_file_store: str = "10G"
    max_memory_store: str = "256M"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "nats.conf"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nats.log"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "nats.pid"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "jetstream"

    def url(self, with_password: bool = True) -> str:
        """The client URL (the value of EUCORA_EVENTS_URL), with the account's password."""
        cred = f"{NATS_USER}:{self.password}@" if with_password else ""
        return f"nats://{cred}{self._client_host}:{self.port}"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.bind in ("0.0.0.0", "::", "") else self.bind  # noqa: S104

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        return alive(self.pid)

    def config(self) -> str:
        lines = [
            f'server_name: "{self.name}"',
            f'listen: "{self.bind}:{self.port}"',
            f'pid_file: "{self.pid_file}"',
            f'log_file: "{self.log_file}"',
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            f"  max_file_store: {self.max_file_store}",
            f"  max_memory_store: {self.max_memory_store}",
            "}",
            "authorization {",
            f'  user: "{NATS_USER}"',
            f'  password: "{self.password}"',
            "}",
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f'"nats-route://{self._client_host}:{p}"' for p in self.routes)
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self._client_host}:{self.cluster_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def prepare(self) -> None:
        """Write the config (mode 0600: it holds the password); hand the folder to the
        'nats' account when we are root, as the server runs as it then."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.store_dir.mkdir(exist_ok=True)
        self.config_file.touch(mode=0o600, exist_ok=True)
        os.chmod(self.config_file, 0o600)
        self.config_file.write_text(self.config())
        user = service_user("nats")
        if user:
            check_reachable(self.data_dir.parent, user)
            chown_tree(self.data_dir, user)

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.prepare()
        ports = [self.port] + ([self.cluster_port] if self.cluster_port is not None else [])
        for port in ports:
            if port_open(self._client_host, port):
                raise StackError(f"port {port} is already in use: choose another NATS port")
        self.pid_file.unlink(missing_ok=True)
        proc = spawn(
            [find_program("nats-server", "nats-server"), "-c", str(self.config_file)],
            self.data_dir / "stdout.log",
            user=service_user("nats"),
        )
        try:
            wait_for(
                lambda: port_open(self._client_host, self.port) or proc.poll() is not None,
                timeout,
                f"nats-server on port {self.port}",
            )
        except StackError:
            proc.kill()
            raise
        if proc.poll() is not None:
            raise StackError(
                f"nats-server exited with code {proc.returncode}; see {self.log_file}: "
                + log_tail(self.log_file)
                + log_tail(self.data_dir / "stdout.log")
            )
        if self.pid is None:  # it writes the file as it starts listening
            self.pid_file.write_text(str(proc.pid))

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: the server closes its store and exits."""
        stop_pid(self.pid, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        stop_pid(self.pid, sig=signal.SIGKILL)
