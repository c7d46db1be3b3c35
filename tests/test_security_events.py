"""The audit trail (SPEC "Logs": security events kept in the database and shown by
`agents show`): first registration, identity mismatch and refused credentials, with
a real broker, bridge and database; and that every insert goes through the one
function (service/domains/security.py `security_event`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas.payloads import Register
from schemas.topics import Kind
from service.bridge.broker_logs import RefusalParser
from service.stack.broker import Broker
from service.stack.process import wait_for
from tests.publishers import AgentClient, provision

REPO = Path(__file__).resolve().parent.parent


def events(database: str, agent_id: str | None = "web-01") -> list[tuple[str, dict[str, Any]]]:
    with psycopg.connect(database) as conn:
        return [
            (e, d)
            for e, d in conn.execute(
                "SELECT event, detail FROM security_events WHERE agent_id IS NOT DISTINCT FROM %s"
                " ORDER BY time, event",
                (agent_id,),
            ).fetchall()
        ]


def show(database: str, agent_id: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "agents", "show", agent_id, "--json"],
        env={"EUCORA_DATABASE_URL": database, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    doc: dict[str, Any] = orjson.loads(result.stdout)
    return doc


def register(ip: str) -> bytes:
    example = dict(Register.model_config["json_schema_extra"]["examples"][0])  # type: ignore[index]
    return orjson.dumps(example | {"ip_address": ip})


def refused_connect(broker: Broker, agent_id: str) -> int:
    """Connect with a wrong password; the CONNACK reason code."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=agent_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set(agent_id, "not-the-password")
    codes: list[int] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: codes.append(rc.value)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        wait_for(lambda: bool(codes), 10, "the CONNACK")
    finally:
        client.loop_stop()
    return codes[0]


def test_the_audit_trail(broker: Broker, database: str, bridge_factory: Any) -> None:
    bridge_factory(broker, database, EUCORA_BROKER_LOGS=str(broker.log_file))
    agent = AgentClient(broker.port, "web-01", provision(broker, "web-01")["web-01"])
    try:
        # First registration: one event, however often the agent registers again.
        agent.publish(Kind.REGISTER, [register("127.0.0.1")] * 2)
        wait_for(lambda: bool(events(database)), 20, "the first registration")
        # A payload that claims another agent's id, on web-01's own topic.
        agent.publish(Kind.HEARTBEAT, [b'{"ts": "2026-01-01T00:00:00Z", "agent_id": "web-02"}'])
        wait_for(lambda: len(events(database)) == 2, 20, "the identity mismatch")
    finally:
        agent.close()
    (first, first_detail), (mismatch, mismatch_detail) = events(database)
    assert first == "first_registration"
    assert first_detail["hostname"] == "web-01.corp.example"
    assert first_detail["ip_address"] == "127.0.0.1"
    assert mismatch == "identity_mismatch"
    assert mismatch_detail["topic"] == "eucora/v1/agents/web-01/heartbeat"
    assert "'web-02'" in mismatch_detail["detail"]

    # Refused credentials: the broker names nobody; the address says web-01.
    assert refused_connect(broker, "web-01") == 135  # MQTT 5 "Not authorized"
    wait_for(lambda: len(events(database)) == 3, 20, "the refused credentials")
    refused, detail = events(database)[-1]
    assert refused == "credentials_refused"
    assert detail["attributed_by"] == "address" and detail["address"] == "127.0.0.1"
    assert detail["listener_port"] == broker.port
    assert detail["client_id"] is None  # use_username_as_clientid: the log says <unknown>

    trail = show(database, "web-01")["security_events"]
    assert [e["event"] for e in trail] == [
        "credentials_refused", "identity_mismatch", "first_registration",
    ]  # fmt: skip
    assert all(set(e) == {"time", "event", "detail"} for e in trail)


def test_refusal_parser_reads_mosquitto_2_lines() -> None:
    """The lines Mosquitto 2.0.11 writes (measured), interleaved with other clients."""
    parser = RefusalParser("mosquitto.log")
    lines = [
        "2026-01-01T00:00:00: New connection from 10.0.0.7:50052 on port 11883.",
        "2026-01-01T00:00:00: New connection from 10.0.0.8:40000 on port 11883.",
        "2026-01-01T00:00:00: New client connected from 10.0.0.8:40000 as web-02 (p5, c0, k60).",
        "2026-01-01T00:00:01: Client <unknown> disconnected, not authorised.",
        "2026-01-01T00:00:02: New connection from 10.0.0.9:1 on port 12883.",
        "2026-01-01T00:00:02: New connection from 10.0.0.10:2 on port 12883.",
        "2026-01-01T00:00:02: Client ops-script disconnected, not authorised.",
    ]  # fmt: skip
    found = [r for r in map(parser.feed, lines) if r is not None]
    assert [(r.client_id, r.address, r.listener_port) for r in found] == [
        (None, "10.0.0.7", 11883),
        ("ops-script", None, None),  # two connections waiting: which one is not known
    ]


def test_every_insert_goes_through_security_event() -> None:
    """Another writer of security_events would bypass what `security_event` does."""
    writers = [
        str(path.relative_to(REPO))
        for folder in ("service", "cli", "agent", "bench")
        for path in (REPO / folder).rglob("*.py")
        if re.search(r"INSERT\s+INTO\s+security_events", path.read_text(), re.IGNORECASE)
    ]
    assert sorted(writers) == ["service/domains/security.py"]
