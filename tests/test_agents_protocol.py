"""The agent's protocol pieces without any service: epochs, the own-status rule,
payloads (valid per the schemas), batches, buffer, configuration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from agent import protocol
from agent.buffer import TelemetryBuffer
from agent.config import load, parse_tags
from agent.protocol import EpochClock, Metrics, OwnStatusAction, on_own_status
from schemas.config import ConfigError
from schemas.constants import TELEMETRY_METRICS, WILL_REASON
from schemas.payloads import MAX_BATCH, TelemetryBatch
from schemas.states import AgentState
from schemas.topics import Kind
from schemas.validate import parse


def test_epochs_strictly_increase_even_when_the_clock_goes_back() -> None:
    now = [1000.0]
    clock = EpochClock(clock=lambda: now[0])
    first = clock.next()
    assert first == 1_000_000
    now[0] = 900.0  # clock set back
    assert clock.next() == first + 1
    clock.observe(5_000_000)  # an epoch seen from another instance
    assert clock.next() == 5_000_001


def test_own_status_rule() -> None:
    on, off = AgentState.ONLINE, AgentState.OFFLINE
    assert on_own_status(10, off, 9, stopping=False) is OwnStatusAction.REPUBLISH
    assert on_own_status(10, off, 10, stopping=False) is OwnStatusAction.RECONNECT
    assert on_own_status(10, off, 11, stopping=False) is OwnStatusAction.RECONNECT
    assert on_own_status(10, on, 9, stopping=False) is OwnStatusAction.NOTHING
    assert on_own_status(10, on, 11, stopping=False) is OwnStatusAction.NOTHING
    assert on_own_status(10, off, 10, stopping=True) is OwnStatusAction.NOTHING
    assert on_own_status(None, off, 1, stopping=False) is OwnStatusAction.NOTHING


def test_payloads_are_valid_per_the_schemas() -> None:
    will = parse(Kind.STATUS, "a1", protocol.will(42))
    assert (will.state, will.epoch, will.reason) == ("offline", 42, WILL_REASON)
    online = parse(Kind.STATUS, "a1", protocol.status(AgentState.ONLINE, 43, session_present=False))
    assert online.session_present is False
    hb = parse(Kind.HEARTBEAT, "a1", protocol.heartbeat(3, 12.5))
    assert (hb.seq, hb.uptime_s) == (3, 12.5)
    s = protocol.sample(Metrics(150.0, -1.0, 50.0, -5, 10))  # clamped into range
    assert (s.cpu_percent, s.memory_percent, s.net_rx_bytes) == (100.0, 0.0, 0)
    parse(Kind.TELEMETRY, "a1", protocol.telemetry(s))


def test_metrics_are_the_contracts_telemetry_fields() -> None:
    assert tuple(f.name for f in dataclasses.fields(Metrics)) == TELEMETRY_METRICS
    s = protocol.sample(Metrics(1.234, 2.0, 3.0, 4, 5))
    assert s.model_dump(include=set(TELEMETRY_METRICS)) == dict(
        zip(TELEMETRY_METRICS, (1.23, 2.0, 3.0, 4, 5), strict=True)
    )


def test_batches_hold_at_most_max_batch_samples_oldest_first() -> None:
    samples = [protocol.sample(Metrics(i % 100, 1, 1, i, i)) for i in range(MAX_BATCH + 5)]
    messages = protocol.telemetry_batches(samples)
    assert len(messages) == 2
    batches = [parse(Kind.TELEMETRY, "a1", m) for m in messages]
    assert all(isinstance(b, TelemetryBatch) for b in batches)
    got = [s.net_rx_bytes for b in batches for s in b.samples]  # type: ignore[union-attr]
    assert got == list(range(MAX_BATCH + 5))


def test_buffer_drops_the_oldest_when_full() -> None:
    buf = TelemetryBuffer(3)
    for i in range(5):
        buf.append(protocol.sample(Metrics(0, 0, 0, i, 0)))
    assert buf.dropped == 2 and len(buf) == 3
    pending = buf.unsent()
    assert [s.net_rx_bytes for _, s in pending] == [2, 3, 4]
    buf.sent(pending[-1][0])
    assert buf.unsent() == [] and len(buf) == 3  # handed, not yet acknowledged
    buf.acked(pending[-1][0])
    assert len(buf) == 0


def test_config_precedence_and_checks(tmp_path: Path) -> None:
    provisioned = tmp_path / "a1.json"
    provisioned.write_text(
        json.dumps({"agent_id": "a1", "mqtt_url": "mqtt://127.0.0.1:1883", "username": "a1",
                    "password": "pw", "ca_file": None})
    )  # fmt: skip
    cfg = load({}, env={}, config_file=provisioned)
    assert (cfg.agent_id, cfg.password, cfg.mqtt.port) == ("a1", "pw", 1883)
    env = {"EUCORA_AGENT_TELEMETRY_INTERVAL": "5", "EUCORA_AGENT_TAGS": "site=paris,env=prod"}
    cfg = load({"telemetry_interval": 2}, env=env, config_file=provisioned)
    assert cfg.timing.telemetry_interval == 2  # the flag wins over the environment
    assert cfg.tags == {"site": "paris", "env": "prod"}
    with pytest.raises(ConfigError, match="must be the agent id"):
        load({"mqtt_url": "mqtt://other:pw@h:1"}, env={}, config_file=provisioned)
    with pytest.raises(ConfigError, match="no password"):
        load({"agent_id": "a2", "mqtt_url": "mqtt://h:1"}, env={})
    with pytest.raises(ConfigError, match="unknown inventory"):
        load({"inventory": "rpm"}, env={}, config_file=provisioned)
    with pytest.raises(ConfigError, match="key=value"):
        parse_tags("oops")
