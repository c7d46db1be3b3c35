"""The local stack: broker(s) + database + bridge in one folder (`eucora stack up/down/status`).

The README's demo and the test fixtures both go through this module, so what the
tests start is what a user starts. State lives in the folder: `stack.json` (ports,
pids), `secrets.json` (generated passwords, mode 0600, never printed in logs) and
`auth/` (the account files every broker of the stack reads, service/identity.py).

With `--brokers N` the stack runs N brokers (shards of one fleet) from the same
config: broker i (1..N) listens for agents on mqtt_port + i - 1 (and on its own TLS
port, and certificate port for agents with a client certificate), for the bridge and
operators on service_port + i - 1 (default mqtt_port + 1000), keeps its data in
`mosquitto/` (broker 1) or `mosquitto-i/`, and is registered in the database's
`brokers` table, where each agent has its home.

With `--events nats` the stack also runs a nats-server with JetStream (`nats/`, client
port 14222 beside the default ports) and gives the bridge its URL as
EUCORA_EVENTS_URL, so the bridge's relay forwards every event to it; `--events none`
turns that off again. The default is no forwarding.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import DEFAULT_TOPIC_ROOT, MqttUrl
from schemas.topics import TopicTree
from service import identity
from service.stack.broker import Broker
from service.stack.database import Cluster
from service.stack.nats import NatsServer
from service.stack.process import (
    StackError,
    alive,
    free_port,
    free_port_range,
    spawn,
    stop_pid,
    wait_for,
)

DEFAULT_DIR = Path(".stack")
DEFAULT_MQTT_PORT = 11883
DEFAULT_MQTTS_PORT = 18883
# Certificate listeners (client certificates, mTLS): 19883... beside 18883...
DEFAULT_MQTTS_CERT_PORT = 19883
DEFAULT_DB_PORT = 15432
DEFAULT_NATS_PORT = 14222
# Where events go (`--events`): nowhere, or a local nats-server with JetStream.
EVENTS_TARGETS = ("none", "nats")
# Service listeners: this far above the agent ports (11883 -> 12883).
SERVICE_PORT_OFFSET = 1000


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except FileNotFoundError:
        return {}


def _write_private(path: Path, data: dict[str, Any]) -> None:
    path.touch(mode=0o600, exist_ok=True)
    os.chmod(path, 0o600)
    path.write_text(json.dumps(data, indent=2) + "\n")


@dataclass
class Stack:
    dir: Path

    def __post_init__(self) -> None:
        self.dir = self.dir.resolve()

    # --- persistent state ---------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "stack.json"

    def state(self) -> dict[str, Any]:
        return _load_json(self.state_file)

    def _save_state(self, **changes: Any) -> None:
        state = self.state() | changes
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def secrets(self) -> dict[str, str]:
        """Generated once per stack folder, then reused so accounts keep working."""
        path = self.dir / "secrets.json"
        data = _load_json(path)
        wanted = [*identity.SERVICE_USERS, "database", "grafana", "events"]
        if not all(k in data for k in wanted):
            data = {k: data.get(k) or identity.new_password() for k in wanted}
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_private(path, data)
        return data

    # --- parts --------------------------------------------------------------
    @property
    def auth_dir(self) -> Path:
        return self.dir / "auth"

    def broker(self, number: int = 1) -> Broker:
        """Broker `number` (1..N) of the stack."""
        st = self.state()
        port = (st.get("mqtt_port") or DEFAULT_MQTT_PORT) + number - 1
        tls_ports: list[int] = st.get("mqtts_ports") or (
            [st["mqtts_port"]] if st.get("mqtts_port") else []
        )
        cert_ports: list[int] = st.get("mqtts_cert_ports") or []
        service_base = st.get("service_port") or port - number + 1 + SERVICE_PORT_OFFSET
        return Broker(
            data_dir=self.dir / ("mosquitto" if number == 1 else f"mosquitto-{number}"),
            port=port,
            service_port=service_base + number - 1,
            passwords={u: self.secrets()[u] for u in identity.SERVICE_USERS},
            tree=TopicTree(st.get("topic_root", DEFAULT_TOPIC_ROOT)),
            extra=st.get("broker_extra", ""),
            tls_port=tls_ports[number - 1] if len(tls_ports) >= number else None,
            cert_port=cert_ports[number - 1] if len(cert_ports) >= number else None,
            ca_dir=self.dir / "ca",
            bind=st.get("mqtt_bind", "127.0.0.1"),
            tls_names=tuple(st.get("tls_names", ())),
            auth_dir=self.auth_dir,
            name=f"broker-{number}",
        )

    def brokers(self) -> list[Broker]:
        return [self.broker(i) for i in range(1, int(self.state().get("brokers", 1)) + 1)]

    def cluster(self, port: int | None = None, durable: bool | None = None) -> Cluster:
        st = self.state()
        return Cluster(
            root=self.dir / "postgres",
            port=port or st.get("db_port") or DEFAULT_DB_PORT,
            password=self.secrets()["database"],
            durable=st.get("durable", True) if durable is None else durable,
        )

    def nats(self) -> NatsServer:
        """The stack's nats-server (running only with `--events nats`)."""
        return NatsServer(
            data_dir=self.dir / "nats",
            port=self.state().get("nats_port") or DEFAULT_NATS_PORT,
            password=self.secrets()["events"],
        )

    @property
    def events_on(self) -> bool:
        return bool(self.state().get("events") == "nats")

    def events_url(self) -> str | None:
        """EUCORA_EVENTS_URL for the bridge and consumers; None without forwarding."""
        return self.nats().url() if self.events_on else None

    @property
    def bridge_log(self) -> Path:
        return self.dir / "bridge.log"

    def mqtt_url(self, user: str = identity.OPERATOR_USER) -> str:
        return self.broker().url(user)

    def database_url(self) -> str:
        external: str | None = self.state().get("external_database_url")
        return external or self.cluster().url

    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.state().get('metrics_port')}"

    # --- lifecycle ----------------------------------------------------------
    def up(
        self,
        *,
        mqtt_port: int | None = None,
        mqtts_port: int | None = None,
        mqtts_cert_port: int | None = None,
        bind: str | None = None,
        db_port: int | None = None,
        metrics_port: int | None = None,
        database_url: str | None = None,
        topic_root: str = DEFAULT_TOPIC_ROOT,
        bridge: bool = True,
        durable: bool = True,
        broker_extra: str = "",
        brokers: int | None = None,
        service_port: int | None = None,
        tls_names: Sequence[str] = (),
        events: str | None = None,
    ) -> dict[str, Any]:
        """Start whatever is not running yet; return the URLs to use. `brokers` only
        ever adds brokers: agents keep their home broker. `tls_names` are added to the
        names the brokers' server certificate carries (kept for later `up`s). `events`
        ("nats" or "none"; None: as before) turns forwarding to a local JetStream on or off."""
        from service.db import migrate  # the database layer is only needed here

        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # noqa: S103 (the broker and database accounts walk through it)
        st = self.state()
        mqtt_port = mqtt_port or st.get("mqtt_port") or DEFAULT_MQTT_PORT
        count = max(brokers or 1, int(st.get("brokers", 1)))
        tls_ports: list[int] = st.get("mqtts_ports") or (
            [st["mqtts_port"]] if st.get("mqtts_port") else []
        )
        if mqtts_port:
            tls_ports[:1] = [mqtts_port]
        service_base = service_port or st.get("service_port") or mqtt_port + SERVICE_PORT_OFFSET
        taken = {p + i for p in (mqtt_port, service_base) for i in range(count)}
        names = list(dict.fromkeys([*st.get("tls_names", []), *tls_names]))
        if names != st.get("tls_names", []) and any(b.running for b in self.brokers()):
            # The certificate is issued when a broker starts: a running one keeps its own.
            raise StackError(
                "the brokers are running with their certificate: `eucora stack down` first,"
                " then `eucora stack up --tls-name ...`"
            )
        while len(tls_ports) < count:
            # TLS listeners: 18883... beside the default 11883...; a stack moved to
            # another plain port (a second stack, a test) gets free TLS ports instead
            # of colliding. `stack env` and `agents provision` tell which.
            first = tls_ports[0] if tls_ports else None
            default = mqtt_port == DEFAULT_MQTT_PORT or first == DEFAULT_MQTTS_PORT
            port = DEFAULT_MQTTS_PORT + len(tls_ports) if default else free_port()
            if port not in taken:
                tls_ports.append(port)
        cert_ports: list[int] = st.get("mqtts_cert_ports") or []
        if mqtts_cert_port:
            cert_ports[:1] = [mqtts_cert_port]
        taken |= set(tls_ports)
        while len(cert_ports) < count:
            # Certificate listeners follow the TLS ports' rule: 19883... beside the
            # default 18883..., free ports on a stack whose TLS ports are free ones.
            default = tls_ports[0] == DEFAULT_MQTTS_PORT or (
                cert_ports[:1] == [DEFAULT_MQTTS_CERT_PORT]
            )
            port = DEFAULT_MQTTS_CERT_PORT + len(cert_ports) if default else free_port()
            if port not in taken:
                cert_ports.append(port)
        if events is not None and events not in EVENTS_TARGETS:
            raise StackError(f"--events must be one of {', '.join(EVENTS_TARGETS)}, not {events}")
        events = events or st.get("events") or "none"
        # The bridge reads EUCORA_EVENTS_URL when it starts: a change restarts it.
        restart_bridge = events != (st.get("events") or "none")
        nats_port = st.get("nats_port")
        if events == "nats" and not nats_port:
            # Below the ephemeral range: no outgoing connection takes it before a restart.
            nats_port = DEFAULT_NATS_PORT if mqtt_port == DEFAULT_MQTT_PORT else free_port_range(1)
        self._save_state(
            dir=str(self.dir),
            mqtt_port=mqtt_port,
            mqtt_bind=bind or st.get("mqtt_bind", "127.0.0.1"),
            brokers=count,
            mqtts_ports=tls_ports,
            mqtts_port=tls_ports[0],
            mqtts_cert_ports=cert_ports,
            service_port=service_base,
            db_port=db_port or st.get("db_port") or DEFAULT_DB_PORT,
            metrics_port=metrics_port or st.get("metrics_port") or free_port(),
            external_database_url=database_url or st.get("external_database_url"),
            topic_root=topic_root,
            durable=durable,
            broker_extra=broker_extra,
            tls_names=names,
            events=events,
            nats_port=nats_port,
        )
        for broker in self.brokers():
            broker.start()
        if self.events_on:
            self.nats().start()
        else:
            self.nats().stop()
        if not self.state().get("external_database_url"):
            self.cluster().start()
        migrate.upgrade(self.database_url())
        self._grafana_login()
        self._register_brokers()
        if bridge:
            if restart_bridge:
                self.stop_bridge()
            self.start_bridge()
        return self.urls()

    def _grafana_login(self) -> None:
        """The dashboards' read-only role logs in with the stack's secret (or
        EUCORA_GRAFANA_DB_PASSWORD: compose.yaml hands the same to Grafana)."""
        from service.db import grafana
        from service.db.connect import connect

        password = os.environ.get(grafana.PASSWORD_ENV) or self.secrets()["grafana"]
        with connect(self.database_url(), autocommit=True) as conn:
            grafana.grant_login(conn, password)

    def _register_brokers(self) -> None:
        """Each broker in the `brokers` table (idempotent); the agents file rebuilt
        from the registry when this folder has none yet (e.g. a new host on an
        existing database), and the CRL when it does not list what the registry has
        revoked; then every broker reloaded."""
        from service import revocation
        from service.db.connect import connect
        from service.domains import accounts

        brokers = self.brokers()
        with connect(self.database_url()) as conn, conn.transaction():
            accounts.register_brokers(
                conn,
                [
                    (i, b.service_endpoint, b.agent_url,
                     b.cert_agent_url if b.serves_certificates else None)
                    for i, b in enumerate(brokers, 1)
                ],
            )  # fmt: skip
            auth = identity.AuthDir(self.auth_dir)
            if not auth.agents():
                hashes = accounts.account_hashes(conn)
                if hashes:
                    identity.add_agents(auth, hashes)
            if any(b.serves_certificates for b in brokers):
                revoked = accounts.revoked_certificates(conn)
                if {serial for serial, _ in revoked} != revocation.listed(auth):
                    revocation.publish_crl(auth, brokers[0].ca.signer(), revoked)
                    # The brokers refuse those certificates once `stack up` returns.
                    operator = [MqttUrl.parse(b.url(identity.OPERATOR_USER)) for b in brokers]
                    failed = revocation.confirm_reload(operator)
                    if failed:
                        raise StackError("; ".join(failed))

    def urls(self) -> dict[str, Any]:
        brokers = self.brokers()
        return {
            "dir": str(self.dir),
            "mqtt_url": self.mqtt_url(),
            # One per broker (the operator's credentials), the first being mqtt_url.
            "mqtt_urls": [b.url(identity.OPERATOR_USER) for b in brokers],
            "database_url": self.database_url(),
            "metrics_url": self.metrics_url(),
        } | ({"events_url": self.events_url()} if self.events_on else {})

    def env(self) -> dict[str, str]:
        """What an operator's shell needs (`eucora stack env`): the operator's broker URL
        (broker 1's service listener), the database, the auth folder that `agents
        provision/revoke` write, and the CA that provisioned agents are given."""
        st = self.state()
        broker = self.broker()
        env = {
            "EUCORA_MQTT_URL": broker.url(identity.OPERATOR_USER),
            "EUCORA_DATABASE_URL": self.database_url(),
            "EUCORA_TOPIC_ROOT": st.get("topic_root", DEFAULT_TOPIC_ROOT),
            identity.AUTH_DIR_ENV: str(self.auth_dir),
        }
        if broker.tls_port is not None:
            env["EUCORA_CA_FILE"] = str(broker.ca.cert_file)
            # What `agents provision --cert` signs with and `agents revoke` signs the
            # CRL with: the CA's private key (mode 0600, this account's).
            env["EUCORA_CA_KEY"] = str(broker.ca.key_file)
        events_url = self.events_url()
        if events_url:
            env["EUCORA_EVENTS_URL"] = events_url
        return env

    def bridge_env(self) -> dict[str, str]:
        """The bridge's settings. Events go to the stack's nats-server with `--events
        nats`; otherwise where EUCORA_EVENTS_URL in the caller's environment says (an
        existing NATS, e.g. under Compose), or nowhere."""
        st = self.state()
        env = {
            "EUCORA_MQTT_URL": self.broker().url(identity.BRIDGE_USER),
            "EUCORA_DATABASE_URL": self.database_url(),
            "EUCORA_TOPIC_ROOT": st.get("topic_root", DEFAULT_TOPIC_ROOT),
            "EUCORA_METRICS_PORT": str(st["metrics_port"]),
            # Its brokers' logs, where refused credentials show (docs/broker.md).
            "EUCORA_BROKER_LOGS": os.pathsep.join(str(b.log_file) for b in self.brokers()),
        }
        events_url = self.events_url()
        if events_url:
            env["EUCORA_EVENTS_URL"] = events_url
        return env

    def start_bridge(self, timeout: float = 30.0) -> int:
        pid: int | None = self.state().get("bridge_pid")
        if alive(pid):
            assert pid is not None
            return pid
        env = os.environ | self.bridge_env()
        proc = spawn([sys.executable, "-m", "cli", "bridge", "run"], self.bridge_log, env)
        self._save_state(bridge_pid=proc.pid)
        try:
            wait_for(
                lambda: self.bridge_ready() or proc.poll() is not None,
                timeout,
                "the bridge to become ready",
            )
        except StackError:
            proc.kill()
            raise
        if proc.poll() is not None:
            raise StackError(
                f"the bridge exited with code {proc.returncode}; see {self.bridge_log}"
            )
        return proc.pid

    def bridge_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.metrics_url() + "/readyz", timeout=1) as resp:  # noqa: S310 (our own loopback URL)
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop_bridge(self) -> None:
        stop_pid(self.state().get("bridge_pid"))

    def down(self) -> None:
        self.stop_bridge()
        for broker in self.brokers():
            broker.stop()
        self.nats().stop()
        if not self.state().get("external_database_url"):
            self.cluster().stop()

    def _agent_counts(self) -> dict[int, int]:
        """Agents with an account per home broker; empty when the database is down."""
        import psycopg

        from service.db.connect import connect
        from service.domains import accounts

        try:
            with connect(self.database_url(), connect_timeout=2) as conn:
                return {b.broker_id: b.agents for b in accounts.brokers(conn)}
        except (OSError, psycopg.Error):  # DatabaseUnavailable is a ConnectionError
            return {}

    def status(self) -> dict[str, Any]:
        st = self.state()
        broker = self.broker()
        bridge_pid = st.get("bridge_pid")
        external = bool(st.get("external_database_url"))
        cluster = self.cluster()
        counts = self._agent_counts()
        return {
            "broker": {"pid": broker.pid, "running": broker.running, "port": broker.port},
            "brokers": [
                {
                    "mqtt_url": b.url(identity.OPERATOR_USER),
                    "pid": b.pid,
                    "running": b.running,
                    "agents": counts.get(i),
                }
                for i, b in enumerate(self.brokers(), 1)
            ],
            "database": {
                "pid": None if external else cluster.pid,
                "running": None if external else cluster.running,
                "port": None if external else cluster.port,
                "external": external,
            },
            "bridge": {
                "pid": bridge_pid,
                "running": alive(bridge_pid),
                "ready": self.bridge_ready() if alive(bridge_pid) else False,
                "metrics_url": self.metrics_url(),
            },
        } | ({"events": self._events_status()} if self.events_on else {})

    def _events_status(self) -> dict[str, Any]:
        nats = self.nats()
        return {
            "pid": nats.pid,
            "running": nats.running,
            "port": nats.port,
            "events_url": nats.url(with_password=False),
        }
