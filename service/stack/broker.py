"""A Mosquitto instance from the project's mosquitto/eucora.conf, in a folder of its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from schemas.topics import TopicTree
from service import dynsec
from service.stack import tls
from service.stack.process import (
    StackError,
    alive,
    check_reachable,
    chown_tree,
    port_open,
    service_user,
    spawn,
    stop_pid,
    wait_for,
)

CONFIG_TEMPLATE = Path(__file__).resolve().parents[2] / "mosquitto" / "eucora.conf"
_PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib",
    "/usr/local/lib",
)


def find_dynsec_plugin() -> str:
    for d in _PLUGIN_DIRS:
        candidate = Path(d) / "mosquitto_dynamic_security.so"
        if candidate.exists():
            return str(candidate)
    raise StackError(
        "mosquitto_dynamic_security.so not found: install the 'mosquitto' package (2.0+)"
    )


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not found:
        raise StackError("mosquitto not found: apt-get install mosquitto")
    return found


@dataclass
class Broker:
    """One broker: its folder, port and accounts. `start()` is idempotent."""

    data_dir: Path
    port: int
    passwords: dict[str, str] = field(repr=False)
    tree: TopicTree = field(default_factory=TopicTree)
    bind: str = "127.0.0.1"
    # Extra config lines (tests use it to shrink limits, e.g. max_queued_messages).
    extra: str = ""
    # A TLS (mqtts) listener on this port, with a server certificate from the CA in
    # `ca_dir` (created there the first time); None: plain MQTT only.
    tls_port: int | None = None
    ca_dir: Path | None = None

    @property
    def config_file(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "mosquitto.pid"

    def url(self, user: str) -> str:
        return f"mqtt://{user}:{self.passwords[user]}@{self.bind}:{self.port}"

    def tls_url(self, user: str | None = None) -> str:
        """The mqtts:// URL (with `user`'s credentials when given); needs `tls_port`."""
        if self.tls_port is None:
            raise StackError("this broker has no TLS listener")
        cred = f"{user}:{self.passwords[user]}@" if user else ""
        return f"mqtts://{cred}{self._client_host}:{self.tls_port}"

    @property
    def _client_host(self) -> str:
        # The address a local client dials; the certificate names it too.
        return "127.0.0.1" if self.bind in ("0.0.0.0", "::", "") else self.bind  # noqa: S104

    @property
    def ca(self) -> tls.CertificateAuthority:
        return tls.CertificateAuthority(self.ca_dir or self.data_dir.parent / "ca")

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate clients must trust for the TLS listener (None without TLS)."""
        return self.ca.cert_file if self.tls_port is not None else None

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        return alive(self.pid)

    def prepare(self) -> None:
        """Write the config and, the first time only, the accounts file."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        user = service_user("mosquitto")
        text = Template(CONFIG_TEMPLATE.read_text()).substitute(
            port=self.port,
            bind=self.bind,
            data_dir=str(self.data_dir),
            dynsec_plugin=find_dynsec_plugin(),
            user=user.pw_name if user else _current_user(),
            tls_listener=self._tls_listener(),
            extra=self.extra,
        )
        self.config_file.write_text(text)
        accounts = self.accounts_file
        if not accounts.exists():
            accounts.write_text(json.dumps(dynsec.initial_config(self.tree, self.passwords)))
            os.chmod(accounts, 0o600)
        self._backup_accounts()
        if user:
            check_reachable(self.data_dir.parent, user)
            chown_tree(self.data_dir, user)

    def _backup_accounts(self) -> None:
        """Keep a copy of the last good accounts file, and refuse to start on a damaged one.

        Mosquitto 2.0.11's plugin rewrites dynamic-security.json in place (truncate,
        write), so a crash in the middle of a save leaves half a file, and a broker
        that starts on it has no accounts at all.
        """
        backup = self.accounts_file.with_suffix(".json.bak")
        data = self.accounts_file.read_bytes()
        try:
            json.loads(data)
        except ValueError:
            raise StackError(
                f"{self.accounts_file} is damaged (the broker stopped in the middle of "
                f"saving it?); the copy from the last good start is {backup}: check it, "
                "copy it over the damaged file, then start again"
            ) from None
        backup.unlink(missing_ok=True)
        backup.touch(mode=0o600)
        backup.write_bytes(data)

    def _tls_listener(self) -> str:
        if self.tls_port is None:
            return ""
        hosts = [self._client_host, "localhost", "127.0.0.1", socket.gethostname()]
        files = self.ca.ensure().issue_server(self.data_dir / "tls", hosts)
        return "\n".join([
            f"listener {self.tls_port} {self.bind}",
            "protocol mqtt",
            f"cafile {files.ca_file}",
            f"certfile {files.cert_file}",
            f"keyfile {files.key_file}",
            # Minimum version: TLS 1.0/1.1 are deprecated (RFC 8996).
            "tls_version tlsv1.2",
        ])  # fmt: skip

    @property
    def accounts_file(self) -> Path:
        return self.data_dir / "dynamic-security.json"

    def seed_agents(self, passwords: dict[str, str]) -> None:
        """Add agent accounts while the broker is stopped (bulk enrolment, O(N))."""
        if self.running:
            raise StackError("stop the broker before seeding accounts into its file")
        self.prepare()
        config = json.loads(self.accounts_file.read_text())
        dynsec.add_agents(config, self.tree, passwords)
        tmp = self.accounts_file.with_suffix(".json.new")
        tmp.unlink(missing_ok=True)
        tmp.touch(mode=0o600)
        tmp.write_text(json.dumps(config))
        owner = self.accounts_file.stat()
        os.chown(tmp, owner.st_uid, owner.st_gid)
        os.replace(tmp, self.accounts_file)  # atomic: the broker never sees half a file

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.prepare()
        ports = [self.port] + ([self.tls_port] if self.tls_port is not None else [])
        for port, option in zip(ports, ("--mqtt-port", "--mqtts-port"), strict=False):
            if port_open(self._client_host, port):
                raise StackError(f"port {port} is already in use: choose another {option}")
        proc = spawn([find_mosquitto(), "-c", str(self.config_file)], self.data_dir / "stdout.log")
        self.pid_file.write_text(str(proc.pid))
        try:
            wait_for(
                lambda: (
                    all(port_open(self._client_host, p) for p in ports) or proc.poll() is not None
                ),
                timeout,
                f"mosquitto on port(s) {', '.join(map(str, ports))}",
            )
        except StackError:
            proc.kill()
            raise
        if proc.poll() is not None:
            raise StackError(
                f"mosquitto exited with code {proc.returncode}; see {self.log_file}: "
                + _tail(self.log_file)
                + _tail(self.data_dir / "stdout.log")
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: the broker writes its store (sessions, queues, retained) and exits."""
        stop_pid(self.pid, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: everything since the last autosave is lost, as in a crash."""
        stop_pid(self.pid, sig=signal.SIGKILL)

    def wipe_store(self) -> None:
        """Remove the persistence file, as on a broker that comes back empty."""
        (self.data_dir / "mosquitto.db").unlink(missing_ok=True)


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
