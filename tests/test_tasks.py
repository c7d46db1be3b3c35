"""Tasks end to end: a real broker, the bridge process, PostgreSQL, and agents as MQTT 5
clients with persistent sessions (docs/tasks.md).

What must hold: every task is delivered and run once however the broker or the bridge
comes and goes (queue kept, queue lost, queue overflowing, bridge down at creation);
expired tasks never start; stuck tasks time out; late or foreign reports change
nothing; fan-out hits exactly the matching agents; two bridges publish each task once.
Waits poll the database against a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from typer.testing import CliRunner

from agent.tasks import AllowList, TaskExecutor
from cli.tasks import app as tasks_app
from schemas.payloads import TaskCancel
from schemas.topics import Kind, TopicTree
from schemas.validate import parse
from service.domains.tasks import owe_again
from service.stack.broker import Broker
from service.stack.process import wait_for
from tests.fix_services import BridgeProcess
from tests.publishers import provision

TREE = TopicTree()
FAST = {"EUCORA_TASK_SWEEP_INTERVAL": "0.5"}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Db:
    """Polling reads (autocommit: every query sees the latest commits)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True)

    def all(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, args).fetchall()

    def one(self, sql: str, *args: Any) -> Any:
        row = self.conn.execute(sql, args).fetchone()
        return row[0] if row else None

    def wait(self, sql: str, expected: Any, timeout: float = 30, *args: Any) -> None:
        seen: list[Any] = [None]

        def check() -> bool:
            seen[0] = self.one(sql, *args)
            return bool(seen[0] == expected)

        try:
            wait_for(check, timeout, f"{sql!r} == {expected!r}")
        except Exception as exc:
            raise AssertionError(f"{sql!r}: {seen[0]!r}, expected {expected!r}") from exc

    def statuses(self) -> Counter[str]:
        return Counter(dict(self.all("SELECT status, count(*) FROM tasks GROUP BY status")))


@pytest.fixture
def db(database: str) -> Iterator[Db]:
    d = Db(database)
    yield d
    d.conn.close()


class SimAgent:
    """An agent as the contract wants it: MQTT 5, client id = username = agent id, a
    persistent session, a retained online status with an epoch and a matching last
    will; it acknowledges tasks (ASSIGNED), runs each task_id once (a repeat gets the
    last report again), checks expires_at before starting, and records every delivery.

    With `executor`, messages go to the reference TaskExecutor instead."""

    def __init__(
        self,
        broker: Broker,
        agent_id: str,
        password: str,
        *,
        tags: dict[str, str] | None = None,
        platform: str = "linux",
        finish: bool = True,
        executor: bool = False,
    ) -> None:
        self.broker = broker
        self.agent_id = agent_id
        self.tags = tags or {}
        self.platform = platform
        self.finish = finish
        self.lock = threading.Lock()
        self.deliveries: list[tuple[str, int]] = []  # (task_id, attempt), every delivery
        self.cancels: list[str] = []
        self.runs: Counter[str] = Counter()  # task_id -> times started
        self.last: dict[str, dict[str, Any]] = {}
        self.session_present: list[bool] = []
        self.properties: dict[str, tuple[bool, int | None]] = {}
        self.epoch = 0
        self.ready = threading.Event()
        self.executor = TaskExecutor(
            self.report, agent_id=agent_id, allow=AllowList.of([["true"]])
        ) if executor else None  # fmt: skip
        self.password = password
        self.client = self._new_client()

    def _new_client(self) -> paho.Client:
        # One paho client per connection: loop_start() on a reused client leaks sockets.
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.agent_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.username_pw_set(self.agent_id, self.password)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def topic(self, kind: Kind) -> str:
        return TREE.agent(self.agent_id, kind)

    def connect(self) -> None:
        self.close_client()
        self.client = self._new_client()
        self.epoch = max(int(time.time() * 1000), self.epoch + 1)
        will = {"state": "offline", "epoch": self.epoch, "ts": now(), "reason": "last will"}
        self.client.will_set(self.topic(Kind.STATUS), orjson.dumps(will), qos=1, retain=True)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.ready.clear()
        self.client.connect(
            "127.0.0.1", self.broker.port, keepalive=30, clean_start=False, properties=props
        )
        self.client.loop_start()
        assert self.ready.wait(10), f"{self.agent_id} did not connect"

    def disconnect(self) -> None:
        """Graceful: our own offline, then DISCONNECT (the session stays at the broker)."""
        offline = {"state": "offline", "epoch": self.epoch, "ts": now(), "reason": "stop"}
        self.client.publish(
            self.topic(Kind.STATUS), orjson.dumps(offline), qos=1, retain=True
        ).wait_for_publish(10)
        self.close_client()

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        self.session_present.append(bool(flags.session_present))
        client.subscribe(self.topic(Kind.TASKS), qos=1)

    def _on_subscribe(self, client: paho.Client, *_a: Any) -> None:
        # After the SUBACK: the bridge learns we are online only once we can receive.
        status = {"state": "online", "epoch": self.epoch, "ts": now(),
                  "session_present": self.session_present[-1]}  # fmt: skip
        client.publish(self.topic(Kind.STATUS), orjson.dumps(status), qos=1, retain=True)
        register = {
            "hostname": f"{self.agent_id}.test", "platform": self.platform,
            "os_version": "Debian 12", "agent_version": "test",
            "hardware": {"cpu_count": 2, "memory_bytes": 2**31, "disk_bytes": 2**35},
            "ip_address": "10.0.0.1", "mac_address": "52:54:00:00:00:01",
            "tags": self.tags, "ts": now(),
        }  # fmt: skip
        client.publish(self.topic(Kind.REGISTER), orjson.dumps(register), qos=1)
        self.ready.set()

    def report(self, doc: dict[str, Any]) -> None:
        self.client.publish(self.topic(Kind.TASK_STATUS), orjson.dumps(doc), qos=1)

    def _send(self, task_id: str, status: str, **extra: Any) -> None:
        doc = {"task_id": task_id, "status": status, "ts": now(), **extra}
        self.last[task_id] = doc
        self.report(doc)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        task = parse(Kind.TASKS, self.agent_id, msg.payload)
        if isinstance(task, TaskCancel):
            with self.lock:
                self.cancels.append(str(task.cancel))
            return
        tid = str(task.task_id)
        with self.lock:
            self.deliveries.append((tid, task.attempt))
        props = msg.properties
        with self.lock:
            # (correlation data, message expiry): Mosquitto omits the expiry when less
            # than a second is left, which is why the agent checks expires_at itself.
            self.properties[tid] = (
                getattr(props, "CorrelationData", None) == task.correlation_id.encode(),
                getattr(props, "MessageExpiryInterval", None),
            )
        if self.executor is not None:
            self.executor.handle(msg.payload)
            return
        if tid in self.last:
            self.report(self.last[tid])
            return
        if task.expires_at <= datetime.now(UTC):
            self._send(tid, "REJECTED", error="expired before start")
            return
        with self.lock:
            self.runs[tid] += 1
        self._send(tid, "ASSIGNED")
        self._send(tid, "IN_PROGRESS", progress=10)
        if self.finish:
            self._send(tid, "COMPLETED", progress=100, result={"ran": tid})

    def close_client(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        for sock in (self.client._sockpairR, self.client._sockpairW):
            if sock is not None:
                sock.close()

    def close(self) -> None:
        self.close_client()
        if self.executor is not None:
            self.executor.close(timeout=0)


@pytest.fixture
def fleet() -> Iterator[Callable[..., list[SimAgent]]]:
    made: list[SimAgent] = []

    def make(broker: Broker, n: int, prefix: str = "agent", **kw: Any) -> list[SimAgent]:
        passwords = provision(broker, *(f"{prefix}-{i}" for i in range(n)))
        agents = [SimAgent(broker, a, p, **kw) for a, p in passwords.items()]
        made.extend(agents)
        for a in agents:
            a.connect()
        return agents

    yield make
    for a in made:
        a.close()


def cli(database: str, *args: str) -> Any:
    result = CliRunner().invoke(tasks_app, list(args), env={"EUCORA_DATABASE_URL": database})
    return result


def create(database: str, *args: str) -> list[dict[str, Any]]:
    result = cli(database, "create", "--json", *args)
    assert result.exit_code == 0, result.output
    made: list[dict[str, Any]] = orjson.loads(result.stdout)
    return made


def metric(text: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_online(db: Db, n: int, timeout: float = 30) -> None:
    db.wait(
        "SELECT count(*) FROM agents WHERE status = 'online' AND platform IS NOT NULL",
        n,
        timeout,
    )


def assert_each_ran_once(db: Db, agents: list[SimAgent], n_tasks: int) -> None:
    assert db.statuses() == {"COMPLETED": n_tasks}
    runs: Counter[str] = Counter()
    for a in agents:
        runs.update(a.runs)
    assert len(runs) == n_tasks and set(runs.values()) == {1}
    # One accepted COMPLETED per task; any duplicate report was recorded as not accepted.
    assert db.all(
        "SELECT count(*), count(DISTINCT task_id) FROM task_events"
        " WHERE status = 'COMPLETED' AND accepted"
    ) == [(n_tasks, n_tasks)]


@pytest.mark.parametrize("broker_event", ["none", "sigterm", "sigkill"])
def test_tasks_to_offline_agents_are_delivered_and_run_once(
    broker_event: str, broker: Broker, database: str, db: Db, bridge_factory: Any, fleet: Any
) -> None:
    """100 tasks for 10 agents created while they are offline; the broker keeps running,
    restarts with its store (SIGTERM), or loses everything (SIGKILL, store removed)."""
    bridge: BridgeProcess = bridge_factory(broker, database, **FAST)
    agents = fleet(broker, 10)
    wait_online(db, 10)
    for a in agents:
        a.disconnect()
    db.wait("SELECT count(*) FROM agents WHERE status = 'offline'", 10)

    for _ in range(10):
        assert len(create(database, "--platform", "linux", "--type", "HEALTHCHECK")) == 10
    # Published into the agents' persistent sessions, and acknowledged by the broker.
    db.wait("SELECT count(*) FROM tasks WHERE attempts = 1 AND status = 'PENDING'", 100)

    if broker_event == "sigterm":
        broker.stop()
        broker.start()
    elif broker_event == "sigkill":
        broker.kill()
        broker.wipe_store()
        broker.start()
    wait_for(lambda: metric(bridge.metrics(), "eucora_mqtt_connected") == 1, 30, "bridge back")

    for a in agents:
        a.connect()
    db.wait("SELECT count(*) FROM tasks WHERE status = 'COMPLETED'", 100, 60)
    assert_each_ran_once(db, agents, 100)
    delivered = Counter(tid for a in agents for tid, _ in a.deliveries)
    assert len(delivered) == 100
    # MQTT 5 properties: the correlation id, and an expiry of about the 7 days left.
    props = [p for a in agents for p in a.properties.values()]
    assert all(corr for corr, _ in props)
    expiries = [e for _, e in props]
    assert all(e is not None and 7 * 86400 - 300 < e <= 7 * 86400 for e in expiries)
    if broker_event == "sigkill":
        # The broker lost every queue: the bridge republished from the database.
        assert all(a.session_present[-1] is False for a in agents)
        assert db.one("SELECT min(attempts) FROM tasks") == 2
        assert metric(bridge.metrics(), "eucora_tasks_owed_again_total") == 100
    else:
        # The broker's queue delivered them; the bridge published each exactly once.
        assert all(a.session_present[-1] is True for a in agents)
        assert db.one("SELECT max(attempts) FROM tasks") == 1
        assert sum(delivered.values()) == 100


def test_broker_queue_overflow_loses_no_task(
    broker_factory: Any, database: str, db: Db, bridge_factory: Any, fleet: Any
) -> None:
    """max_queued_messages 10: the broker keeps 10 of each offline agent's 30 tasks and
    drops the rest after PUBACKing them; the redelivery interval brings them back."""
    broker = broker_factory(extra="max_queued_messages 10")
    bridge_factory(broker, database, EUCORA_TASK_REDELIVERY="2", **FAST)
    agents = fleet(broker, 10, prefix="q")
    wait_online(db, 10)
    for a in agents:
        a.disconnect()
    db.wait("SELECT count(*) FROM agents WHERE status = 'offline'", 10)
    for _ in range(30):
        create(database, "--platform", "linux", "--type", "COLLECT")
    db.wait("SELECT count(*) FROM tasks WHERE attempts >= 1", 300)

    for a in agents:
        a.connect()
    db.wait("SELECT count(*) FROM tasks WHERE status = 'COMPLETED'", 300, 60)
    assert_each_ran_once(db, agents, 300)
    assert all(a.session_present[-1] is True for a in agents)
    # Each agent got 10 from its queue; the other 20 were published again.
    assert db.one("SELECT count(*) FROM tasks WHERE attempts >= 2") >= 200
    assert "dropped" in broker.log_file.read_text().lower()


def test_tasks_created_while_the_bridge_is_down_are_delivered_or_expired(
    broker: Broker, database: str, db: Db, bridge_factory: Any, fleet: Any
) -> None:
    bridge: BridgeProcess = bridge_factory(broker, database, **FAST)
    (agent,) = fleet(broker, 1)
    wait_online(db, 1)
    bridge.stop()
    (made,) = create(database, "--agent", agent.agent_id, "--type", "HEALTHCHECK")
    assert made["status"] == "PENDING"
    # And one that expires before any bridge could publish it.
    (late,) = create(database, "--agent", agent.agent_id, "--type", "COLLECT",
                     "--expires-in", "1")  # fmt: skip
    db.wait("SELECT count(*) FROM tasks WHERE expires_at < now()", 1)
    assert db.one("SELECT sum(attempts) FROM tasks") == 0
    bridge.start()
    db.wait("SELECT status FROM tasks WHERE task_id = %s", "COMPLETED", 30, made["task_id"])
    db.wait("SELECT status FROM tasks WHERE task_id = %s", "EXPIRED", 30, late["task_id"])
    assert agent.runs == {made["task_id"]: 1}
    assert [tid for tid, _ in agent.deliveries] == [made["task_id"]]
    assert db.one("SELECT attempts FROM tasks WHERE task_id = %s", late["task_id"]) == 0


def test_an_expired_task_never_starts_on_an_agent_that_comes_back_late(
    broker: Broker, database: str, db: Db, bridge_factory: Any, fleet: Any
) -> None:
    bridge_factory(broker, database, **FAST)
    (agent,) = fleet(broker, 1)
    wait_online(db, 1)
    agent.disconnect()
    db.wait("SELECT status FROM agents", "offline")
    (stale,) = create(database, "--agent", agent.agent_id, "--type", "DEPLOY",
                      "--payload", '{"command": ["true"]}', "--expires-in", "1")  # fmt: skip
    db.wait("SELECT attempts FROM tasks", 1)  # queued in its session, with a 1 s expiry
    db.wait("SELECT status FROM tasks", "EXPIRED", 15)  # the sweep

    agent.connect()
    # A task created after the stale one reaches the agent after it (one queue, in
    # order): once it is done, the stale one would have arrived too.
    (fresh,) = create(database, "--agent", agent.agent_id, "--type", "HEALTHCHECK")
    db.wait("SELECT status FROM tasks WHERE task_id = %s", "COMPLETED", 30, fresh["task_id"])
    assert stale["task_id"] not in agent.runs
    events = (
        "SELECT status, source, reason FROM task_events WHERE task_id = %s AND {} ORDER BY time"
    )
    assert db.all(events.format("accepted"), stale["task_id"]) == [
        ("PENDING", "operator", "created"), ("EXPIRED", "server", "expired before delivery"),
    ]  # fmt: skip
    # Either the broker dropped the expired copy, or (less than a second of expiry
    # left, which Mosquitto rounds away) the agent saw expires_at had passed and refused.
    assert db.all(events.format("NOT accepted"), stale["task_id"]) in (
        [],
        [("REJECTED", "agent", "REJECTED after terminal EXPIRED")],
    )


def test_a_task_the_agent_never_finishes_times_out_and_the_agent_is_told(
    broker: Broker, database: str, db: Db, bridge_factory: Any, fleet: Any
) -> None:
    bridge: BridgeProcess = bridge_factory(broker, database, **FAST)
    (agent,) = fleet(broker, 1, finish=False)
    wait_online(db, 1)
    (made,) = create(database, "--agent", agent.agent_id, "--type", "REMEDIATE",
                     "--payload", '{"command": ["true"]}', "--timeout", "1")  # fmt: skip
    db.wait("SELECT status FROM tasks", "TIMEOUT", 20)
    wait_for(lambda: agent.cancels == [made["task_id"]], 10, "the cancel to reach the agent")
    events = db.all("SELECT status, source FROM task_events WHERE accepted ORDER BY time")
    assert events[-1] == ("TIMEOUT", "server")
    assert ("IN_PROGRESS", "agent") in events
    assert metric(bridge.metrics(), "eucora_tasks_swept_total", 'status="TIMEOUT"') == 1


def test_late_and_foreign_reports_change_nothing(
    broker: Broker, database: str, db: Db, bridge_factory: Any, fleet: Any
) -> None:
    bridge: BridgeProcess = bridge_factory(broker, database, **FAST)
    owner, other = fleet(broker, 2)
    wait_online(db, 2)
    (made,) = create(database, "--agent", owner.agent_id, "--type", "HEALTHCHECK")
    tid = made["task_id"]
    db.wait("SELECT status FROM tasks", "COMPLETED")

    owner.report({"task_id": tid, "status": "IN_PROGRESS", "progress": 50, "ts": now()})
    other.report({"task_id": tid, "status": "FAILED", "error": "mine now", "ts": now()})
    unknown = "00000000-0000-4000-8000-000000000000"
    other.report({"task_id": unknown, "status": "ASSIGNED", "ts": now()})
    db.wait("SELECT count(*) FROM task_events WHERE NOT accepted", 2)
    db.wait("SELECT count(*) FROM dead_letters", 1)

    assert db.all("SELECT status, progress, error FROM tasks") == [("COMPLETED", 100, None)]
    # Two connections: the bridge may see them in either order.
    rejected = db.all(
        "SELECT agent_id, status, reason FROM task_events WHERE NOT accepted ORDER BY agent_id"
    )
    assert rejected == [
        (owner.agent_id, "IN_PROGRESS", "IN_PROGRESS after terminal COMPLETED"),
        (other.agent_id, "FAILED", f"foreign: reported by {other.agent_id}, task of agent-0"),
    ]
    assert db.all(
        "SELECT agent_id, event, detail->>'task_id' FROM security_events"
        " WHERE event <> 'first_registration'"
    ) == [(other.agent_id, "foreign_task_report", tid)]
    assert db.all("SELECT agent_id, reason FROM dead_letters") == [(other.agent_id, "unknown_task")]
    text = bridge.metrics()
    assert metric(text, "eucora_task_reports_total", 'outcome="after_terminal"') == 1
    assert metric(text, "eucora_task_reports_total", 'outcome="foreign"') == 1
    assert metric(text, "eucora_task_reports_total", 'outcome="unknown_task"') == 1
    assert metric(text, "eucora_dead_letters_total", 'reason="unknown_task"') == 1


def test_two_bridges_publish_each_task_once(
    broker: Broker, database: str, db: Db, bridge_factory: Any, fleet: Any
) -> None:
    bridges = [bridge_factory(broker, database, client_id=f"bridge-{i}", **FAST) for i in range(2)]
    agents = fleet(broker, 10)
    wait_online(db, 10)
    for _ in range(10):
        create(database, "--platform", "linux", "--type", "COLLECT")
    db.wait("SELECT count(*) FROM tasks WHERE status = 'COMPLETED'", 100, 60)
    deliveries = Counter(d for a in agents for d in a.deliveries)
    assert len(deliveries) == 100 and set(deliveries.values()) == {1}
    assert {attempt for _, attempt in deliveries} == {1}
    published = [metric(b.metrics(), "eucora_tasks_published_total") for b in bridges]
    assert sum(published) == 100
    assert_each_ran_once(db, agents, 100)
    # Both bridges received all 300 reports; each was recorded once, the other copy
    # only counted.
    assert db.one("SELECT count(*) FROM task_events WHERE source = 'agent'") == 300
    rejected = "SELECT status, previous_status, reason, detail FROM task_events WHERE NOT accepted"
    assert db.all(rejected) == []
    wait_for(
        lambda: (
            sum(metric(b.metrics(), "eucora_task_reports_total", "repeat") for b in bridges) == 300
        ),
        10,
        "every second copy to be counted",
    )


def test_create_by_tag_fans_out_to_exactly_the_matching_agents(
    broker: Broker, database: str, db: Db, bridge_factory: Any, fleet: Any
) -> None:
    bridge_factory(broker, database, **FAST)
    fleet(broker, 2, prefix="paris-prod", tags={"site": "paris", "env": "prod"})
    fleet(broker, 1, prefix="paris-dev", tags={"site": "paris", "env": "dev"})
    fleet(broker, 1, prefix="lyon-prod", tags={"site": "lyon", "env": "prod"})
    fleet(broker, 1, prefix="win", tags={"site": "paris", "env": "prod"}, platform="windows")
    wait_online(db, 5)
    db.wait("SELECT count(*) FROM agents WHERE tags <> '{}'", 5)

    made = create(database, "--tag", "site=paris", "--tag", "env=prod", "--type", "COLLECT")
    assert sorted(m["agent_id"] for m in made) == ["paris-prod-0", "paris-prod-1", "win-0"]
    assert {m["status"] for m in made} == {"PENDING"}
    made = create(database, "--tag", "site=paris", "--platform", "linux", "--type", "COLLECT")
    assert sorted(m["agent_id"] for m in made) == ["paris-dev-0", "paris-prod-0", "paris-prod-1"]
    # One transaction and one correlation id per command.
    assert db.one("SELECT count(DISTINCT correlation_id) FROM tasks") == 2
    db.wait("SELECT count(*) FROM tasks WHERE status = 'COMPLETED'", 6)

    nothing = cli(database, "create", "--tag", "site=tokyo", "--type", "COLLECT")
    assert nothing.exit_code == 1 and "no agent matches" in nothing.stderr
    unknown = cli(database, "create", "--agent", "paris-dev-0", "--agent", "ghost",
                  "--type", "COLLECT")  # fmt: skip
    assert unknown.exit_code == 1 and "unknown agent(s): ghost" in unknown.stderr
    both = cli(database, "create", "--agent", "win-0", "--tag", "a=b", "--type", "COLLECT")
    assert both.exit_code == 2
    bad = cli(database, "create", "--agent", "win-0", "--type", "COLLECT", "--payload", "[1]")
    assert bad.exit_code == 2 and "JSON object" in bad.stderr
    assert db.one("SELECT count(*) FROM tasks") == 6


@pytest.mark.parametrize(
    "type_, payload, field",
    [
        ("DEPLOY", "{}", "payload.command: Field required"),
        ("REMEDIATE", '{"command": "systemctl restart cups"}', "payload.command: Input should be"),
        ("UPDATE", '{"command": []}', "payload.command: List should have at least 1 item"),
        ("HEALTHCHECK", '{"disk_max_percent": "90"}', "payload.disk_max_percent"),
        ("HEALTHCHECK", '{"cpu_max_percent": 101}', "payload.cpu_max_percent"),
        ("COLLECT", '{"what": [42]}', "payload.what"),
    ],
)
def test_create_refuses_a_payload_its_type_does_not_take(
    database: str, db: Db, type_: str, payload: str, field: str
) -> None:
    """Refused with one line before anything is stored (not REJECTED by the agent later)."""
    db.conn.execute("INSERT INTO agents (agent_id) VALUES ('web-01')")
    bad = cli(database, "create", "--agent", "web-01", "--type", type_, "--payload", payload)
    assert bad.exit_code == 2
    (line,) = bad.stderr.splitlines()
    assert line.startswith(f"error: --payload: a{'n' if type_ == 'UPDATE' else ''} {type_} task's")
    assert field in line
    assert db.one("SELECT count(*) FROM tasks") == 0


def test_cancel_show_and_list(
    broker: Broker, database: str, db: Db, bridge_factory: Any, fleet: Any
) -> None:
    bridge: BridgeProcess = bridge_factory(broker, database, **FAST)
    (agent,) = fleet(broker, 1, finish=False)
    wait_online(db, 1)

    # IN_PROGRESS: only with --force, and the agent is told.
    (running,) = create(database, "--agent", agent.agent_id, "--type", "UPDATE",
                        "--payload", '{"command": ["true"]}')  # fmt: skip
    rid = running["task_id"]
    db.wait("SELECT status FROM tasks WHERE task_id = %s", "IN_PROGRESS", 20, rid)
    refused = cli(database, "cancel", rid)
    assert refused.exit_code == 1 and "--force" in refused.stderr
    forced = cli(database, "cancel", rid, "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert orjson.loads(forced.stdout) == {
        "task_id": rid, "agent_id": agent.agent_id, "status": "CANCELLED",
        "previous_status": "IN_PROGRESS", "agent_told": True,
    }  # fmt: skip
    wait_for(lambda: agent.cancels == [rid], 10, "the cancel to reach the agent")
    again = cli(database, "cancel", rid)
    assert again.exit_code == 1 and "already CANCELLED" in again.stderr

    # Never published (bridge stopped): cancelled at once, nothing sent.
    bridge.stop()
    (pending,) = create(database, "--agent", agent.agent_id, "--type", "COLLECT")
    told = orjson.loads(cli(database, "cancel", pending["task_id"], "--json").stdout)
    assert told["agent_told"] is False and told["previous_status"] == "PENDING"
    bridge.start()

    show = cli(database, "show", rid, "--json")
    assert show.exit_code == 0
    doc = orjson.loads(show.stdout)
    assert {"task_id", "agent_id", "type", "status", "attempts", "correlation_id", "events"} <= set(
        doc
    )
    assert doc["status"] == "CANCELLED" and doc["attempts"] == 1 and doc["cancel_requested"]
    assert [(e["status"], e["source"]) for e in doc["events"]] == [
        ("PENDING", "operator"), ("ASSIGNED", "agent"), ("IN_PROGRESS", "agent"),
        ("CANCELLED", "operator"),
    ]  # fmt: skip
    assert all(e["correlation_id"] == doc["correlation_id"] for e in doc["events"])
    assert all(set(e) >= {"ts", "status", "source", "correlation_id"} for e in doc["events"])
    assert "CANCELLED" in cli(database, "show", rid).stdout

    listed = orjson.loads(cli(database, "list", "--json").stdout)
    assert [t["task_id"] for t in listed] == [pending["task_id"], rid]
    only = orjson.loads(cli(database, "list", "--json", "--type", "UPDATE").stdout)
    assert [t["task_id"] for t in only] == [rid]
    assert orjson.loads(cli(database, "list", "--json", "--status", "PENDING").stdout) == []
    assert "no tasks match" in cli(database, "list", "--agent", "nobody").stdout

    missing = cli(database, "show", "00000000-0000-4000-8000-000000000000")
    assert missing.exit_code == 1 and "no task" in missing.stderr
    assert cli(database, "cancel", "not-a-uuid").exit_code == 1


def test_create_wait_follows_the_reference_executor(
    broker: Broker, database: str, db: Db, bridge_factory: Any, fleet: Any
) -> None:
    """--wait exits 0 when every task COMPLETED, 1 when one ended otherwise."""
    bridge_factory(broker, database, **FAST)
    (agent,) = fleet(broker, 1, executor=True)
    wait_online(db, 1)
    ok = cli(database, "create", "--agent", agent.agent_id, "--type", "HEALTHCHECK",
             "--payload", '{"disk_max_percent": 100, "memory_max_percent": 100,'
             ' "cpu_max_percent": 100}', "--wait", "--wait-timeout", "30", "--json")  # fmt: skip
    assert ok.exit_code == 0, ok.output
    (done,) = orjson.loads(ok.stdout)
    assert done["status"] == "COMPLETED"
    assert done["correlation_id"] == db.one(
        "SELECT correlation_id FROM tasks WHERE task_id = %s", done["task_id"]
    )
    assert "1/1 finished: COMPLETED 1" in ok.stderr
    result = db.one("SELECT result FROM tasks WHERE task_id = %s", done["task_id"])
    assert set(result["checks"]) == {"disk:/", "memory", "cpu"}

    refused = cli(database, "create", "--agent", agent.agent_id, "--type", "DEPLOY",
                  "--payload", '{"command": ["rm", "-rf", "/"]}', "--wait", "--json")  # fmt: skip
    assert refused.exit_code == 1
    (rejected,) = orjson.loads(refused.stdout)
    assert rejected["status"] == "REJECTED" and "allow-list" in rejected["error"]


def test_owe_again_sets_open_tasks_due(database: str, db: Db) -> None:
    db.conn.execute("INSERT INTO agents (agent_id) VALUES ('a'), ('b')")
    rows = {
        "pending": ("a", "PENDING", "now() + interval '1 minute'", False, None),
        "assigned": ("a", "ASSIGNED", "NULL", False, None),
        "running": ("a", "IN_PROGRESS", "NULL", False, None),
        "done": ("a", "COMPLETED", "NULL", False, None),
        "expired_late": ("a", "PENDING", "now() + interval '1 minute'", False, "now()"),
        "cancelled": ("a", "CANCELLED", "NULL", True, None),
        "other_agent": ("b", "PENDING", "now() + interval '1 minute'", False, None),
    }
    for name, (agent, status, due, cancel, expires) in rows.items():
        db.conn.execute(
            "INSERT INTO tasks (agent_id, type, status, next_publish_at, cancel_requested,"
            f" finished_at, expires_at, created_by) VALUES (%s, 'COLLECT', %s, {due}, %s,"
            f" CASE WHEN %s THEN now() END, coalesce({expires or 'NULL'}, now() + interval"
            " '1 day'), %s)",
            (agent, status, cancel, cancel, name),
        )

    async def run() -> dict[str, int]:
        async with await psycopg.AsyncConnection.connect(database) as conn:
            return await owe_again(conn, ["a"])

    assert asyncio.run(run()) == {"a": 3}
    due = db.all("SELECT created_by FROM tasks WHERE next_publish_at <= now() ORDER BY created_by")
    assert due == [("assigned",), ("cancelled",), ("pending",)]


def test_cancel_a_whole_command_by_its_correlation_id(database: str, db: Db) -> None:
    db.conn.execute(
        "INSERT INTO agents (agent_id, platform) VALUES ('c-1', 'linux'), ('c-2', 'linux'),"
        " ('c-3', 'linux')"
    )
    made = create(database, "--platform", "linux", "--type", "COLLECT")
    assert len({m["correlation_id"] for m in made}) == 1  # one command, one id
    cid = made[0]["correlation_id"]
    other = create(database, "--agent", "c-1", "--type", "COLLECT")[0]
    # One of the command's tasks is already running: without --force it stays.
    running = made[1]["task_id"]
    db.conn.execute("UPDATE tasks SET status = 'IN_PROGRESS' WHERE task_id = %s", (running,))
    result = cli(database, "cancel", "--correlation-id", cid, "--json")
    assert result.exit_code == 0, result.output
    cancelled = orjson.loads(result.stdout)
    assert sorted(c["task_id"] for c in cancelled) == sorted(
        [made[0]["task_id"], made[2]["task_id"]]
    )
    assert "IN_PROGRESS" in result.stderr
    assert db.one("SELECT status FROM tasks WHERE task_id = %s", other["task_id"]) == "PENDING"
    forced = cli(database, "cancel", "--correlation-id", cid, "--force", "--json")
    assert [c["task_id"] for c in orjson.loads(forced.stdout)] == [made[1]["task_id"]]
    none_left = cli(database, "cancel", "--correlation-id", cid)
    assert none_left.exit_code == 1 and "no unfinished task" in none_left.stderr
    both = cli(database, "cancel", other["task_id"], "--correlation-id", cid)
    assert both.exit_code == 2
