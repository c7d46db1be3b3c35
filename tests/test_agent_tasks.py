"""The reference agent (`eucora agent run`, a real process) runs tasks created with
`eucora tasks create`, through a real broker and bridge: HEALTHCHECK and COLLECT for
real, commands only when allow-listed, and never a task twice across a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas.config import MqttUrl
from schemas.topics import Kind, TopicTree
from service import identity
from service.stack.broker import Broker
from tests.fix_services import BridgeProcess
from tests.test_agents_support import AgentProcess, agent_factory, provision, query, wait

__all__ = ["agent_factory"]


def eucora(database: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=os.environ | {"EUCORA_DATABASE_URL": database},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def create(database: str, agent_id: str, task_type: str, payload: dict[str, Any]) -> str:
    done = eucora(database, "tasks", "create", "--agent", agent_id, "--type", task_type,
                  "--payload", json.dumps(payload), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    (task,) = json.loads(done.stdout)
    return str(task["task_id"])


def finished(database: str, task_id: str) -> tuple[str, Any] | None:
    rows = query(database, "SELECT status, result FROM tasks WHERE task_id = %s", (task_id,))
    status, result = rows[0]
    return (status, result) if status in ("COMPLETED", "FAILED", "REJECTED") else None


def test_reference_agent_runs_tasks(
    broker: Broker, bridge: BridgeProcess, database: str,
    agent_factory: Callable[..., AgentProcess], tmp_path: Path,
) -> None:  # fmt: skip
    marker = tmp_path / "runs.txt"
    deploy = ["sh", "-c", f"echo deployed; echo run >> {marker}"]
    allow = tmp_path / "allow.json"
    allow.write_text(json.dumps({"commands": [deploy]}))
    state = tmp_path / "state"
    pw = provision(broker, "worker-1")["worker-1"]
    args = ("--telemetry-interval", "1", "--state-dir", str(state), "--allow-list", str(allow))
    agent = agent_factory(broker, "worker-1", pw, *args)
    wait(lambda: query(database, "SELECT 1 FROM agents WHERE agent_id = 'worker-1'"
                                 " AND status = 'online'"), 20, "the agent online")  # fmt: skip

    health = create(database, "worker-1", "HEALTHCHECK", {})
    status, result = wait(lambda: finished(database, health), 30, "the health check")
    assert status in ("COMPLETED", "FAILED")  # a real check of this host: either is honest
    assert any(name.startswith("disk") for name in result["checks"])
    assert (status == "COMPLETED") == result["healthy"]

    collect = create(database, "worker-1", "COLLECT", {"what": ["telemetry"]})
    status, result = wait(lambda: finished(database, collect), 30, "the collection")
    assert status == "COMPLETED" and "cpu_percent" in json.dumps(result)

    allowed = create(database, "worker-1", "DEPLOY", {"command": deploy})
    status, result = wait(lambda: finished(database, allowed), 30, "the allowed command")
    assert status == "COMPLETED" and "deployed" in json.dumps(result)

    refused = create(database, "worker-1", "REMEDIATE", {"command": ["rm", "-rf", "/tmp/x"]})
    status, _ = wait(lambda: finished(database, refused), 30, "the refused command")
    assert status == "REJECTED"

    # Every accepted step went through the agent's reports, in order.
    steps = [s for (s,) in query(
        database, "SELECT status FROM task_events WHERE task_id = %s AND accepted ORDER BY time",
        (allowed,))]  # fmt: skip
    assert steps[0] == "PENDING" or steps[0] == "ASSIGNED"
    assert steps[-1] == "COMPLETED" and "IN_PROGRESS" in steps

    # A restart of the agent (same state folder) does not run a finished task again
    # when the same command arrives once more (a duplicate delivery).
    assert marker.read_text().splitlines() == ["run"]
    assert agent.stop() == 0
    again = agent_factory(broker, "worker-1", pw, *args)
    online = "SELECT 1 FROM agents WHERE agent_id = 'worker-1' AND status = 'online'"
    wait(lambda: query(database, online), 20, "back online")
    (task_id, payload, timeout, expires, correlation, created) = query(
        database, "SELECT task_id, payload, timeout_seconds, expires_at, correlation_id,"
                  " created_at FROM tasks WHERE task_id = %s", (allowed,))[0]  # fmt: skip
    command = {
        "task_id": str(task_id), "type": "DEPLOY", "payload": payload,
        "timeout_seconds": timeout, "expires_at": expires.isoformat(),
        "correlation_id": correlation, "created_at": created.isoformat(), "attempt": 2,
    }  # fmt: skip
    ignored = "SELECT count(*) FROM task_events WHERE task_id = %s AND NOT accepted"
    before = query(database, ignored, (allowed,))[0][0]
    duplicate(broker, "worker-1", json.dumps(command).encode())
    # The agent answers a known task with its last report again (the bridge records it
    # as a duplicate) instead of running it.
    wait(lambda: query(database, ignored, (allowed,))[0][0] > before, 30, "the re-report")
    assert marker.read_text().splitlines() == ["run"]
    assert again.stop() == 0


def duplicate(broker: Broker, agent_id: str, payload: bytes) -> None:
    """Publish a task message as the bridge account, as a redelivery would."""
    url = MqttUrl.parse(broker.url(identity.BRIDGE_USER))
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set(url.username, url.password)
    client.connect(url.host, url.port)
    client.loop_start()
    try:
        client.publish(TopicTree().agent(agent_id, Kind.TASKS), payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_reference_agent_plays_a_deployment_and_its_rollback(
    broker: Broker, bridge: BridgeProcess, database: str,
    agent_factory: Callable[..., AgentProcess], tmp_path: Path,
) -> None:  # fmt: skip
    versions = tmp_path / "versions.txt"
    install = ["sh", "-c", f"echo v2 >> {versions}"]
    undo = ["sh", "-c", f"echo v1 >> {versions}"]
    allow = tmp_path / "allow.json"
    allow.write_text(json.dumps({"commands": [install, undo]}))
    pw = provision(broker, "web-1")["web-1"]
    agent = agent_factory(broker, "web-1", pw, "--state-dir", str(tmp_path / "state"),
                          "--allow-list", str(allow))  # fmt: skip
    wait(lambda: query(database, "SELECT 1 FROM agents WHERE agent_id = 'web-1'"
                                 " AND status = 'online'"), 20, "the agent online")  # fmt: skip

    payload = {"command": install, "rollback_command": undo, "package": "demo", "version": "2"}
    done = eucora(database, "deployments", "create", "--agent", "web-1", "--payload",
                  json.dumps(payload), "--wait", "--wait-timeout", "60", "--json")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    did = doc["deployment_id"]
    assert doc["status"] == "COMPLETED" and doc["counts"]["SUCCESS"] == 1
    assert versions.read_text().splitlines() == ["v2"]
    # The target's state came from the agent's own deployment-status reports, each one
    # accepted (its PENDING, "received, queued", too).
    applied = "SELECT status FROM deployment_status_events WHERE deployment_id = %s" \
              " AND source = 'agent' AND accepted ORDER BY time"  # fmt: skip
    assert [s for (s,) in query(database, applied, (did,))] == [
        "PENDING", "IN_PROGRESS", "SUCCESS",
    ]  # fmt: skip
    reported = "SELECT count(*) FROM deployment_status_events WHERE deployment_id = %s" \
               " AND source = 'agent'"  # fmt: skip
    assert query(database, reported, (did,))[0][0] == 3

    back = eucora(database, "deployments", "rollback", did, "--json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["agents"] == 1
    state = "SELECT status FROM deployments WHERE deployment_id = %s"
    wait(lambda: query(database, state, (did,))[0][0] == "ROLLED_BACK", 60, "ROLLED_BACK")
    shown = eucora(database, "deployments", "show", did, "--json")
    (target,) = json.loads(shown.stdout)["agents"]
    assert target["status"] == "ROLLBACK" and target["progress"] == 100
    assert [s for (s,) in query(database, applied, (did,))] == [
        "PENDING", "IN_PROGRESS", "SUCCESS", "ROLLBACK",
    ]  # fmt: skip
    assert versions.read_text().splitlines() == ["v2", "v1"]
    tasks = "SELECT status, payload ? 'rollback' FROM tasks WHERE deployment_id = %s" \
            " ORDER BY created_at"  # fmt: skip
    assert query(database, tasks, (did,)) == [("COMPLETED", False), ("COMPLETED", True)]
    assert agent.stop() == 0
