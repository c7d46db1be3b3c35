"""`eucora agents watch`: a live view over MQTT with the operator's account, against
the project's broker (its service listener and ACLs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import orjson

from schemas.topics import Kind
from service import identity
from service.stack.broker import Broker
from service.stack.process import free_port
from tests.publishers import AgentClient, provision

STATUS = b'{"state": "online", "epoch": %d, "ts": "2026-01-01T00:00:00Z"}'
TASK_ID = "0b5e2c1e-8a43-4f0e-9d0c-5d2f6b1a7c11"
TASK_STATUS = orjson.dumps(
    {"task_id": TASK_ID, "status": "IN_PROGRESS",
     "progress": 40, "ts": "2026-01-01T00:00:01Z"}
)  # fmt: skip


def watcher(url: str, *args: str) -> subprocess.Popen[str]:
    """`eucora agents watch` running, returned once it has subscribed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EUCORA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "agents", "watch", *args],
        env=env | {"EUCORA_MQTT_URL": url},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    first = proc.stderr.readline()  # written once every subscription is acknowledged
    assert first.startswith("watching "), first + proc.stderr.read()
    return proc


def finish(proc: subprocess.Popen[str]) -> tuple[list[str], str]:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return out.splitlines(), err


def test_watch_shows_what_agents_say_as_it_happens(broker: Broker) -> None:
    passwords = provision(broker, "web-01", "web-02")
    web1 = AgentClient(broker.port, "web-01", passwords["web-01"])
    web2 = AgentClient(broker.port, "web-02", passwords["web-02"])
    try:
        # Retained before the watch starts: not replayed (live only).
        web1.client.publish("eucora/v1/agents/web-01/status", STATUS % 1, qos=1, retain=True)
        everyone = watcher(broker.url(identity.OPERATOR_USER), "--json", "--count", "4")
        only_one = watcher(broker.url(identity.OPERATOR_USER), "--agent", "web-01", "--count", "2")
        web2.publish(Kind.STATUS, [STATUS % 7])
        web1.publish(Kind.STATUS, [STATUS % 2])
        web1.publish(Kind.HEARTBEAT, [b'{"ts": "2026-01-01T00:00:00Z"}'])  # not watched
        web1.publish(Kind.TASK_STATUS, [TASK_STATUS])
        web2.publish(Kind.TASK_STATUS, [b'{"status": "DONE"}'])  # shown as invalid
    finally:
        web1.close()
        web2.close()

    lines, _ = finish(everyone)
    docs: list[dict[str, Any]] = [json.loads(line) for line in lines]
    assert [(d["agent_id"], d["kind"]) for d in docs] == [
        ("web-02", "status"), ("web-01", "status"), ("web-01", "task-status"),
        ("web-02", "task-status"),
    ]  # fmt: skip
    assert docs[1]["payload"]["epoch"] == 2  # the live one, not the retained epoch 1
    assert docs[2]["payload"]["status"] == "IN_PROGRESS"
    assert docs[3]["invalid"] == "schema" and "task_id" in docs[3]["detail"]

    lines, _ = finish(only_one)
    assert len(lines) == 2
    assert lines[0].split()[1:] == ["web-01", "status", "online", "(epoch", "2)"]
    assert lines[1].split()[1:5] == ["web-01", "task-status", "task", TASK_ID]
    assert lines[1].endswith("IN_PROGRESS 40%")


def test_watch_stops_cleanly_on_ctrl_c(broker: Broker) -> None:
    proc = watcher(broker.url(identity.OPERATOR_USER))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "" and err == ""


def test_watch_without_a_broker_or_with_a_wrong_password(broker: Broker) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EUCORA_")}
    cases = [
        (f"mqtt://eucora-operator:pw@127.0.0.1:{free_port()}", 4, "cannot reach the broker"),
        (f"mqtt://eucora-operator:wrong@127.0.0.1:{broker.service_port}", 2, "refused the account"),
    ]
    for url, code, text in cases:
        result = subprocess.run(
            [sys.executable, "-m", "cli", "agents", "watch"],
            env=env | {"EUCORA_MQTT_URL": url}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == code, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("error: ") and text in line
        assert "wrong" not in line and "pw@" not in line
