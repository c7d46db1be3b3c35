"""Broker security against a real Mosquitto started from mosquitto/eucora.conf, with
accounts provisioned through `eucora agents provision` into a real registry.

Anonymous and wrong passwords refused; agents only on the agent listener, services
only on the service listener; an agent confined to its own topics and its own client
id; revocation drops a connected agent at once; everything a provisioned agent needs
works; TLS with the generated CA; no password in any log. MQTT 5 clients are used
where the broker reports a denial (PUBACK/SUBACK reason codes); with MQTT 3.1.1 a
denied publish is dropped silently.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import typer
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from typer.testing import CliRunner, Result

from cli import access
from schemas.config import MqttUrl
from schemas.topics import AGENT_KINDS, Kind, TopicTree
from service import identity
from service.db.connect import connect
from service.domains import accounts
from service.stack.broker import Broker
from service.stack.process import free_port, wait_for
from service.stack.stack import Stack
from tests.fix_services import BridgeProcess, service_dir
from tests.test_agents_support import LoopThread, loop_thread, wait

__all__ = ["loop_thread"]  # fixture

TREE = TopicTree()
TIMEOUT = 5.0
V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311

# The functions `eucora agents provision/revoke` register, on an app of their own.
cli = typer.Typer()
cli.command("provision")(access.provision)
cli.command("revoke")(access.revoke)
cli.command("delete")(access.delete)
runner = CliRunner()


class Probe:
    """One MQTT client whose broker answers (CONNACK, SUBACK, PUBACK, DISCONNECT) can be
    awaited with a timeout: paho calls back on its own thread, tests wait on events."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None,
        client_id: str,
        *,
        protocol: MQTTProtocolVersion = V5,
        ca_file: str | None = None,
        tls: bool = False,
        will: tuple[str, bytes] | None = None,
        cert: tuple[str, str] | None = None,  # a client certificate and its key (mTLS)
    ):
        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            context = ssl.create_default_context(cafile=ca_file)
            if cert:
                context.load_cert_chain(*cert)
            self.client.tls_set_context(context)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.connack: queue.Queue[str] = queue.Queue()
        self.disconnected = threading.Event()
        self.disconnect_reason = ""
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self._acks: dict[int, list[str]] = {}
        self._ack_cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)

    # paho's callbacks ------------------------------------------------------------
    def _on_connect(self, c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            c.disconnect()  # no retry (paho would try again after its reconnect delay)
        self.connack.put(str(reason))

    def _on_disconnect(self, c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.disconnect_reason = str(reason)
        self.disconnected.set()
        c.disconnect()  # a probe never reconnects by itself

    def _ack(self, mid: int, codes: list[str]) -> None:
        with self._ack_cond:
            self._acks[mid] = codes
            self._ack_cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
        self._ack(mid, [str(c) for c in codes])

    def _on_publish(self, _c: Any, _u: Any, mid: int, code: ReasonCode, _p: Any) -> None:
        self._ack(mid, [str(code)])

    def _wait_ack(self, mid: int) -> list[str]:
        with self._ack_cond:
            assert self._ack_cond.wait_for(lambda: mid in self._acks, TIMEOUT), f"no ack {mid}"
            return self._acks.pop(mid)

    # what tests call -------------------------------------------------------------
    def connect(self, *, clean_start: bool = True, session_expiry: int = 0) -> str:
        """The CONNACK's reason ("Success", "Not authorized", ...)."""
        props = None
        kwargs: dict[str, Any] = {}
        if self.client.protocol == V5:
            props = Properties(paho.PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = session_expiry
            kwargs = {"clean_start": clean_start, "properties": props}
        self.client.connect("127.0.0.1", self.port, keepalive=30, **kwargs)
        self.client.loop_start()
        return self.connack.get(timeout=TIMEOUT)

    def subscribe(self, *filters: str) -> list[str]:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        return self._wait_ack(mid)

    def publish(self, topic: str, payload: bytes = b"{}", *, retain: bool = False) -> str:
        """Publish at QoS 1; the PUBACK's reason ("Success", "Not authorized", ...)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait_ack(info.mid)[0]

    def next_message(self, timeout: float = TIMEOUT) -> paho.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def drop_connection(self) -> None:
        """Vanish without DISCONNECT, as a crashed agent does: the broker sends the will."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # no DISCONNECT packet goes out
        assert self.disconnected.wait(TIMEOUT)
        self.client.loop_stop()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def register(broker: Broker, database: str, broker_id: int = 1) -> None:
    """The broker in the registry's `brokers` table, as `eucora stack up` does."""
    with connect(database) as conn, conn.transaction():
        accounts.register_brokers(
            conn,
            [(broker_id, broker.service_endpoint, broker.agent_url, broker.cert_agent_url)],
        )


@pytest.fixture
def registry(broker: Broker, database: str) -> str:
    """A migrated database that knows `broker`; its URL."""
    register(broker, database)
    return database


def cli_env(broker: Broker, database: str, **more: str | None) -> dict[str, str | None]:
    """The environment `eucora agents provision/revoke/delete` read; nothing else."""
    return {
        "EUCORA_DATABASE_URL": database,
        "EUCORA_AUTH_DIR": str(broker.auth.path),
        "EUCORA_CA_FILE": None,
        **more,
    }


def run_cli(broker: Broker, database: str, *args: str, **env: str | None) -> Result:
    return runner.invoke(cli, list(args), env=cli_env(broker, database, **env))


def provision(
    broker: Broker, database: str, agent_id: str, *args: str, **env: str | None
) -> dict[str, Any]:
    result = run_cli(broker, database, "provision", agent_id, "--json", *args, **env)
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def query(database: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with connect(database) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    made: list[Probe] = []
    yield made
    for p in made:
        p.close()


def probe(probes: list[Probe], broker: Broker, user: str | None, password: str | None,
          client_id: str | None = None, *, port: int | None = None,
          **kw: Any) -> Probe:  # fmt: skip
    """A client of the agent listener (or of `port`)."""
    cid = (user or "") if client_id is None else client_id
    p = Probe(port or broker.port, user, password, cid, **kw)
    probes.append(p)
    return p


def service_probe(probes: list[Probe], broker: Broker, user: str, client_id: str = "") -> Probe:
    p = probe(probes, broker, user, broker.passwords[user], client_id or f"{user}-test",
              port=broker.service_port)  # fmt: skip
    assert p.connect() == "Success"
    return p


# --- who may connect, and where ----------------------------------------------------


@pytest.mark.parametrize("protocol", [V5, V311])
def test_anonymous_connection_is_refused_on_every_listener(
    broker: Broker, probes: list[Probe], protocol: MQTTProtocolVersion
) -> None:
    for port in (broker.port, broker.service_port):
        assert probe(
            probes, broker, None, None, "anyone", port=port, protocol=protocol
        ).connect() != ("Success")
        # Nor does a known username without a password get in.
        nopw = probe(probes, broker, identity.BRIDGE_USER, None, "anyone", port=port,
                     protocol=protocol)  # fmt: skip
        assert nopw.connect() != "Success"


def test_wrong_password_is_refused(broker: Broker, registry: str, probes: list[Probe]) -> None:
    a = provision(broker, registry, "agent-a")
    assert probe(probes, broker, "agent-a", "wrong" + a["password"]).connect() == "Not authorized"
    for user in identity.SERVICE_USERS:
        wrong = probe(probes, broker, user, "wrong", f"{user}-x", port=broker.service_port)
        assert wrong.connect() == "Not authorized"
    assert probe(probes, broker, "agent-a", a["password"]).connect() == "Success"


def test_agents_and_services_each_have_their_own_listener(
    broker: Broker, registry: str, probes: list[Probe]
) -> None:
    """An agent's account opens nothing on the service listener (where client ids are
    free), and a service account nothing on the agent listener."""
    a = provision(broker, registry, "agent-a")
    on_service = probe(probes, broker, "agent-a", a["password"], port=broker.service_port)
    assert on_service.connect() == "Not authorized"
    for user in identity.SERVICE_USERS:
        on_agents = probe(probes, broker, user, broker.passwords[user], f"{user}-y")
        assert on_agents.connect() == "Not authorized"


# --- an agent confined to its own topics and client id -----------------------------


def test_agent_cannot_publish_to_another_agents_topics(
    broker: Broker, registry: str, probes: list[Probe]
) -> None:
    a, b = provision(broker, registry, "agent-a"), provision(broker, registry, "agent-b")
    bridge = service_probe(probes, broker, identity.BRIDGE_USER)
    assert bridge.subscribe(f"{TREE.root}/agents/#") == ["Granted QoS 1"]
    agent_a = probe(probes, broker, "agent-a", a["password"])
    assert agent_a.connect() == "Success"

    for kind in AGENT_KINDS:
        topic = TREE.agent("agent-b", kind)
        assert agent_a.publish(topic, b'{"state":"offline"}', retain=True) == "Not authorized"
    # Nor tasks, to itself or to B: only the bridge sends those.
    for agent_id in ("agent-a", "agent-b"):
        assert agent_a.publish(TREE.agent(agent_id, Kind.TASKS)) == "Not authorized"
    # Outside the tree, and the broker's own topics.
    for topic in ("eucora/v1/other", "something/else", "$SYS/broker/x", "$CONTROL/x"):
        assert agent_a.publish(topic) == "Not authorized"

    # Nothing of the above reached the bridge: the first message it sees is A's own.
    own = TREE.agent("agent-a", Kind.TELEMETRY)
    assert agent_a.publish(own, b'{"n":1}') == "Success"
    assert bridge.next_message().topic == own
    assert b["password"] != a["password"]


def test_agent_cannot_publish_to_another_agents_status_through_its_will(
    broker: Broker, registry: str, probes: list[Probe]
) -> None:
    a, c = provision(broker, registry, "agent-a"), provision(broker, registry, "agent-c")
    provision(broker, registry, "agent-b")
    bridge = service_probe(probes, broker, identity.BRIDGE_USER)
    assert bridge.subscribe(TREE.wildcard(Kind.STATUS)) == ["Granted QoS 1"]
    forged = (TREE.agent("agent-b", Kind.STATUS), b'{"state":"offline","epoch":9}')
    agent_a = probe(probes, broker, "agent-a", a["password"], will=forged)
    agent_a.connect()
    agent_a.drop_connection()
    # A control agent dies the same way after A: its own will arrives, A's never did.
    own_will = (TREE.agent("agent-c", Kind.STATUS), b'{"state":"offline","epoch":1}')
    agent_c = probe(probes, broker, "agent-c", c["password"], will=own_will)
    assert agent_c.connect() == "Success"
    agent_c.drop_connection()
    msg = bridge.next_message()
    assert (msg.topic, msg.payload) == own_will


@pytest.mark.parametrize("protocol", [V5, V311])
def test_agent_receives_nothing_of_another_agent_whatever_it_subscribes_to(
    broker: Broker, registry: str, probes: list[Probe], protocol: MQTTProtocolVersion
) -> None:
    """Mosquitto's acl_file grants every SUBSCRIBE and checks each message at delivery
    against the reader's `read` patterns: a wide filter gets nothing of another agent."""
    a, b = provision(broker, registry, "agent-a"), provision(broker, registry, "agent-b")
    agent_b = probe(probes, broker, "agent-b", b["password"])
    assert agent_b.connect() == "Success"
    assert agent_b.publish(TREE.agent("agent-b", Kind.STATUS), b"b-status", retain=True) != (
        "Not authorized"
    )
    agent_a = probe(probes, broker, "agent-a", a["password"], protocol=protocol)
    assert agent_a.connect() == "Success"
    wide = [
        TREE.agent("agent-b", Kind.TASKS),
        TREE.agent("agent-b", Kind.STATUS),
        "#",
        f"{TREE.root}/#",
        TREE.wildcard(Kind.TASKS),
        TREE.wildcard(Kind.STATUS),
        "$SYS/#",
    ]
    agent_a.subscribe(*wide)
    bridge = service_probe(probes, broker, identity.BRIDGE_USER)
    # ("No matching subscribers" is a success too: MQTT 5 reason 16.)
    assert bridge.publish(TREE.agent("agent-b", Kind.TASKS), b'{"for":"b"}') != "Not authorized"
    assert agent_b.publish(TREE.agent("agent-b", Kind.TELEMETRY), b"b") != "Not authorized"
    assert bridge.publish(TREE.agent("agent-a", Kind.TASKS), b'{"for":"a"}') == "Success"
    # Messages reach a client in the order they were published: had anything of B's
    # (its retained status, its task, its telemetry) got through, it would come first.
    first = agent_a.next_message()
    assert (first.topic, first.payload) == (TREE.agent("agent-a", Kind.TASKS), b'{"for":"a"}')
    while not agent_a.messages.empty():
        assert TREE.parse(agent_a.next_message().topic).agent_id == "agent-a"


@pytest.mark.parametrize("protocol", [V5, V311])
def test_agent_cannot_take_over_another_agents_client_id(
    broker: Broker, registry: str, probes: list[Probe], protocol: MQTTProtocolVersion
) -> None:
    """A's valid credentials under B's client id: the broker gives the connection A's
    own id (use_username_as_clientid), so B stays connected and B's queued task
    stays B's."""
    a, b = provision(broker, registry, "agent-a"), provision(broker, registry, "agent-b")
    agent_b = probe(probes, broker, "agent-b", b["password"])
    assert agent_b.connect(clean_start=False, session_expiry=3600) == "Success"
    assert agent_b.subscribe(TREE.agent("agent-b", Kind.TASKS)) == ["Granted QoS 1"]

    thief = probe(probes, broker, "agent-a", a["password"], "agent-b", protocol=protocol)
    kw = {"clean_start": False, "session_expiry": 3600} if protocol == V5 else {}
    assert thief.connect(**kw) == "Success"
    # B's task goes to B only; the impostor has no subscription of B's.
    bridge = service_probe(probes, broker, identity.BRIDGE_USER)
    assert bridge.publish(TREE.agent("agent-b", Kind.TASKS), b'{"for":"b"}') == "Success"
    assert agent_b.next_message().payload == b'{"for":"b"}'
    assert thief.messages.empty()
    # The impostor publishes as A, not as B: B's topics stay closed to it.
    assert not agent_b.disconnected.is_set()
    if protocol == V5:
        assert thief.publish(TREE.agent("agent-b", Kind.HEARTBEAT)) == "Not authorized"
        assert thief.publish(TREE.agent("agent-a", Kind.HEARTBEAT)) != "Not authorized"
    assert agent_b.publish(TREE.agent("agent-b", Kind.HEARTBEAT)) != "Not authorized"
    assert not agent_b.disconnected.is_set()


def test_bridges_share_their_account_under_their_own_client_ids(
    broker: Broker, probes: list[Probe]
) -> None:
    """Client ids are free on the service listener: two bridge instances on one account
    do not kick each other off."""
    first = service_probe(probes, broker, identity.BRIDGE_USER, "bridge-1")
    second = service_probe(probes, broker, identity.BRIDGE_USER, "bridge-2")
    topic = f"$share/bridges/{TREE.wildcard(Kind.TELEMETRY)}"
    assert first.subscribe(topic) == second.subscribe(topic) == ["Granted QoS 1"]
    assert first.publish(TREE.agent("x", Kind.TASKS)) != "Not authorized"
    assert not first.disconnected.is_set() and not second.disconnected.is_set()


# --- what a provisioned agent must be able to do -----------------------------------


def test_provisioned_agent_can_do_all_it_must(
    broker: Broker, registry: str, probes: list[Probe]
) -> None:
    doc = provision(broker, registry, "LAPTOP-7F3K2.corp_1")
    assert set(doc) == {
        "agent_id", "mqtt_url", "username", "password", "ca_file", "cert_file", "key_file"
    }  # fmt: skip
    assert doc["username"] == doc["agent_id"] == "LAPTOP-7F3K2.corp_1"
    assert doc["mqtt_url"] == f"mqtt://127.0.0.1:{broker.port}"  # the home broker, no credentials
    assert doc["ca_file"] is doc["cert_file"] is doc["key_file"] is None  # no TLS, a password
    agent_id = doc["agent_id"]
    bridge = service_probe(probes, broker, identity.BRIDGE_USER)
    assert bridge.subscribe(f"$share/bridges/{TREE.root}/agents/#") == ["Granted QoS 1"]

    # As the agent runs: persistent session, retained will on its own status.
    will = (TREE.agent(agent_id, Kind.STATUS), b'{"state":"offline","epoch":1}')
    agent = probe(probes, broker, doc["username"], doc["password"], agent_id, will=will)
    assert agent.connect(clean_start=False, session_expiry=3600) == "Success"
    own_reads = [TREE.agent(agent_id, Kind.TASKS), TREE.agent(agent_id, Kind.STATUS)]
    assert agent.subscribe(*own_reads) == ["Granted QoS 1"] * 2

    for kind in AGENT_KINDS:
        retain = kind is Kind.STATUS
        assert agent.publish(TREE.agent(agent_id, kind), kind.encode(), retain=retain) == "Success"
    received = {bridge.next_message().topic for _ in AGENT_KINDS}
    assert received == {TREE.agent(agent_id, k) for k in AGENT_KINDS}
    # It reads back its own retained status (to repair a stale last will).
    assert agent.next_message().topic == TREE.agent(agent_id, Kind.STATUS)

    # A task the bridge publishes reaches the agent.
    task = b'{"task_id":"6f1c","type":"HEALTHCHECK"}'
    assert bridge.publish(TREE.agent(agent_id, Kind.TASKS), task) == "Success"
    msg = agent.next_message()
    assert (msg.topic, msg.payload, msg.qos) == (TREE.agent(agent_id, Kind.TASKS), task, 1)

    # The registry lists it, provisioned, before it ever registered.
    rows = query(registry, "SELECT broker_id, password_hash IS NOT NULL, provisioned_at IS NOT"
                 " NULL, registered_at FROM agents WHERE agent_id = %s", agent_id)  # fmt: skip
    assert rows == [(1, True, True, None)]


def test_mqtt311_agent_works(broker: Broker, registry: str, probes: list[Probe]) -> None:
    doc = provision(broker, registry, "old-agent")
    bridge = service_probe(probes, broker, identity.BRIDGE_USER)
    assert bridge.subscribe(TREE.wildcard(Kind.HEARTBEAT)) == ["Granted QoS 1"]
    agent = probe(probes, broker, "old-agent", doc["password"], protocol=V311)
    assert agent.connect() == "Success"
    assert agent.subscribe(TREE.agent("old-agent", Kind.TASKS)) == ["Granted QoS 1"]
    agent.publish(TREE.agent("old-agent", Kind.HEARTBEAT), b'{"seq":1}')
    assert bridge.next_message().payload == b'{"seq":1}'


def test_operator_reads_what_agents_watch_shows(
    broker: Broker, registry: str, probes: list[Probe]
) -> None:
    operator = service_probe(probes, broker, identity.OPERATOR_USER)
    operator.subscribe("#", "$SYS/#")  # granted: what it receives is checked at delivery
    for topic in (TREE.agent("x", Kind.TASKS), TREE.agent("x", Kind.STATUS)):
        assert operator.publish(topic) == "Not authorized"
    # The bridge writes tasks and nothing else under the tree.
    bridge = service_probe(probes, broker, identity.BRIDGE_USER)
    assert bridge.publish(TREE.agent("x", Kind.STATUS)) == "Not authorized"
    assert bridge.publish(TREE.agent("x", Kind.TASKS)) != "Not authorized"
    # Of an agent's telemetry, task, status and task report, the operator receives the
    # status and the report (`eucora agents watch`), never telemetry or tasks.
    a = provision(broker, registry, "agent-o")
    agent = probe(probes, broker, "agent-o", a["password"])
    assert agent.connect() == "Success"
    assert agent.publish(TREE.agent("agent-o", Kind.TELEMETRY), b"t") != "Not authorized"
    assert bridge.publish(TREE.agent("agent-o", Kind.TASKS), b"task") != "Not authorized"
    assert agent.publish(TREE.agent("agent-o", Kind.STATUS), b"s") == "Success"
    assert agent.publish(TREE.agent("agent-o", Kind.TASK_STATUS), b"r") == "Success"
    msg = operator.next_message()
    assert (msg.topic, msg.payload) == (TREE.agent("agent-o", Kind.STATUS), b"s")
    msg = operator.next_message()
    assert (msg.topic, msg.payload) == (TREE.agent("agent-o", Kind.TASK_STATUS), b"r")
    assert operator.messages.empty()


# --- revocation, rotation, deletion: the CLI ----------------------------------------


def test_revoked_agent_is_dropped_at_once_and_cannot_reconnect(
    broker: Broker, registry: str, probes: list[Probe]
) -> None:
    doc = provision(broker, registry, "agent-r")
    other = provision(broker, registry, "agent-s")
    agent = probe(probes, broker, "agent-r", doc["password"])
    assert agent.connect(clean_start=False, session_expiry=3600) == "Success"
    bystander = probe(probes, broker, "agent-s", other["password"])
    assert bystander.connect() == "Success"

    result = run_cli(broker, registry, "revoke", "agent-r")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "agent agent-r revoked: its broker account is deleted"
    assert agent.disconnected.wait(TIMEOUT), "still connected after revoke"
    again = probe(probes, broker, "agent-r", doc["password"])
    assert again.connect() == "Not authorized"
    assert not bystander.disconnected.is_set()
    # The registry shows it disconnected at once, and why; the security event is kept.
    row = query(registry, "SELECT status, status_reason, revoked_at IS NOT NULL, password_hash"
                " FROM agents WHERE agent_id = 'agent-r'")  # fmt: skip
    assert row == [("offline", "revoked", True, None)]
    events = query(registry, "SELECT event FROM security_events WHERE agent_id = 'agent-r'"
                   " ORDER BY time")  # fmt: skip
    assert events == [("provisioned",), ("credentials_revoked",)]
    assert "agent-r" not in broker.auth.agents()
    # Revoking again: nothing to revoke.
    twice = run_cli(broker, registry, "revoke", "agent-r")
    assert twice.exit_code == 1
    assert "has no broker account" in twice.stderr
    # A revoked agent may be provisioned again, to its old home broker.
    back = provision(broker, registry, "agent-r")
    assert probe(probes, broker, "agent-r", back["password"]).connect() == "Success"


def test_delete_removes_the_agent_from_registry_and_broker(
    broker: Broker, registry: str, probes: list[Probe]
) -> None:
    doc = provision(broker, registry, "agent-d")
    agent = probe(probes, broker, "agent-d", doc["password"])
    assert agent.connect() == "Success"
    result = run_cli(broker, registry, "delete", "agent-d", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"agent_id": "agent-d", "deleted": True}
    assert agent.disconnected.wait(TIMEOUT)
    assert probe(probes, broker, "agent-d", doc["password"]).connect() == "Not authorized"
    assert query(registry, "SELECT 1 FROM agents WHERE agent_id = 'agent-d'") == []
    events = query(registry, "SELECT event FROM security_events WHERE agent_id = 'agent-d'"
                   " ORDER BY time")  # fmt: skip
    assert events == [("provisioned",), ("credentials_revoked",), ("deleted",)]
    gone = run_cli(broker, registry, "delete", "agent-d")
    assert gone.exit_code == 1
    assert gone.stderr.strip() == "error: no agent 'agent-d' in the registry"


def test_revoke_unknown_agent_or_service_account_is_an_error(
    broker: Broker, registry: str, probes: list[Probe]
) -> None:
    result = run_cli(broker, registry, "revoke", "nobody")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no agent 'nobody' in the registry"
    for command in ("revoke", "delete", "provision"):
        result = run_cli(broker, registry, command, identity.BRIDGE_USER)
        assert result.exit_code == 1
        assert "is a service account, not an agent" in result.stderr
    service_probe(probes, broker, identity.BRIDGE_USER)  # still works


def test_provision_twice_needs_rotate(broker: Broker, registry: str, probes: list[Probe]) -> None:
    first = provision(broker, registry, "agent-p")
    again = run_cli(broker, registry, "provision", "agent-p", "--json")
    assert again.exit_code == 1
    assert "already has broker credentials: use --rotate" in again.stderr
    assert again.stdout == ""

    agent = probe(probes, broker, "agent-p", first["password"])
    assert agent.connect() == "Success"
    rotated = provision(broker, registry, "agent-p", "--rotate")
    assert rotated["password"] != first["password"]
    # The old password's session ends at once and no longer opens one.
    assert agent.disconnected.wait(TIMEOUT)
    assert probe(probes, broker, "agent-p", first["password"]).connect() == "Not authorized"
    assert probe(probes, broker, "agent-p", rotated["password"]).connect() == "Success"

    unknown = run_cli(broker, registry, "provision", "agent-q", "--rotate")
    assert unknown.exit_code == 1
    assert "no account for 'agent-q'" in unknown.stderr


def test_provision_many_from_arguments_and_a_file(
    broker: Broker, registry: str, probes: list[Probe], tmp_path: Path
) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("# the lab\nlab-1\n\n  lab-2  \n# lab-3 is retired\n")
    result = run_cli(broker, registry, "provision", "desk-1", "--from-file", str(ids), "--json")
    assert result.exit_code == 0, result.output
    docs = json.loads(result.stdout)
    assert [d["agent_id"] for d in docs] == ["desk-1", "lab-1", "lab-2"]
    for d in docs:
        assert probe(probes, broker, d["username"], d["password"]).connect() == "Success"
    # Standard input, and one bad line: one error naming it, nothing provisioned.
    stdin = runner.invoke(cli, ["provision", "--from-file", "-", "--json"],
                          input="ok-1\nbad id\n", env=cli_env(broker, registry))  # fmt: skip
    assert stdin.exit_code == 2
    assert stdin.stderr.strip().startswith("error: invalid agent id 'bad id' (line 2 of standard")
    assert query(registry, "SELECT 1 FROM agents WHERE agent_id = 'ok-1'") == []
    # One already provisioned among new ones: refused as a whole.
    mixed = run_cli(broker, registry, "provision", "new-1", "lab-2")
    assert mixed.exit_code == 1
    assert "'lab-2' already has broker credentials" in mixed.stderr
    assert query(registry, "SELECT 1 FROM agents WHERE agent_id = 'new-1'") == []
    assert "new-1" not in broker.auth.agents()
    dup = run_cli(broker, registry, "provision", "x-1", "x-1")
    assert dup.exit_code == 2 and "given twice" in dup.stderr


@pytest.mark.parametrize(
    "bad_id", ["-leading-dash", "has space", "a/b", "a+", "#", "x" * 65, "trailing\n", ""]
)
def test_provision_refuses_invalid_ids(broker: Broker, registry: str, bad_id: str) -> None:
    result = run_cli(
        broker, registry, "provision", "--", bad_id
    )  # "--": "-leading-dash" is no option
    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid agent id")


def test_provision_needs_the_auth_folder_and_a_registered_broker(
    broker: Broker, database: str
) -> None:
    result = run_cli(broker, database, "provision", "agent-z", EUCORA_AUTH_DIR=None)
    assert result.exit_code == 2
    assert (
        result.stderr.strip() == "error: EUCORA_AUTH_DIR is not set (`eucora stack env` prints it)"
    )
    result = run_cli(broker, database, "provision", "agent-z")  # no broker registered
    assert result.exit_code == 1
    assert "no broker is registered" in result.stderr
    assert "agent-z" not in broker.auth.agents()


def test_provision_output_file_is_private_and_keeps_the_password_off_stdout(
    broker: Broker, registry: str, probes: list[Probe], tmp_path: Path
) -> None:
    out = tmp_path / "agent.json"
    result = run_cli(broker, registry, "provision", "agent-f", "--output", str(out), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    saved = json.loads(out.read_text())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert shown["password"] is None and shown["config_file"] == str(out)
    assert {k: saved[k] for k in ("agent_id", "mqtt_url", "username")} == {
        k: shown[k] for k in ("agent_id", "mqtt_url", "username")
    }
    assert saved["password"] not in result.output
    assert probe(probes, broker, "agent-f", saved["password"]).connect() == "Success"

    # A folder we cannot write into is found before any account is created.
    result = run_cli(broker, registry, "provision", "agent-g", "--output",
                     str(tmp_path / "no" / "x.json"))  # fmt: skip
    assert result.exit_code == 2
    assert "cannot write" in result.stderr
    assert run_cli(broker, registry, "revoke", "agent-g").exit_code == 1  # never created

    # Several agents: one file each in a folder.
    folder = tmp_path / "configs"
    folder.mkdir()
    several = run_cli(broker, registry, "provision", "agent-h", "agent-i", "-o", str(folder))
    assert several.exit_code == 0, several.output
    assert sorted(p.name for p in folder.iterdir()) == ["agent-h.json", "agent-i.json"]

    readable = run_cli(broker, registry, "provision", "agent-j")
    assert readable.exit_code == 0
    lines = readable.stdout.splitlines()
    assert lines[0] == "agent agent-j provisioned"
    assert any(line.split()[:1] == ["password"] for line in lines)


# --- TLS -------------------------------------------------------------------------------


def test_tls_listener_trusts_the_generated_ca_only(
    broker_factory: Any, database: str, probes: list[Probe]
) -> None:
    broker: Broker = broker_factory(tls=True)
    assert broker.tls_port is not None and broker.ca_file is not None
    register(broker, database)
    doc = provision(broker, database, "agent-t", EUCORA_CA_FILE=str(broker.ca_file))
    assert doc["mqtt_url"] == f"mqtts://127.0.0.1:{broker.tls_port}"
    assert doc["ca_file"] == str(broker.ca_file)
    assert stat.S_IMODE(os.stat(broker.ca.key_file).st_mode) == 0o600

    agent = Probe(broker.tls_port, "agent-t", doc["password"], "agent-t", tls=True,
                  ca_file=doc["ca_file"])  # fmt: skip
    probes.append(agent)
    assert agent.connect() == "Success"
    assert agent.subscribe(TREE.agent("agent-t", Kind.TASKS)) == ["Granted QoS 1"]
    assert agent.publish(TREE.agent("agent-t", Kind.HEARTBEAT)) != "Not authorized"
    assert agent.publish(TREE.agent("agent-u", Kind.HEARTBEAT)) == "Not authorized"
    # The TLS listener is an agent listener too: no service account gets in.
    bridge = Probe(broker.tls_port, identity.BRIDGE_USER, broker.passwords[identity.BRIDGE_USER],
                   "b", tls=True, ca_file=doc["ca_file"])  # fmt: skip
    probes.append(bridge)
    assert bridge.connect() == "Not authorized"

    # The system's trust store alone does not know our CA: the handshake fails. (Plain
    # ssl rather than paho, which leaves the failed SSL socket for the GC to close.)
    system_trust = ssl.create_default_context()
    with (
        socket.create_connection(("127.0.0.1", broker.tls_port), timeout=TIMEOUT) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
    ):
        system_trust.wrap_socket(raw, server_hostname="127.0.0.1")
    # Plain MQTT on the TLS port gets nowhere either.
    plain = Probe(broker.tls_port, "agent-t", doc["password"], "agent-t")
    probes.append(plain)
    plain.client.connect("127.0.0.1", broker.tls_port)
    plain.client.loop_start()
    assert plain.disconnected.wait(TIMEOUT)
    assert plain.connack.empty()


# --- the bridge's identity check, and secrets in logs ------------------------------


def test_no_password_in_logs_and_identity_violations_counted(
    broker: Broker, registry: str, bridge: BridgeProcess, probes: list[Probe], tmp_path: Path
) -> None:
    outputs: list[str] = []
    doc = provision(broker, registry, "agent-l")
    rotated = run_cli(broker, registry, "provision", "agent-l", "--rotate", "--output",
                      str(tmp_path / "c"))  # fmt: skip
    outputs.append(rotated.output)
    password = json.loads((tmp_path / "c").read_text())["password"]
    agent = probe(probes, broker, "agent-l", password)
    assert agent.connect() == "Success"
    # A payload claiming another agent's id, on A's own (allowed) topic.
    claim = json.dumps({
        "ts": "2026-01-01T00:00:00Z", "agent_id": "agent-other", "cpu_percent": 1.0,
        "memory_percent": 2.0, "disk_percent": 3.0, "net_rx_bytes": 4, "net_tx_bytes": 5,
    }).encode()  # fmt: skip
    assert agent.publish(TREE.agent("agent-l", Kind.TELEMETRY), claim) == "Success"
    wait_for(
        lambda: "eucora_identity_violations_total 1.0" in bridge.metrics(),
        10,
        "the bridge to count the identity violation",
    )
    for args in (["revoke", "agent-l"], ["revoke", "agent-l"], ["provision", "x", "-o", "/"]):
        outputs.append(run_cli(broker, registry, *args).output)
    assert "--output / is a folder" in outputs[-1]
    bridge.stop()

    secrets = [doc["password"], password, *broker.passwords.values()]
    logs = {
        "broker": broker.log_file.read_text(errors="replace"),
        "bridge": bridge.log(),
        "cli": "\n".join(outputs),
    }
    assert "agent-l" in logs["broker"] and logs["bridge"]
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"a password in the {name} log"


def test_account_files_are_private_and_replaced_whole(broker: Broker, registry: str) -> None:
    """The broker never reads half a file: a revoke writes a new file and renames it."""
    provision(broker, registry, "agent-w1")
    provision(broker, registry, "agent-w2")
    before = broker.auth.agents_file.stat().st_ino
    assert run_cli(broker, registry, "revoke", "agent-w1").exit_code == 0
    after = broker.auth.agents_file.stat()
    assert after.st_ino != before  # renamed into place, not truncated in place
    assert broker.auth.agents() == {"agent-w2"}
    for f in (broker.auth.agents_file, broker.auth.service_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE(broker.auth.path.stat().st_mode) == 0o700
    # The hash in the file is the registry's, in mosquitto's own format.
    line = broker.auth.agents_file.read_text().strip()
    (stored,) = query(registry, "SELECT password_hash FROM agents WHERE agent_id = 'agent-w2'")
    assert line == f"agent-w2:{stored[0]}" and stored[0].startswith("$7$101$")


def test_stack_env_provisions_agents_for_its_tls_listener(
    database: str, probes: list[Probe]
) -> None:
    """`eval "$(eucora stack env)"; eucora agents provision ID`: an mqtts config that works."""
    with service_dir("stack") as root:
        stack = Stack(root / "s")
        try:
            stack.up(mqtt_port=free_port(), service_port=free_port(), database_url=database,
                     bridge=False)  # fmt: skip
            broker = stack.broker()
            env = stack.env()
            assert env["EUCORA_MQTT_URL"] == broker.url(identity.OPERATOR_USER)
            assert env["EUCORA_AUTH_DIR"] == str(stack.dir / "auth")
            result = runner.invoke(cli, ["provision", "stack-agent", "--json"], env=env)
            assert result.exit_code == 0, result.output
            doc = json.loads(result.stdout)
            assert doc["mqtt_url"] == f"mqtts://127.0.0.1:{broker.tls_port}"
            assert doc["ca_file"] == str(stack.dir / "ca" / "ca.pem")
            url = MqttUrl.parse(doc["mqtt_url"])
            agent = Probe(url.port, "stack-agent", doc["password"], "stack-agent", tls=True,
                          ca_file=doc["ca_file"])  # fmt: skip
            probes.append(agent)
            assert agent.connect() == "Success"
        finally:
            stack.down()


def test_a_provisioned_agents_first_connection_fills_in_its_registry_row(
    broker: Broker, registry: str, bridge: BridgeProcess, loop_thread: LoopThread
) -> None:
    """Provisioned: listed before it ever connects; its registration (through the
    bridge) then fills the same row, keeping its account and home broker."""
    doc = provision(broker, registry, "fresh-1")
    before = query(registry, "SELECT status, registered_at FROM agents WHERE agent_id = %s",
                   "fresh-1")  # fmt: skip
    assert before == [("unknown", None)]
    loop_thread.session(broker, "fresh-1", doc["password"])
    row = wait(
        lambda: query(
            registry,
            "SELECT status, hostname IS NOT NULL, broker_id, password_hash IS NOT NULL,"
            " provisioned_at IS NOT NULL FROM agents"
            " WHERE agent_id = 'fresh-1' AND registered_at IS NOT NULL AND status = 'online'",
        ),
        20,
        "the agent to register",
    )
    assert row == [("online", True, 1, True, True)]
