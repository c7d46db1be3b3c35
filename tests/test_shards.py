"""Broker shards, the bridge's side: one link per registered broker, each task published
through its agent's home broker, and a broker that goes down stalling only its own
agents (docs/scale.md). Real brokers, bridge process and database; simulated agents."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.stack.broker import Broker
from service.stack.process import wait_for
from tests.fix_services import BridgeProcess
from tests.publishers import provision
from tests.test_tasks import Db, SimAgent, create, db, metric, wait_online

__all__ = ["db"]  # fixture


def register(db: Db, *brokers: Broker) -> None:
    for i, b in enumerate(brokers, start=1):
        url = f"mqtt://127.0.0.1:{b.port}"
        db.conn.execute(
            "INSERT INTO brokers (broker_id, url, agent_url) VALUES (%s, %s, %s)", (i, url, url)
        )


def home(db: Db, broker_id: int, *agent_ids: str) -> None:
    for a in agent_ids:
        db.conn.execute(
            "INSERT INTO agents (agent_id, broker_id) VALUES (%s, %s)"
            " ON CONFLICT (agent_id) DO UPDATE SET broker_id = excluded.broker_id",
            (a, broker_id),
        )


def status_of(db: Db, task_id: str) -> str:
    return str(db.one("SELECT status FROM tasks WHERE task_id = %s", task_id))


def test_tasks_go_through_the_home_broker_and_a_down_broker_stalls_only_its_agents(
    broker_factory: Callable[..., Broker], database: str, db: Db, bridge_factory: Any
) -> None:
    b1 = broker_factory()
    b2 = broker_factory(passwords=b1.passwords)  # one bridge account for every shard
    register(db, b1, b2)
    home(db, 1, "sh-a")
    home(db, 2, "sh-b")
    agents = [
        SimAgent(b, a, p)
        for b, (a, p) in (
            (b1, *provision(b1, "sh-a").items()),
            (b2, *provision(b2, "sh-b").items()),
        )
    ]
    bridge: BridgeProcess = bridge_factory(b1, database)  # EUCORA_MQTT_URL: the first only
    try:
        for a in agents:
            a.connect()
        wait_online(db, 2)  # both agents' status came in: the bridge consumes from both
        first = {t["agent_id"]: t["task_id"] for t in create(database, "--platform", "linux",
                                                              "--type", "HEALTHCHECK")}  # fmt: skip
        for tid in first.values():
            db.wait("SELECT status FROM tasks WHERE task_id = %s", "COMPLETED", 30, tid)
        a, b = agents
        assert [t for t, _ in a.deliveries] == [first["sh-a"]]  # each got only its own,
        assert [t for t, _ in b.deliveries] == [first["sh-b"]]  # through its home broker

        b2.stop()  # shard 2 goes away
        endpoint = f'broker="mqtt://127.0.0.1:{b2.port}"'
        wait_for(lambda: metric(bridge.metrics(), "eucora_broker_connected", endpoint) == 0, 30,
                 "bridge sees shard 2 down")  # fmt: skip
        made = create(database, "--platform", "linux", "--type", "HEALTHCHECK")
        second = {t["agent_id"]: t["task_id"] for t in made}
        db.wait("SELECT status FROM tasks WHERE task_id = %s", "COMPLETED", 30, second["sh-a"])
        # B's task is not even claimed while its broker is down: no attempt counted.
        assert (
            db.one("SELECT status || ' ' || attempts FROM tasks WHERE task_id = %s", second["sh-b"])
            == "PENDING 0"
        )
        assert "eucora_mqtt_connected 0.0" in bridge.metrics()

        b2.start()
        db.wait("SELECT status FROM tasks WHERE task_id = %s", "COMPLETED", 60, second["sh-b"])
        assert b.runs[second["sh-b"]] == 1 and a.runs[second["sh-a"]] == 1
    finally:
        for a in agents:
            a.close()


def test_a_broker_registered_later_is_linked_without_a_restart(
    broker_factory: Callable[..., Broker], database: str, db: Db, bridge_factory: Any
) -> None:
    b1 = broker_factory()
    register(db, b1)
    bridge: BridgeProcess = bridge_factory(b1, database)
    b2 = broker_factory(passwords=b1.passwords)
    db.conn.execute(
        "INSERT INTO brokers (broker_id, url, agent_url) VALUES (2, %s, %s)",
        (f"mqtt://127.0.0.1:{b2.port}",) * 2,
    )
    home(db, 2, "late-b")
    agent = SimAgent(b2, "late-b", provision(b2, "late-b")["late-b"])
    endpoint = f'broker="mqtt://127.0.0.1:{b2.port}"'
    try:
        # Within the bridge's refresh of the brokers table (10 s).
        wait_for(lambda: metric(bridge.metrics(), "eucora_broker_connected", endpoint) == 1, 30,
                 "bridge links shard 2")  # fmt: skip
        agent.connect()
        wait_online(db, 1)
        (task,) = create(database, "--agent", "late-b", "--type", "HEALTHCHECK")
        db.wait("SELECT status FROM tasks WHERE task_id = %s", "COMPLETED", 30, task["task_id"])
        assert bridge.running
    finally:
        agent.close()
