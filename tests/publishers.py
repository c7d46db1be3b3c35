"""Agents publishing as real MQTT clients, for the ingest tests and the benchmark."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas.topics import Kind, TopicTree
from service import identity
from service.stack.broker import Broker

# Samples are recent: with TimescaleDB the retention policy drops telemetry chunks past
# 90 days and compression takes chunks past 7, both first run a moment after the
# migration, so old samples could vanish (or be compressed) in the middle of a test.
BASE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)


def provision(broker: Broker, *agent_ids: str) -> dict[str, str]:
    """Broker accounts for these agents (the files only, no registry rows: the
    bridge adds those on first contact); returns their passwords."""
    passwords = {a: identity.new_password() for a in agent_ids}
    identity.add_agents(broker.auth, {a: identity.hash_password(p) for a, p in passwords.items()})
    return passwords


def sample(i: int, **extra: Any) -> dict[str, Any]:
    """The i-th telemetry sample of an agent: its time is unique per i."""
    return {
        "ts": (BASE + timedelta(milliseconds=i)).isoformat().replace("+00:00", "Z"),
        "cpu_percent": (i * 7) % 100,
        "memory_percent": 40 + i % 50,
        "disk_percent": 55.5,
        "net_rx_bytes": i * 10,
        "net_tx_bytes": i,
        **extra,
    }


def sample_bytes(i: int, **extra: Any) -> bytes:
    return orjson.dumps(sample(i, **extra))


class AgentClient:
    """One agent's MQTT 5 connection, publishing with many messages in flight."""

    def __init__(self, broker_port: int, agent_id: str, password: str, *, inflight: int = 1000):
        self.agent_id = agent_id
        self.password = password
        self.tree = TopicTree()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=agent_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.username_pw_set(agent_id, password)
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)
        self._connected = threading.Event()
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.connect("127.0.0.1", broker_port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError(f"agent {agent_id} could not connect")

    def publish(self, kind: Kind, payloads: Iterable[bytes], qos: int = 1) -> int:
        """Publish every payload and wait until the broker acknowledged all of them."""
        topic = self.tree.agent(self.agent_id, kind)
        infos = [self.client.publish(topic, payload, qos=qos) for payload in payloads]
        for info in infos:
            info.wait_for_publish(120)
            assert info.is_published(), "the broker did not acknowledge a publish"
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
