"""Telemetry buffered by the reference agent while the broker is away arrives whole and once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from service.stack.broker import Broker
from tests.fix_services import BridgeProcess
from tests.test_agents_support import (
    AgentProcess,
    Proxy,
    agent_factory,
    agent_status,
    provision,
    query,
    wait,
)

__all__ = ["agent_factory"]  # a fixture, imported for the tests below

OUTAGE_S = 30.0


def log_events(agent: AgentProcess, msg: str) -> list[dict[str, Any]]:
    return [
        doc
        for doc in (orjson.loads(line) for line in agent.log().splitlines() if line.strip())
        if doc.get("msg") == msg
    ]


@pytest.mark.slow
def test_telemetry_buffered_during_a_30s_disconnect_arrives_whole_and_once(
    broker: Broker, bridge: BridgeProcess, database: str, agent_factory: Callable[..., AgentProcess]
) -> None:
    pw = provision(broker, "buffered")["buffered"]
    # The agent reaches the broker through a relay that the test cuts: its network goes
    # away while broker and bridge stay up.
    proxy = Proxy(broker.port)
    agent = agent_factory(
        broker, "buffered", pw,
        "--telemetry-interval", "1", "--keepalive", "5", "--reconnect-max", "1",
        EUCORA_MQTT_URL=f"mqtt://buffered:{pw}@127.0.0.1:{proxy.port}",
    )  # fmt: skip
    wait(lambda: (agent_status(database, "buffered") or ("",))[0] == "online", 20, "online")
    live = "SELECT count(*) FROM telemetry WHERE agent_id = 'buffered'"
    wait(lambda: query(database, live)[0][0] >= 2, 20, "live telemetry")

    proxy.cut()
    started = time.monotonic()
    wait(lambda: log_events(agent, "disconnected"), 10, "the agent to notice the outage")
    # The outage itself is the scenario: the network stays down for 30 s.
    wait(lambda: time.monotonic() - started >= OUTAGE_S, OUTAGE_S + 1, "the outage to last")
    proxy.start()

    sent = wait(lambda: log_events(agent, "sent buffered telemetry"), 30, "the buffer sent")
    assert len(sent) == 1
    samples, messages = sent[0]["samples"], sent[0]["messages"]
    assert messages == 1 and samples >= OUTAGE_S - 2, sent[0]
    assert sent[0]["dropped"] == 0

    # Whole: every sample taken during the outage is stored, all committed together (one
    # message, one transaction: one received_at), stamped with the time it was taken.
    went = log_events(agent, "disconnected")[0]["ts"]
    back = log_events(agent, "connected")[-1]["ts"]

    def outage_rows() -> list[Any]:
        rows = query(
            database,
            "SELECT count(*), count(DISTINCT received_at), min(time), max(time) FROM telemetry"
            " WHERE agent_id = 'buffered' AND time > %s AND time < %s",
            (went, back),
        )
        return rows if rows[0][0] >= samples else []

    ((count, commits, first, last),) = wait(outage_rows, 20, "the batch stored")
    assert (count, commits) == (samples, 1)
    assert (last - first).total_seconds() == pytest.approx(samples - 1, abs=2)
    # Once: no sample stored twice (the key would refuse it) and none sent twice.
    dups = query(
        database,
        "SELECT count(*) FROM (SELECT time FROM telemetry WHERE agent_id = 'buffered'"
        " GROUP BY time HAVING count(*) > 1) d",
    )
    assert dups == [(0,)]
    assert "eucora_duplicates_total 0.0" in bridge.metrics()
    assert agent.stop() == 0
    proxy.close()
