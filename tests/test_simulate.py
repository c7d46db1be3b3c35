"""`eucora simulate` against a real broker, bridge and database, checked with
`eucora agents list --online --json`."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from agent.client import AgentClient
from agent.loop import ConnectGate, Loop
from agent.simulator import Fleet, FleetOptions, SimulatedTasks
from cli.agents import app as agents_app
from cli.deployments import app as deployments_app
from cli.tasks import app as tasks_app
from schemas.config import MqttUrl
from service.stack.broker import Broker
from tests.fix_services import BridgeProcess, register_broker
from tests.test_agents_support import LoopThread, loop_thread, provision, query, wait

__all__ = ["loop_thread"]  # fixture

SIMULATE = [sys.executable, "-c", "from cli.simulate import app; app()"]


def start_simulator(
    broker: Broker, database: str, log: Path, *args: str
) -> subprocess.Popen[bytes]:
    """`eucora simulate` as an operator runs it after `eval "$(eucora stack env)"`."""
    register_broker(broker, database)
    env = os.environ | {
        "EUCORA_DATABASE_URL": database,
        "EUCORA_AUTH_DIR": str(broker.auth.path),
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*SIMULATE, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip


def online(database: str) -> int:
    return int(query(database, "SELECT count(*) FROM agents WHERE status = 'online'")[0][0])


def list_online(database: str, *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(
        agents_app, ["list", "--online", "--json", "--database-url", database, *args]
    )
    assert result.exit_code == 0, result.output
    doc: list[dict[str, Any]] = orjson.loads(result.stdout)
    return doc


def run_fleet(
    broker: Broker,
    database: str,
    tmp_path: Path,
    agents: int,
    timeout: float,
    checks: Callable[[], None] = lambda: None,
) -> tuple[float, list[dict[str, Any]]]:
    """Start the simulator, wait until every agent is online, list them, run `checks`
    while the fleet is up, then stop it (SIGTERM) and see every agent go offline."""
    log = tmp_path / "simulate.log"
    started = time.monotonic()
    proc = start_simulator(
        broker,
        database,
        log,
        "--agents",
        str(agents),
        "--telemetry-interval",
        "5",
        "--connect-rate",
        "500",
    )
    try:
        wait(lambda: online(database) == agents or proc.poll() is not None, timeout, "all online")
        assert proc.poll() is None, log.read_text()
        took = time.monotonic() - started
        listed = list_online(database)
        checks()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    wait(lambda: online(database) == 0, 30, "every simulated agent offline after the stop")
    return took, listed


def test_simulated_fleet_is_listed_online(
    broker: Broker, bridge: BridgeProcess, database: str, tmp_path: Path
) -> None:
    def filters() -> None:
        # A tag and a platform select subsets of the same fleet.
        paris = list_online(database, "--tag", "site=paris")
        assert 0 < len(paris) < 100 and all(a["tags"]["site"] == "paris" for a in paris)
        linux = list_online(database, "--platform", "linux")
        assert 0 < len(linux) < 100 and all(a["platform"] == "linux" for a in linux)
        both = list_online(database, "--platform", "linux", "--tag", "site=paris")
        assert {a["agent_id"] for a in both} == {a["agent_id"] for a in paris} & {
            a["agent_id"] for a in linux
        }
        assert list_online(database, "--tag", "site=nowhere") == []
        # Simulated agents take tasks: one per linux agent, every one of them completed.
        created = CliRunner().invoke(tasks_app, [
            "create", "--platform", "linux", "--type", "HEALTHCHECK", "--wait",
            "--wait-timeout", "60", "--json", "--database-url", database,
        ])  # fmt: skip
        assert created.exit_code == 0, created.output
        tasks = orjson.loads(created.stdout)
        assert sorted(t["agent_id"] for t in tasks) == sorted(a["agent_id"] for a in linux)
        assert {t["status"] for t in tasks} == {"COMPLETED"}

    _, listed = run_fleet(broker, database, tmp_path, 100, 60, filters)
    assert len(listed) == 100
    assert {a["platform"] for a in listed} == {"windows", "linux", "macos"}
    assert all(a["connected"] and a["epoch"] for a in listed)
    assert all({"site", "env", "role"} <= a["tags"].keys() for a in listed)
    assert set(listed[0]) == {
        "agent_id", "hostname", "platform", "tags", "labels", "state", "connected", "healthy",
        "stale", "agent_version", "last_seen", "epoch",
    }  # fmt: skip
    assert {a["state"] for a in listed} == {"online"}
    registered = query(database, "SELECT count(*) FROM agents WHERE hardware <> '{}'")[0][0]
    assert registered == 100


def test_a_fleet_over_two_processes_speaking_mqtt_311_is_online_and_takes_tasks(
    broker: Broker, bridge: BridgeProcess, database: str, tmp_path: Path
) -> None:
    log = tmp_path / "simulate.log"
    proc = start_simulator(
        broker, database, log, "--agents", "20", "--processes", "2", "--mqtt-version", "3.1.1",
        "--platform", "linux", "--telemetry-interval", "5", "--json",
    )  # fmt: skip
    try:
        wait(lambda: online(database) == 20 or proc.poll() is not None, 60, "all online")
        assert proc.poll() is None, log.read_text()
        # Every agent connected over MQTT 3.1.1 (Mosquitto logs it as p2; MQTT 5 is p5).
        connects = [line for line in broker.log_file.read_text().splitlines()
                    if "New client connected" in line and " as sim-" in line]  # fmt: skip
        assert len(connects) >= 20 and all("(p2, c0," in line for line in connects)
        created = CliRunner().invoke(tasks_app, [
            "create", "--platform", "linux", "--type", "HEALTHCHECK", "--wait",
            "--wait-timeout", "60", "--json", "--database-url", database,
        ])  # fmt: skip
        assert created.exit_code == 0, created.output
        assert [t["status"] for t in orjson.loads(created.stdout)] == ["COMPLETED"] * 20
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    # Presence over 3.1.1: each agent's own offline on the way out.
    wait(lambda: online(database) == 0, 30, "every simulated agent offline after the stop")
    text = log.read_text()  # progress lines on stderr, then the JSON summary on stdout
    report = orjson.loads(text[text.rindex("\n{") :])
    assert report["agents"] == 20
    assert [p["agents"] for p in report["extra"]["processes"]] == [10, 10]


@pytest.mark.slow
def test_simulate_1000_agents(
    broker: Broker, bridge: BridgeProcess, database: str, tmp_path: Path
) -> None:
    took, listed = run_fleet(broker, database, tmp_path, 1000, 120)
    assert len(listed) == 1000
    print(f"1000 simulated agents online in {took:.1f} s")


# --- simulated DEPLOY tasks ---------------------------------------------------------


def deploy_message(payload: dict[str, Any]) -> tuple[str, bytes]:
    tid, now = str(uuid.uuid4()), datetime.now(UTC)
    doc = {
        "task_id": tid, "type": "DEPLOY", "payload": payload, "timeout_seconds": 60,
        "expires_at": (now + timedelta(hours=1)).isoformat(), "correlation_id": "c",
        "created_at": now.isoformat(), "attempt": 1,
    }  # fmt: skip
    return tid, orjson.dumps(doc)


class Played:
    """What simulated agents report: (agent, "task STATUS" | "deployment STATUS")."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self.cond = threading.Condition()

    def attach(self, tasks: SimulatedTasks) -> SimulatedTasks:
        tasks.report = lambda d: self._add(tasks.agent_id, f"task {d['status']}")
        tasks.report_deployment = lambda d: self._add(tasks.agent_id, f"deployment {d['status']}")
        return tasks

    def _add(self, agent: str, step: str) -> None:
        with self.cond:
            self.steps.append((agent, step))
            self.cond.notify_all()

    def of(self, agent: str) -> list[str]:
        with self.cond:
            return [s for a, s in self.steps if a == agent]

    def wait(self, count: int, step: str, timeout: float = 10) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: [s for _, s in self.steps].count(step) >= count,
                                    timeout)  # fmt: skip
        assert ok, self.steps


def test_simulated_deploys_report_like_the_reference_agent_and_are_seeded(
    loop_thread: LoopThread,
) -> None:
    def play(seed: int) -> dict[str, list[str]]:
        played = Played()
        fleet = [
            played.attach(SimulatedTasks(loop_thread.loop, f"a-{i}", random.Random(i), seed=seed,
                                         deploy_duration=0.05, deploy_fail_rate=0.5))
            for i in range(20)
        ]  # fmt: skip
        did = str(uuid.uuid4())
        msgs = [deploy_message({"command": ["x"], "deployment_id": did})[1] for _ in fleet]
        for tasks, msg in zip(fleet, msgs, strict=True):
            loop_thread.call(lambda t=tasks, m=msg: t.handle(m))  # type: ignore[misc]
        wait(lambda: sum(len(played.of(t.agent_id)) == 6 for t in fleet) == 20, 10, "all done")
        # A redelivery is answered with the last reports, not played again.
        loop_thread.call(lambda: fleet[0].handle(msgs[0]))
        wait(lambda: len(played.of("a-0")) == 8, 10, "the re-reports")
        assert played.of("a-0")[6:] == played.of("a-0")[4:6]
        return {t.agent_id: played.of(t.agent_id)[:6] for t in fleet}

    first = play(seed=7)
    ok = ["task ASSIGNED", "deployment PENDING", "task IN_PROGRESS", "deployment IN_PROGRESS",
          "deployment SUCCESS", "task COMPLETED"]  # fmt: skip
    bad = [*ok[:4], "deployment FAILED", "task FAILED"]
    assert set(map(tuple, first.values())) == {tuple(ok), tuple(bad)}  # both happen at 50 %
    assert play(seed=7) == first  # the same seed fails the same agents
    assert play(seed=8) != first

    played = Played()
    tasks = played.attach(SimulatedTasks(loop_thread.loop, "r-1", random.Random(1),
                                         deploy_duration=0.05, deploy_fail_rate=1))  # fmt: skip
    did = str(uuid.uuid4())
    back = {"command": ["x"], "rollback_command": ["y"], "deployment_id": did, "rollback": True}
    loop_thread.call(lambda: tasks.handle(deploy_message(back)[1]))
    played.wait(1, "task COMPLETED")
    assert played.of("r-1") == ["task ASSIGNED", "task IN_PROGRESS", "deployment ROLLBACK",
                                "task COMPLETED"]  # fmt: skip
    no_undo = {"command": ["x"], "deployment_id": did, "rollback": True}
    loop_thread.call(lambda: tasks.handle(deploy_message(no_undo)[1]))
    played.wait(1, "task REJECTED")
    assert played.of("r-1")[4:] == ["deployment FAILED", "task REJECTED"]


def deployments(database: str, *args: str) -> Any:
    result = CliRunner().invoke(deployments_app, [*args, "--json", "--database-url", database])
    assert result.exit_code in (0, 1), result.output
    return orjson.loads(result.stdout)


@pytest.fixture
def linux_fleet(
    broker: Broker, bridge: BridgeProcess, database: str, tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """start(n, *simulate options) -> a simulated linux fleet, every agent online."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(n: int, *args: str) -> subprocess.Popen[bytes]:
        log = tmp_path / "simulate.log"
        options = ["--agents", str(n), "--platform", "linux", "--telemetry-interval", "30"]
        proc = start_simulator(broker, database, log, *options, "--connect-rate", "500", *args)
        procs.append(proc)
        wait(lambda: online(database) == n or proc.poll() is not None, 60, "all online")
        assert proc.poll() is None, log.read_text()
        return proc

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_simulated_fleet_failing_20_percent_aborts_at_10_percent_after_20_finished(
    database: str, linux_fleet: Callable[..., Any]
) -> None:
    """The issue's abort: fail rate 20 %, --abort-after 10 % (the default minimum of 20
    finished agents): ABORTED, nobody started after the decision, the unstarted SKIPPED
    with their tasks CANCELLED (or never sent)."""
    linux_fleet(100, "--deploy-fail-rate", "0.2", "--deploy-duration", "0.5")
    doc = deployments(
        database, "create", "--platform", "linux", "--payload", '{"command": ["true"]}',
        "--max-in-flight", "10", "--abort-after", "10%",
        "--wait", "--wait-timeout", "120",
    )  # fmt: skip
    assert doc["status"] == "ABORTED" and doc["targets"] == 100, doc
    assert "failed" in doc["status_reason"]
    c = doc["counts"]
    assert c["SKIPPED"] > 0 and c["FAILED"] > 0 and c["PENDING"] == c["IN_PROGRESS"] == 0
    assert sum(c.values()) == 100
    assert c["SUCCESS"] + c["FAILED"] >= 20  # the percent applied only after 20 finished
    did = doc["deployment_id"]
    late = query(
        database,
        "SELECT count(*) FROM deployment_status ds JOIN deployments d USING (deployment_id)"
        " WHERE ds.deployment_id = %s AND ds.started_at > d.finished_at",
        (did,),
    )[0][0]
    assert late == 0  # nobody started after the abort decision
    skipped = query(
        database,
        "SELECT coalesce(t.status, 'never sent'), count(*) FROM deployment_status ds"
        " LEFT JOIN tasks t ON t.task_id = ds.task_id"
        " WHERE ds.deployment_id = %s AND ds.status = 'SKIPPED' GROUP BY 1",
        (did,),
    )
    assert {status for status, _ in skipped} <= {"CANCELLED", "never sent"}
    # The failures are the agents' own reports, with their message.
    failed = query(
        database,
        "SELECT count(*) FROM deployment_status_events WHERE deployment_id = %s"
        " AND source = 'agent' AND accepted AND status = 'FAILED'"
        " AND message LIKE '%%simulated failure%%'",
        (did,),
    )[0][0]
    assert failed == c["FAILED"]


def test_1000_simulated_agents_rate_600_cap_50_all_succeed(
    database: str, linux_fleet: Callable[..., Any]
) -> None:
    """The issue's rollout: 1,000 agents, rate 600/min, max_in_flight 50. `deployments
    show` (read every 0.5 s while it runs) never reports more than 50 in flight, the
    start times follow the rate within 10 %, all 1,000 SUCCESS, COMPLETED."""
    n, rate, cap = 1000, 600, 50
    linux_fleet(n, "--deploy-duration", "0.5")
    created = deployments(
        database, "create", "--platform", "linux", "--payload", '{"command": ["true"]}',
        "--rate", str(rate), "--max-in-flight", str(cap),
    )  # fmt: skip
    did = created["deployment_id"]
    in_flight: list[int] = []
    while True:
        shown = deployments(database, "show", did)
        in_flight.append(shown["in_flight"])
        if shown["status"] != "RUNNING" and shown["status"] != "PENDING":
            break
        time.sleep(0.5)
    doc = deployments(database, "show", did)
    assert doc["status"] == "COMPLETED" and doc["targets"] == n, doc["status"]
    assert doc["counts"]["SUCCESS"] == n
    assert max(in_flight) <= cap and len(in_flight) > 100
    # Starts: 600/min is 10 a second after 1 s of credit (10 at once).
    starts = sorted(r[0] for r in query(
        database, "SELECT started_at FROM deployment_status WHERE deployment_id = %s", (did,)
    ))  # fmt: skip
    span = (starts[-1] - starts[0]).total_seconds()
    expected = (n - 1 - rate / 60) / (rate / 60)
    assert 0.9 * expected <= span <= 1.1 * expected, (span, expected)
    tasks = query(database, "SELECT status, count(*) FROM tasks WHERE deployment_id = %s"
                            " GROUP BY status", (did,))  # fmt: skip
    assert tasks == [("COMPLETED", n)]
    by_agent = query(
        database,
        "SELECT count(DISTINCT agent_id) FROM deployment_status_events WHERE deployment_id = %s"
        " AND source = 'agent' AND accepted AND status = 'SUCCESS'",
        (did,),
    )[0][0]
    assert by_agent == n  # every SUCCESS is the agent's own report


# --- the connect ramp ---------------------------------------------------------------


def test_the_connect_gate_admits_at_most_its_limit_and_the_next_as_one_leaves() -> None:
    loop = Loop()
    gate = ConnectGate(loop, limit=2)
    admitted: list[int] = []
    for i in range(4):
        gate.enter(lambda i=i: admitted.append(i))
    assert admitted == [0, 1] and gate.held == 2 and gate.waiting() == 2
    gate.leave()
    loop.run(until=lambda: len(admitted) == 3)  # the next one runs on the loop, not inside leave()
    assert admitted == [0, 1, 2] and gate.held == 2 and gate.waiting() == 1
    gate.leave()
    gate.leave()
    loop.run(until=lambda: len(admitted) == 4)
    assert gate.held == 1 and gate.waiting() == 0
    loop.close()


def test_a_fleet_started_all_at_once_connects_through_its_gate(broker: Broker) -> None:
    """200 agents asked to connect in the same instant: never more than 8 between their
    connect and the broker's answer, and all of them connected."""
    options = FleetOptions(agents=200, prefix="gate", connect_rate=1e6, max_connecting=8,
                           telemetry_interval=60)  # fmt: skip
    ids = options.agent_ids()
    passwords = provision(broker, *ids)
    fleet = Fleet(options, MqttUrl.parse(f"mqtt://{broker.bind}:{broker.port}"), passwords)
    peak = 0

    def watch() -> None:
        nonlocal peak
        peak = max(peak, fleet.loop.connect_gate.held)
        fleet.loop.call_later(0.001, watch)

    fleet.loop.call_later(0.0, watch)
    fleet.start()
    deadline = time.monotonic() + 120
    fleet.loop.run(until=lambda: fleet.connected() == 200 or time.monotonic() > deadline)
    try:
        assert fleet.connected() == 200
        assert 1 < peak <= 8, peak
        assert fleet.loop.connect_gate.held == 0
    finally:
        fleet.stop()
        fleet.loop.run(until=lambda: fleet.all_stopped() or time.monotonic() > deadline + 30)
        fleet.loop.close()


def test_an_agent_connects_without_binding_a_port_first(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paho binds to ("", 0) before connecting unless told otherwise: a port unique among
    all the host's sockets, which capped a simulated fleet at the ephemeral range."""
    binds: list[object] = []
    real_bind = socket.socket.bind

    def bind(sock: socket.socket, address: object) -> None:
        binds.append(address)
        real_bind(sock, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    (agent_id,) = ids = ["nobind-1"]
    password = provision(broker, *ids)[agent_id]
    client = AgentClient(CallbackAPIVersion.VERSION2, client_id=agent_id)
    client.username_pw_set(agent_id, password)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    loop = Loop()  # as every agent runs its client
    loop.attach(client)
    loop.connect_in_background(client, lambda: client.connect(broker.bind, broker.port),
                               lambda error: None)  # fmt: skip
    deadline = time.monotonic() + 10
    loop.run(until=lambda: connected.is_set() or time.monotonic() > deadline)
    try:
        assert connected.is_set(), "no CONNACK"
        assert binds == []
    finally:
        client.disconnect()
        loop.close()
