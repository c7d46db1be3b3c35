"""Broker security against a real Mosquitto started from mosquitto/eucora.conf.

Issue 3's "done when": anonymous and wrong passwords refused; an agent confined to its
own topics and client id; revocation within 2 s; everything a provisioned agent needs
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
import time
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
from service import dynsec
from service.broker_admin import BrokerAdmin
from service.stack.broker import Broker
from service.stack.process import StackError, free_port, wait_for
from service.stack.stack import Stack
from tests.fix_services import BridgeProcess, service_dir

TREE = TopicTree()
TIMEOUT = 5.0
V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311

# The functions `eucora agents provision/revoke` register, on an app of their own.
cli = typer.Typer()
cli.command("provision")(access.provision)
cli.command("revoke")(access.revoke)
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
    ):
        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set_context(ssl.create_default_context(cafile=ca_file))
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


def admin_env(broker: Broker, **more: str | None) -> dict[str, str | None]:
    """The environment `eucora agents provision/revoke` read; nothing from the caller's."""
    return {
        "EUCORA_MQTT_ADMIN_URL": broker.url(dynsec.ADMIN_USER),
        "EUCORA_MQTT_URL": broker.url(dynsec.OPERATOR_USER),
        "EUCORA_AGENT_MQTT_URL": None,
        "EUCORA_CA_FILE": None,
        "EUCORA_TOPIC_ROOT": None,
        **more,
    }


def run_cli(broker: Broker, *args: str, **env: str | None) -> Result:
    return runner.invoke(cli, list(args), env=admin_env(broker, **env))


def provision(broker: Broker, agent_id: str, *args: str, **env: str | None) -> dict[str, Any]:
    result = run_cli(broker, "provision", agent_id, "--json", *args, **env)
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    made: list[Probe] = []
    yield made
    for p in made:
        p.close()


def probe(probes: list[Probe], broker: Broker, user: str | None, password: str | None,
          client_id: str | None = None, **kw: Any) -> Probe:  # fmt: skip
    p = Probe(broker.port, user, password, (user or "") if client_id is None else client_id, **kw)
    probes.append(p)
    return p


def service_probe(probes: list[Probe], broker: Broker, user: str) -> Probe:
    p = probe(probes, broker, user, broker.passwords[user], client_id=f"{user}-test")
    assert p.connect() == "Success"
    return p


# --- who may connect ---------------------------------------------------------------


@pytest.mark.parametrize("protocol", [V5, V311])
def test_anonymous_connection_is_refused(
    broker: Broker, probes: list[Probe], protocol: MQTTProtocolVersion
) -> None:
    assert probe(probes, broker, None, None, "anyone", protocol=protocol).connect() != "Success"
    # Nor does a known username without a password get in.
    agent = probe(probes, broker, dynsec.BRIDGE_USER, None, "anyone", protocol=protocol)
    assert agent.connect() != "Success"


def test_wrong_password_is_refused(broker: Broker, probes: list[Probe]) -> None:
    a = provision(broker, "agent-a")
    assert probe(probes, broker, "agent-a", "wrong" + a["password"]).connect() == "Not authorized"
    for user in (dynsec.BRIDGE_USER, dynsec.ADMIN_USER, dynsec.OPERATOR_USER):
        assert probe(probes, broker, user, "wrong", f"{user}-x").connect() == "Not authorized"
    assert probe(probes, broker, "agent-a", a["password"]).connect() == "Success"


# --- an agent confined to its own topics and client id -----------------------------


def test_agent_cannot_publish_to_another_agents_topics(broker: Broker, probes: list[Probe]) -> None:
    a, b = provision(broker, "agent-a"), provision(broker, "agent-b")
    bridge = service_probe(probes, broker, dynsec.BRIDGE_USER)
    assert bridge.subscribe(f"{TREE.root}/agents/#") == ["Granted QoS 1"]
    agent_a = probe(probes, broker, "agent-a", a["password"])
    assert agent_a.connect() == "Success"

    for kind in AGENT_KINDS:
        topic = TREE.agent("agent-b", kind)
        assert agent_a.publish(topic, b'{"state":"offline"}', retain=True) == "Not authorized"
    # Nor tasks, to itself or to B: only the bridge sends those.
    for agent_id in ("agent-a", "agent-b"):
        assert agent_a.publish(TREE.agent(agent_id, Kind.TASKS)) == "Not authorized"
    # Outside the tree, and the broker's own control and $SYS topics.
    for topic in ("eucora/v1/other", "something/else", "$CONTROL/dynamic-security/v1"):
        assert agent_a.publish(topic) == "Not authorized"

    # Nothing of the above reached the bridge: the first message it sees is A's own.
    own = TREE.agent("agent-a", Kind.TELEMETRY)
    assert agent_a.publish(own, b'{"n":1}') == "Success"
    assert bridge.next_message().topic == own
    assert b["password"] != a["password"]


def test_agent_cannot_publish_to_another_agents_status_through_its_will(
    broker: Broker, probes: list[Probe]
) -> None:
    a, c = provision(broker, "agent-a"), provision(broker, "agent-c")
    provision(broker, "agent-b")
    bridge = service_probe(probes, broker, dynsec.BRIDGE_USER)
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


def test_agent_cannot_subscribe_to_another_agents_tasks_or_everything(
    broker: Broker, probes: list[Probe]
) -> None:
    a, b = provision(broker, "agent-a"), provision(broker, "agent-b")
    agent_a = probe(probes, broker, "agent-a", a["password"])
    assert agent_a.connect() == "Success"
    refused = [
        TREE.agent("agent-b", Kind.TASKS),
        TREE.agent("agent-b", Kind.STATUS),
        "#",
        f"{TREE.root}/#",
        TREE.wildcard(Kind.TASKS),
        f"{TREE.root}/agents/agent-a/#",
        f"$share/g/{TREE.agent('agent-a', Kind.TASKS)}",
        "$SYS/#",
        "$CONTROL/dynamic-security/#",
    ]
    assert agent_a.subscribe(*refused) == ["Not authorized"] * len(refused)
    # Its own tasks and status are granted...
    own = [TREE.agent("agent-a", Kind.TASKS), TREE.agent("agent-a", Kind.STATUS)]
    assert agent_a.subscribe(*own) == ["Granted QoS 1"] * 2
    # ...and B's task, published by the bridge, does not reach A; A's own does.
    bridge = service_probe(probes, broker, dynsec.BRIDGE_USER)
    assert bridge.publish(TREE.agent("agent-b", Kind.TASKS), b'{"for":"b"}') != "Not authorized"
    assert bridge.publish(TREE.agent("agent-a", Kind.TASKS), b'{"for":"a"}') == "Success"
    assert agent_a.next_message().payload == b'{"for":"a"}'
    # MQTT 3.1.1 reports the refusal too (SUBACK 0x80).
    old = probe(probes, broker, "agent-b", b["password"], protocol=V311)
    assert old.connect() == "Success"
    assert old.subscribe(TREE.agent("agent-a", Kind.TASKS), "#") == ["Unspecified error"] * 2


def test_agent_cannot_take_over_another_agents_client_id(
    broker: Broker, probes: list[Probe]
) -> None:
    a, b = provision(broker, "agent-a"), provision(broker, "agent-b")
    agent_b = probe(probes, broker, "agent-b", b["password"])
    assert agent_b.connect() == "Success"
    # A's valid credentials with B's client id: refused, and B stays connected.
    assert probe(probes, broker, "agent-a", a["password"], "agent-b").connect() == "Not authorized"
    assert probe(probes, broker, "agent-a", a["password"], "agent-b", protocol=V311).connect() != (
        "Success"
    )
    # Nor any id but its own (an empty one makes the broker assign a random id).
    assert probe(probes, broker, "agent-a", a["password"], "").connect() == "Not authorized"
    assert probe(probes, broker, "agent-a", a["password"], "agent-a2").connect() == (
        "Not authorized"
    )
    assert agent_b.publish(TREE.agent("agent-b", Kind.HEARTBEAT)) != "Not authorized"
    assert not agent_b.disconnected.is_set()


# --- what a provisioned agent must be able to do -----------------------------------


def test_provisioned_agent_can_do_all_it_must(broker: Broker, probes: list[Probe]) -> None:
    doc = provision(broker, "LAPTOP-7F3K2.corp_1")
    assert set(doc) == {"agent_id", "mqtt_url", "username", "password", "ca_file"}
    assert doc["username"] == doc["agent_id"] == "LAPTOP-7F3K2.corp_1"
    assert doc["mqtt_url"] == f"mqtt://{broker.bind}:{broker.port}"  # no credentials in it
    assert doc["ca_file"] is None  # no TLS
    agent_id = doc["agent_id"]
    bridge = service_probe(probes, broker, dynsec.BRIDGE_USER)
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


def test_mqtt311_agent_works(broker: Broker, probes: list[Probe]) -> None:
    doc = provision(broker, "old-agent")
    bridge = service_probe(probes, broker, dynsec.BRIDGE_USER)
    assert bridge.subscribe(TREE.wildcard(Kind.HEARTBEAT)) == ["Granted QoS 1"]
    agent = probe(probes, broker, "old-agent", doc["password"], protocol=V311)
    assert agent.connect() == "Success"
    assert agent.subscribe(TREE.agent("old-agent", Kind.TASKS)) == ["Granted QoS 1"]
    agent.publish(TREE.agent("old-agent", Kind.HEARTBEAT), b'{"seq":1}')
    assert bridge.next_message().payload == b'{"seq":1}'


def test_operator_reads_status_only(broker: Broker, probes: list[Probe]) -> None:
    operator = service_probe(probes, broker, dynsec.OPERATOR_USER)
    assert operator.subscribe(TREE.wildcard(Kind.STATUS)) == ["Granted QoS 1"]
    others = [TREE.wildcard(Kind.TELEMETRY), TREE.wildcard(Kind.TASKS), "#", "$CONTROL/#"]
    assert operator.subscribe(*others) == ["Not authorized"] * len(others)
    for topic in (TREE.agent("x", Kind.TASKS), TREE.agent("x", Kind.STATUS)):
        assert operator.publish(topic) == "Not authorized"
    # The bridge writes tasks and nothing else under the tree.
    bridge = service_probe(probes, broker, dynsec.BRIDGE_USER)
    assert bridge.publish(TREE.agent("x", Kind.STATUS)) == "Not authorized"
    assert bridge.publish(TREE.agent("x", Kind.TASKS)) != "Not authorized"
    assert bridge.subscribe("$CONTROL/dynamic-security/#") == ["Not authorized"]


# --- revocation, rotation, the CLI ---------------------------------------------------


def test_revoked_agent_is_disconnected_within_2s_and_cannot_reconnect(
    broker: Broker, probes: list[Probe]
) -> None:
    doc = provision(broker, "agent-r")
    agent = probe(probes, broker, "agent-r", doc["password"])
    assert agent.connect(clean_start=False, session_expiry=3600) == "Success"

    started = time.monotonic()
    result = run_cli(broker, "revoke", "agent-r")
    assert result.exit_code == 0, result.output
    assert agent.disconnected.wait(2.0), "still connected 2 s after revoke"
    assert time.monotonic() - started < 2.0
    assert agent.disconnect_reason == "Administrative action"
    assert result.stdout.strip() == "agent agent-r revoked: its broker account is deleted"

    again = probe(probes, broker, "agent-r", doc["password"])
    assert again.connect() == "Not authorized"
    # Its role is gone too: a later provision starts from nothing.
    with BrokerAdmin(MqttUrl.parse(broker.url(dynsec.ADMIN_USER))) as admin:
        assert admin.get_client("agent-r") is None
        roles = admin.execute([{"command": "listRoles"}])[0]["data"]["roles"]
        assert dynsec.agent_role_name("agent-r") not in roles


def test_revoke_unknown_agent_or_service_account_is_an_error(broker: Broker) -> None:
    result = run_cli(broker, "revoke", "nobody")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no agent 'nobody' on the broker"
    result = run_cli(broker, "revoke", dynsec.BRIDGE_USER)
    assert result.exit_code == 1
    assert "is a service account, not an agent" in result.stderr
    with BrokerAdmin(MqttUrl.parse(broker.url(dynsec.ADMIN_USER))) as admin:
        assert admin.get_client(dynsec.BRIDGE_USER) is not None


def test_provision_twice_needs_rotate(broker: Broker, probes: list[Probe]) -> None:
    first = provision(broker, "agent-p")
    again = run_cli(broker, "provision", "agent-p", "--json")
    assert again.exit_code == 1
    assert "already has broker credentials: use --rotate" in again.stderr
    assert again.stdout == ""

    agent = probe(probes, broker, "agent-p", first["password"])
    assert agent.connect() == "Success"
    rotated = provision(broker, "agent-p", "--rotate")
    assert rotated["password"] != first["password"]
    # The old password's session ends at once and no longer opens one.
    assert agent.disconnected.wait(2.0)
    assert probe(probes, broker, "agent-p", first["password"]).connect() == "Not authorized"
    assert probe(probes, broker, "agent-p", rotated["password"]).connect() == "Success"

    unknown = run_cli(broker, "provision", "agent-q", "--rotate")
    assert unknown.exit_code == 1
    assert "no agent 'agent-q' on the broker" in unknown.stderr


@pytest.mark.parametrize(
    "bad_id", ["-leading-dash", "has space", "a/b", "a+", "#", "x" * 65, "trailing\n", ""]
)
def test_provision_refuses_invalid_ids(broker: Broker, bad_id: str) -> None:
    result = run_cli(broker, "provision", "--", bad_id)  # "--": "-leading-dash" is no option
    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid agent id")


def test_provision_refuses_service_accounts_and_missing_admin_url(broker: Broker) -> None:
    for user in (dynsec.BRIDGE_USER, dynsec.ADMIN_USER, dynsec.OPERATOR_USER):
        for extra in ([], ["--rotate"]):
            result = run_cli(broker, "provision", user, *extra)
            assert result.exit_code == 1, result.output
            assert "is a service account, not an agent" in result.stderr
    result = run_cli(broker, "provision", "agent-z", EUCORA_MQTT_ADMIN_URL=None)
    assert result.exit_code == 2
    assert "EUCORA_MQTT_ADMIN_URL is not set" in result.stderr
    wrong = broker.url(dynsec.ADMIN_USER).replace(broker.passwords[dynsec.ADMIN_USER], "nope")
    result = run_cli(broker, "provision", "agent-z", EUCORA_MQTT_ADMIN_URL=wrong)
    assert result.exit_code == 1
    assert "refused the admin: Not authorized" in result.stderr
    assert "nope" not in result.output


def test_provision_output_file_is_private_and_keeps_the_password_off_stdout(
    broker: Broker, probes: list[Probe], tmp_path: Path
) -> None:
    out = tmp_path / "agent.json"
    result = run_cli(broker, "provision", "agent-f", "--output", str(out), "--json")
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
    result = run_cli(broker, "provision", "agent-g", "--output", str(tmp_path / "no" / "x.json"))
    assert result.exit_code == 2
    assert "cannot write" in result.stderr
    assert run_cli(broker, "revoke", "agent-g").exit_code == 1  # it was never created

    readable = run_cli(broker, "provision", "agent-h")
    assert readable.exit_code == 0
    lines = readable.stdout.splitlines()
    assert lines[0] == "agent agent-h provisioned"
    assert any(line.split()[:1] == ["password"] for line in lines)


# --- TLS -------------------------------------------------------------------------------


def test_tls_listener_trusts_the_generated_ca_only(
    broker_factory: Any, probes: list[Probe]
) -> None:
    broker: Broker = broker_factory(tls=True)
    assert broker.tls_port is not None and broker.ca_file is not None
    doc = provision(
        broker,
        "agent-t",
        EUCORA_AGENT_MQTT_URL=broker.tls_url(),
        EUCORA_CA_FILE=str(broker.ca_file),
    )
    assert doc["mqtt_url"] == f"mqtts://127.0.0.1:{broker.tls_port}"
    assert doc["ca_file"] == str(broker.ca_file)
    assert stat.S_IMODE(os.stat(broker.ca.key_file).st_mode) == 0o600

    agent = Probe(broker.tls_port, "agent-t", doc["password"], "agent-t", tls=True,
                  ca_file=doc["ca_file"])  # fmt: skip
    probes.append(agent)
    assert agent.connect() == "Success"
    assert agent.subscribe(TREE.agent("agent-t", Kind.TASKS)) == ["Granted QoS 1"]
    assert agent.publish(TREE.agent("agent-t", Kind.HEARTBEAT)) != "Not authorized"

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
    broker: Broker, bridge: BridgeProcess, probes: list[Probe], tmp_path: Path
) -> None:
    outputs: list[str] = []
    doc = provision(broker, "agent-l")
    rotated = run_cli(broker, "provision", "agent-l", "--rotate", "--output", str(tmp_path / "c"))
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
        outputs.append(run_cli(broker, *args).output)
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


def test_agents_seeded_offline_are_confined_like_provisioned_ones(
    broker: Broker, probes: list[Probe]
) -> None:
    """The bulk path (a whole fleet written while the broker is stopped)."""
    broker.stop()
    passwords = {"seed-a": dynsec.new_password(), "seed-b": dynsec.new_password()}
    broker.seed_agents(passwords)
    with pytest.raises(ValueError, match="already exists"):
        broker.seed_agents({"seed-a": "x"})
    broker.start()
    assert stat.S_IMODE(broker.accounts_file.stat().st_mode) == 0o600
    agent = probe(probes, broker, "seed-a", passwords["seed-a"])
    assert agent.connect() == "Success"
    assert agent.publish(TREE.agent("seed-a", Kind.TELEMETRY)) != "Not authorized"
    assert agent.publish(TREE.agent("seed-b", Kind.TELEMETRY)) == "Not authorized"
    assert agent.subscribe(TREE.agent("seed-b", Kind.TASKS)) == ["Not authorized"]
    assert probe(probes, broker, "seed-a", passwords["seed-a"], "seed-b").connect() != "Success"
    # Revocation works on them as on any agent.
    assert run_cli(broker, "revoke", "seed-a").exit_code == 0
    assert agent.disconnected.wait(2.0)


def test_a_damaged_accounts_file_stops_the_start_and_a_copy_remains(broker: Broker) -> None:
    broker.stop()
    good = broker.accounts_file.read_text()
    backup = broker.accounts_file.with_suffix(".json.bak")
    assert backup.read_text() == good
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    broker.accounts_file.write_text(good[: len(good) // 2])  # as a crash mid-save leaves it
    with pytest.raises(StackError, match="is damaged"):
        broker.start()
    assert backup.read_text() == good  # the good copy was not overwritten


def test_stack_env_provisions_agents_for_its_tls_listener(probes: list[Probe]) -> None:
    """`eval "$(eucora stack env)"; eucora agents provision ID`: an mqtts config that works."""
    with service_dir("stack") as root:
        stack = Stack(root / "s")
        stack.dir.mkdir()
        stack._save_state(mqtt_port=free_port(), mqtts_port=free_port())
        broker = stack.broker()
        broker.start()
        try:
            env = stack.env()
            assert env["EUCORA_MQTT_URL"] == broker.url(dynsec.OPERATOR_USER)
            assert env["EUCORA_MQTT_ADMIN_URL"] == broker.url(dynsec.ADMIN_USER)
            doc = provision(broker, "stack-agent", **env)
            assert doc["mqtt_url"] == f"mqtts://127.0.0.1:{broker.tls_port}"
            assert doc["ca_file"] == str(stack.dir / "ca" / "ca.pem")
            url = MqttUrl.parse(doc["mqtt_url"])
            agent = Probe(url.port, "stack-agent", doc["password"], "stack-agent", tls=True,
                          ca_file=doc["ca_file"])  # fmt: skip
            probes.append(agent)
            assert agent.connect() == "Success"
        finally:
            broker.kill()
