"""A Mosquitto instance from the project's mosquitto/eucora.conf, in a folder of its own,
reading its accounts from the auth folder it shares with the other brokers of the host."""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from schemas.topics import TopicTree
from service import identity, revocation
from service.stack import tls
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

CONFIG_TEMPLATE = Path(__file__).resolve().parents[2] / "mosquitto" / "eucora.conf"


@dataclass
class Broker:
    """One broker: its folder, ports and service accounts. `start()` is idempotent.

    `port` (and `tls_port`) is the agent listener, `service_port` the listener of the
    bridge and operators (`url()`); the accounts are in `auth_dir` (default: `auth/`
    beside `data_dir`), shared with the other brokers of the host.
    """

    data_dir: Path
    port: int
    passwords: dict[str, str] = field(repr=False)
    service_port: int = 0  # 0: port + 1000
    tree: TopicTree = field(default_factory=TopicTree)
    bind: str = "127.0.0.1"
    service_bind: str = "127.0.0.1"
    auth_dir: Path | None = None
    # The name of its pid record in the auth folder (several brokers share the folder).
    name: str = "broker-1"
    # Extra config lines (tests use it to shrink limits, e.g. max_queued_messages).
    extra: str = ""
    # A TLS (mqtts) listener on this port, with a server certificate from the CA in
    # `ca_dir` (created there the first time); None: plain MQTT only.
    tls_port: int | None = None
    ca_dir: Path | None = None
    # More names for the server certificate (DNS names or IPs agents dial), besides
    # the bind address, localhost, 127.0.0.1 and this host's name.
    tls_names: tuple[str, ...] = ()
    # The certificate listener (agents with a client certificate signed by the CA in
    # `ca_dir`) on this port; needs `tls_port` (it shares the server certificate).
    cert_port: int | None = None

    def __post_init__(self) -> None:
        self.service_port = self.service_port or self.port + 1000

    @property
    def auth(self) -> identity.AuthDir:
        return identity.AuthDir(self.auth_dir or self.data_dir.parent / "auth")

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
        """A service account's URL (the service listener), with its password."""
        return f"mqtt://{user}:{self.passwords[user]}@{self.service_bind}:{self.service_port}"

    @property
    def service_endpoint(self) -> str:
        """The service listener without credentials (the `brokers` table's url)."""
        return f"mqtt://{self.service_bind}:{self.service_port}"

    @property
    def agent_url(self) -> str:
        """What agents are given: the TLS listener when there is one, no credentials."""
        if self.tls_port is not None:
            return self.tls_url()
        return f"mqtt://{self._client_host}:{self.port}"

    def tls_url(self, user: str | None = None) -> str:
        """The mqtts:// URL (with `user`'s credentials when given); needs `tls_port`."""
        if self.tls_port is None:
            raise StackError("this broker has no TLS listener")
        cred = f"{user}:{self.passwords[user]}@" if user else ""
        return f"mqtts://{cred}{self._client_host}:{self.tls_port}"

    @property
    def cert_agent_url(self) -> str | None:
        """What agents with a certificate are given (no credentials); None without a
        certificate listener."""
        if self.cert_port is None or self.tls_port is None:
            return None
        return f"mqtts://{self._client_host}:{self.cert_port}"

    @property
    def serves_certificates(self) -> bool:
        """The certificate listener is in the config this broker last started with (a
        broker started before the listener existed gets it at its next start)."""
        if self.cert_agent_url is None:
            return False
        try:
            return f"listener {self.cert_port} " in self.config_file.read_text()
        except OSError:
            return False

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
        """Write the config, and the auth folder's ACLs and service accounts."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        user = service_user("mosquitto")
        auth = self.auth
        text = Template(CONFIG_TEMPLATE.read_text()).substitute(
            port=self.port,
            bind=self.bind,
            service_port=self.service_port,
            service_bind=self.service_bind,
            auth_dir=str(auth.path),
            data_dir=str(self.data_dir),
            user=user.pw_name if user else _current_user(),
            tls_listener=self._tls_listener(),
            cert_listener=self._cert_listener(),
            extra=self.extra,
        )
        self.config_file.write_text(text)
        auth.prepare(self.tree, self.passwords, owner=user.pw_uid if user else None)
        if self.cert_agent_url is not None:
            revocation.ensure_crl(auth, self.ca.signer())
        if user:
            check_reachable(self.data_dir.parent, user)
            check_reachable(auth.path.parent, user)
            chown_tree(self.data_dir, user)
            chown_tree(auth.path, user)

    def _tls_listener(self) -> str:
        if self.tls_port is None:
            return ""
        hosts = [
            self._client_host, "localhost", "127.0.0.1", socket.gethostname(), *self.tls_names
        ]  # fmt: skip
        files = self.ca.ensure().issue_server(self.data_dir / "tls", hosts)
        return "\n".join([
            f"listener {self.tls_port} {self.bind}",
            "protocol mqtt",
            f"cafile {files.ca_file}",
            f"certfile {files.cert_file}",
            f"keyfile {files.key_file}",
            # Minimum version: TLS 1.0/1.1 are deprecated (RFC 8996).
            "tls_version tlsv1.2",
            # per_listener_settings: the agent listener's security, again.
            "allow_anonymous false",
            "use_username_as_clientid true",
            f"password_file {self.auth.agents_file}",
            f"acl_file {self.auth.agents_acl}",
        ])  # fmt: skip

    def _cert_listener(self) -> str:
        if self.cert_agent_url is None:
            return ""
        tls_dir = self.data_dir / "tls"  # _tls_listener() issued the server certificate
        return "\n".join([
            f"listener {self.cert_port} {self.bind}",
            "protocol mqtt",
            f"cafile {tls_dir / 'ca.pem'}",
            f"certfile {tls_dir / 'server.pem'}",
            f"keyfile {tls_dir / 'server.key'}",
            "tls_version tlsv1.2",
            # A client certificate signed by the CA and not in the CRL, or no TLS session.
            "require_certificate true",
            f"crlfile {self.auth.crl_file}",
            # The certificate's CN is the username, and the client id: an agent can never
            # take another's id. No password is checked here (nor read).
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "allow_anonymous false",
            f"acl_file {self.auth.agents_acl}",
        ])  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.prepare()
        ports = [self.port, self.service_port]
        options = ["--mqtt-port", "--service-port"]
        if self.tls_port is not None:
            ports.append(self.tls_port)
            options.append("--mqtts-port")
        if self.cert_agent_url is not None:
            assert self.cert_port is not None
            ports.append(self.cert_port)
            options.append("--mqtts-cert-port")
        for port, option in zip(ports, options, strict=True):
            if port_open(self._client_host, port):
                raise StackError(f"port {port} is already in use: choose another {option}")
        proc = spawn(
            [find_program("mosquitto", "mosquitto"), "-c", str(self.config_file)],
            self.data_dir / "stdout.log",
        )
        self.pid_file.write_text(str(proc.pid))
        # Where `eucora agents provision/revoke` find every broker to reload.
        self.auth.pid_file(self.name).write_text(str(proc.pid))
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
                + log_tail(self.log_file)
                + log_tail(self.data_dir / "stdout.log")
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: the broker writes its store (sessions, queues, retained) and exits."""
        stop_pid(self.pid, timeout=timeout)
        self.auth.pid_file(self.name).unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: everything since the last autosave is lost, as in a crash."""
        stop_pid(self.pid, sig=signal.SIGKILL)
        self.auth.pid_file(self.name).unlink(missing_ok=True)

    def reload(self) -> None:
        """SIGHUP: re-read the account files (as `eucora agents provision` does)."""
        pid = self.pid
        if alive(pid):
            assert pid is not None
            os.kill(pid, signal.SIGHUP)

    def wipe_store(self) -> None:
        """Remove the persistence file, as on a broker that comes back empty."""
        (self.data_dir / "mosquitto.db").unlink(missing_ok=True)


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name
