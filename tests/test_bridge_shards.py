"""Broker shards, the bridge's side: one link per registered broker, each task published
through its agent's home broker, a broker that goes down stalling only its own agents,
and a broker added later linked without a restart (docs/scale.md). A real stack of
brokers and bridge (`Stack.up(brokers=N)`), the test database, simulated agents."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from cli.status import app as status_app
from service.stack.broker import Broker
from service.stack.process import free_port_range, wait_for
from service.stack.stack import Stack
from tests.fix_services import service_dir
from tests.test_security import cli as access_app
from tests.test_tasks import Db, SimAgent, create, db, metric, wait_online

__all__ = ["db"]  # fixture


@pytest.fixture
def stack_root() -> Iterator[Any]:
    with service_dir("bshards") as root:
        yield root


def up(root: Any, database: str, brokers: int, stack: Stack | None = None) -> Stack:
    stack = stack or Stack(root / "s")
    if stack.state().get("brokers"):
        stack.up(brokers=brokers)
    else:
        stack.up(mqtt_port=free_port_range(3), service_port=free_port_range(3),
                 database_url=database, brokers=brokers)  # fmt: skip
    return stack


def provision(stack: Stack, *ids: str) -> dict[str, dict[str, Any]]:
    result = CliRunner().invoke(access_app, ["provision", *ids, "--json"], env=stack.env())
    assert result.exit_code == 0, result.output
    docs = json.loads(result.stdout)
    return {d["agent_id"]: d for d in (docs if isinstance(docs, list) else [docs])}


def home_of(stack: Stack, doc: dict[str, Any]) -> Broker:
    (broker,) = [b for b in stack.brokers() if b.agent_url == doc["mqtt_url"]]
    return broker


def bridge_metrics(stack: Stack) -> str:
    with urllib.request.urlopen(stack.metrics_url() + "/metrics", timeout=2) as resp:  # noqa: S310 (our own loopback URL)
        return str(resp.read().decode())


def test_tasks_go_through_the_home_broker_and_a_down_broker_stalls_only_its_agents(
    stack_root: Any, database: str, db: Db
) -> None:
    stack = up(stack_root, database, 2)
    docs = provision(stack, "sh-a", "sh-b")  # one on each broker: the fewest agents
    a_home, b_home = home_of(stack, docs["sh-a"]), home_of(stack, docs["sh-b"])
    assert a_home.port != b_home.port
    agents = [SimAgent(home_of(stack, d), a, d["password"]) for a, d in docs.items()]
    try:
        for agent in agents:
            agent.connect()
        wait_online(db, 2)  # both statuses came in: the bridge consumes from both brokers
        made = create(stack.database_url(), "--platform", "linux", "--type", "HEALTHCHECK")
        first = {t["agent_id"]: t["task_id"] for t in made}
        for tid in first.values():
            db.wait("SELECT status FROM tasks WHERE task_id = %s", "COMPLETED", 30, tid)
        a, b = agents
        assert [t for t, _ in a.deliveries] == [first["sh-a"]]  # each got only its own,
        assert [t for t, _ in b.deliveries] == [first["sh-b"]]  # on its home broker

        b_home.stop()  # shard of sh-b goes away
        down = f'broker="{b_home.service_endpoint}"'
        wait_for(lambda: metric(bridge_metrics(stack), "eucora_broker_connected", down) == 0,
                 30, "the bridge sees the broker down")  # fmt: skip
        made = create(stack.database_url(), "--platform", "linux", "--type", "HEALTHCHECK")
        second = {t["agent_id"]: t["task_id"] for t in made}
        db.wait("SELECT status FROM tasks WHERE task_id = %s", "COMPLETED", 30, second["sh-a"])
        # sh-b's task is not even claimed while its broker is down: no attempt counted.
        assert (
            db.one("SELECT status || ' ' || attempts FROM tasks WHERE task_id = %s", second["sh-b"])
            == "PENDING 0"
        )
        assert "eucora_mqtt_connected 0.0" in bridge_metrics(stack)
        # `eucora status` lists every broker, and is not OK while one is down.
        result = CliRunner().invoke(status_app, ["--json"], env=stack.env())
        assert result.exit_code != 0, result.output
        shards = orjson.loads(result.stdout)["broker"]["brokers"]
        assert [(s["reachable"], s["agents"]) for s in shards] == [(True, 1), (False, 1)]

        b_home.start()  # back: sh-b reconnects and gets what it is owed
        db.wait("SELECT status FROM tasks WHERE task_id = %s", "COMPLETED", 60, second["sh-b"])
        assert b.runs[second["sh-b"]] == 1 and a.runs[second["sh-a"]] == 1
    finally:
        for agent in agents:
            agent.close()
        stack.down()


def test_a_broker_added_later_is_linked_without_a_restart_and_takes_new_agents(
    stack_root: Any, database: str, db: Db
) -> None:
    stack = up(stack_root, database, 1)
    provision(stack, "early-1")  # broker 1 has an agent now
    pid = stack.state()["bridge_pid"]
    up(stack_root, database, 2, stack)  # `eucora stack up --brokers 2` on a running stack
    second = stack.brokers()[1]
    linked = f'broker="{second.service_endpoint}"'
    # Within the bridge's refresh of the brokers table (10 s).
    wait_for(lambda: metric(bridge_metrics(stack), "eucora_broker_connected", linked) == 1,
             30, "the bridge links the new broker")  # fmt: skip
    assert stack.state()["bridge_pid"] == pid  # the same bridge process
    doc = provision(stack, "late-1")["late-1"]
    assert doc["mqtt_url"] == second.agent_url  # the new broker has the fewest agents
    agent = SimAgent(second, "late-1", doc["password"])
    try:
        agent.connect()
        wait_online(db, 1)
        (task,) = create(stack.database_url(), "--agent", "late-1", "--type", "HEALTHCHECK")
        db.wait("SELECT status FROM tasks WHERE task_id = %s", "COMPLETED", 30, task["task_id"])
    finally:
        agent.close()
        stack.down()
