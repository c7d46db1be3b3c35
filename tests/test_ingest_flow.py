"""The bridge's back-pressure without servers: paho's network threads never wait.

A network thread that waits sends no keepalive PINGREQ, and its broker drops the link
after 1.5 x keepalive with every unacknowledged message to deliver again (seen at
100,000 agents on 7 brokers). QoS 1 is bounded by the brokers instead (each link's
Receive Maximum is its share of max_pending); QoS 0 past the bound is dropped.
What must survive: every QoS 1 message handed to the bridge is kept.
"""

from __future__ import annotations

import threading

import orjson
import paho.mqtt.client as paho
from prometheus_client import REGISTRY

from schemas.config import MqttUrl
from schemas.topics import Kind, TopicTree
from service.bridge.health import Health
from service.bridge.ingest import Ingest, IngestLimits
from service.bridge.link import BrokerLink
from service.bridge.routes import default_routes
from service.bridge.store import Store
from tests.publishers import sample

TREE = TopicTree("eucora/v1")


def ingest_with_links(max_pending: int, links: int) -> Ingest:
    # Nothing connects: the store opens its connection only when the bridge starts.
    store = Store("postgresql://nobody@127.0.0.1:1/none", default_routes())
    ingest = Ingest([], store, TREE, Health(), IngestLimits(max_pending=max_pending))
    for i in range(links):
        ingest.add_link(BrokerLink(MqttUrl.parse(f"mqtt://127.0.0.1:{1883 + i}"), "bridge"))
    return ingest


def message(mid: int, qos: int) -> paho.MQTTMessage:
    msg = paho.MQTTMessage(mid=mid, topic=TREE.agent("a1", Kind.TELEMETRY).encode())
    msg.payload = orjson.dumps(sample(mid))
    msg.qos = qos
    return msg


def dropped() -> float:
    return REGISTRY.get_sample_value("eucora_qos0_dropped_total") or 0.0


def test_each_link_asks_its_share_of_the_bound_as_receive_maximum() -> None:
    assert [link.receive_maximum for link in ingest_with_links(20_000, 1).links] == [20_000]
    assert [link.receive_maximum for link in ingest_with_links(20_000, 7).links] == [2857] * 7
    # The share never exceeds what MQTT can say, nor falls to 0 (a protocol error).
    assert ingest_with_links(200_000, 2).links[0].receive_maximum == 65535
    assert ingest_with_links(3, 7).links[0].receive_maximum == 1


def test_network_thread_never_waits_and_keeps_every_qos1_message() -> None:
    ingest = ingest_with_links(max_pending=4, links=2)
    # More QoS 1 than the bound (a broker honouring another Receive Maximum, a broker
    # added at runtime): kept, not waited on.
    worker = threading.Thread(
        target=lambda: [ingest._receive(None, i % 2, message(i, 1)) for i in range(10)],  # type: ignore[arg-type]
        daemon=True,
    )
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "paho's thread waited at the bound"
    assert ingest.pending == 10
    assert len(ingest._inbox) == 10


def test_qos0_past_the_bound_is_dropped_and_counted() -> None:
    ingest = ingest_with_links(max_pending=2, links=1)
    before = dropped()
    ingest._receive(None, 0, message(1, 0))  # type: ignore[arg-type]
    ingest._receive(None, 0, message(2, 1))  # type: ignore[arg-type]
    ingest._receive(None, 0, message(3, 0))  # type: ignore[arg-type]
    ingest._receive(None, 0, message(4, 1))  # type: ignore[arg-type]
    assert [m.mid for m in ingest._inbox] == [1, 2, 4]
    assert dropped() == before + 1
