"""Task delivery: `eucora tasks create --platform linux` for N online agents until all
are ASSIGNED, against raw publishing of the same N messages, in the same run.

    python -m bench.tasks [--agents 1000] [--rounds 3] [--parallel 8]

Starts its own stack (broker with the project's config, PostgreSQL, bridge) in a
temporary folder, with the agents' accounts written before the broker starts. The
agents are a light in-process fleet: N paho MQTT 5 clients on one thread
(agent.loop.Loop), each with a persistent session, a retained online status and a
registration as `linux`; each acknowledges a task (ASSIGNED) as soon as it arrives.

Per round, measured from the same clock:
- eucora: the `tasks create` process (the CLI's own start-up included), the bridge's
  outbox publishing, delivery, the agents' ASSIGNED reports through the bridge into
  the database. "assigned" is the time until the database shows all N ASSIGNED.
- mosquitto_pub: one `mosquitto_pub -q 1` process per message (it takes one topic per
  run, and each agent has its own), `--parallel` at a time, until every agent has its
  message. Mostly process start-up: the cost of scripting raw MQTT by hand.
- paho: one client publishing the same N messages at QoS 1 (the transport's floor).
Prints one JSON document (medians, and every round).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.loop import Loop, run_in_thread
from bench.simulate import preprovision
from schemas.topics import Kind, TopicTree
from service import identity
from service.stack.process import free_port, wait_for
from service.stack.stack import Stack

TASKS = [sys.executable, "-m", "cli", "tasks"]  # `eucora tasks`, as installed
TREE = TopicTree()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Fleet:
    """N agents on one thread; records when each task id first arrives."""

    def __init__(self, port: int, passwords: dict[str, str]) -> None:
        self.port = port
        self.passwords = passwords
        self.loop = Loop()
        self.lock = threading.Lock()
        self.received: dict[str, float] = {}
        self.ack = False
        self.ready = 0
        self.epoch = int(time.time() * 1000)  # one session per agent for the whole run
        self.clients = [self._client(a, p) for a, p in passwords.items()]

    def _client(self, agent_id: str, password: str) -> paho.Client:
        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=agent_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        c.username_pw_set(agent_id, password)
        c.user_data_set(agent_id)
        c.max_inflight_messages_set(100)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.loop.attach(c)
        return c

    def start(self) -> None:
        run_in_thread(self.loop, "bench-fleet")
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600

        def connect(c: paho.Client) -> None:
            agent_id = c.user_data_get()
            will = {"state": "offline", "epoch": self.epoch, "ts": now(), "reason": "last will"}
            c.will_set(TREE.agent(agent_id, Kind.STATUS), orjson.dumps(will), qos=1, retain=True)
            c.connect("127.0.0.1", self.port, keepalive=60, clean_start=False, properties=props)

        for i, c in enumerate(self.clients):
            self.loop.call_soon_threadsafe(functools.partial(connect, c))
            if i % 200 == 199:  # do not flood the broker's accept queue
                wait_for(functools.partial(self._caught_up, i - 100), 60, "agents connecting")
        wait_for(lambda: self.ready == len(self.clients), 120, "every agent connected")

    def _caught_up(self, n: int) -> bool:
        return self.ready > n

    def _on_connect(self, c: paho.Client, agent_id: str, flags: Any, reason: Any, _p: Any) -> None:
        c.subscribe(TREE.agent(agent_id, Kind.TASKS), qos=1)

    def _on_subscribe(self, c: paho.Client, agent_id: str, *_a: Any) -> None:
        status = {"state": "online", "epoch": self.epoch, "ts": now()}
        c.publish(TREE.agent(agent_id, Kind.STATUS), orjson.dumps(status), qos=1, retain=True)
        register = {
            "hostname": f"{agent_id}.bench", "platform": "linux", "os_version": "Debian 12",
            "agent_version": "bench", "hardware": {"cpu_count": 2, "memory_bytes": 2**31,
            "disk_bytes": 2**35}, "ip_address": "10.0.0.1", "mac_address": "52:54:00:00:00:01",
            "tags": {}, "ts": now(),
        }  # fmt: skip
        c.publish(TREE.agent(agent_id, Kind.REGISTER), orjson.dumps(register), qos=1)
        self.ready += 1

    def _on_message(self, c: paho.Client, agent_id: str, msg: paho.MQTTMessage) -> None:
        doc = orjson.loads(msg.payload)
        task_id = doc.get("task_id")
        if not task_id:
            return
        with self.lock:
            first = task_id not in self.received
            if first:
                self.received[task_id] = time.monotonic()
        if first and self.ack:
            report = {"task_id": task_id, "status": "ASSIGNED", "ts": now()}
            c.publish(TREE.agent(agent_id, Kind.TASK_STATUS), orjson.dumps(report), qos=1)

    def wait_received(self, ids: list[str], timeout: float = 300) -> float:
        wait_for(lambda: all(i in self.received for i in ids), timeout, "every message delivered")
        return max(self.received[i] for i in ids)

    def stop(self) -> None:
        def disconnect_all() -> None:
            for c in self.clients:
                c.disconnect()
            self.loop.stop()

        self.loop.call_soon_threadsafe(disconnect_all)


def task_message(i: int) -> tuple[str, bytes]:
    """A task message as the outbox sends it (fresh task id)."""
    task_id = str(uuid.uuid4())
    t = datetime.now(UTC)
    doc = {
        "task_id": task_id, "type": "HEALTHCHECK", "payload": {}, "timeout_seconds": 3600,
        "expires_at": (t + timedelta(days=7)).isoformat(), "correlation_id": f"raw-{i}",
        "created_at": t.isoformat(), "attempt": 1,
    }  # fmt: skip
    return task_id, orjson.dumps(doc)


def raw_mosquitto_pub(fleet: Fleet, stack: Stack, agents: list[str], parallel: int) -> float:
    broker = stack.broker()
    password = stack.secrets()[identity.BRIDGE_USER]
    messages = [task_message(i) for i in range(len(agents))]
    tool = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"

    def pub(i: int) -> None:
        subprocess.run(
            [tool, "-h", "127.0.0.1", "-p", str(broker.service_port), "-u", identity.BRIDGE_USER,
             "-P", password, "-i", f"bench-raw-{i}", "-q", "1",
             "-t", TREE.agent(agents[i], Kind.TASKS), "-m", messages[i][1].decode()],
            check=True,
        )  # fmt: skip

    fleet.ack = False
    t0 = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(pub, range(len(agents))))
    return fleet.wait_received([m[0] for m in messages]) - t0


def raw_paho(fleet: Fleet, stack: Stack, agents: list[str]) -> float:
    messages = [task_message(i) for i in range(len(agents))]
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-raw-paho", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.username_pw_set(identity.BRIDGE_USER, stack.secrets()[identity.BRIDGE_USER])
    client.max_inflight_messages_set(len(agents))
    client.connect("127.0.0.1", stack.broker().service_port)
    client.loop_start()
    try:
        fleet.ack = False
        t0 = time.monotonic()
        infos = [
            client.publish(TREE.agent(a, Kind.TASKS), m[1], qos=1)
            for a, m in zip(agents, messages, strict=True)
        ]
        for info in infos:
            info.wait_for_publish(60)
        return fleet.wait_received([m[0] for m in messages]) - t0
    finally:
        client.disconnect()
        client.loop_stop()


def eucora(fleet: Fleet, stack: Stack, n: int) -> dict[str, float]:
    database = stack.database_url()
    env = os.environ | {"EUCORA_DATABASE_URL": database}
    fleet.ack = True
    with psycopg.connect(database, autocommit=True) as conn:
        t0 = time.monotonic()
        out = subprocess.run(
            [*TASKS, "create", "--platform", "linux", "--type", "HEALTHCHECK", "--json"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        created = time.monotonic() - t0
        ids = [t["task_id"] for t in orjson.loads(out.stdout)]
        assert len(ids) == n, f"{len(ids)} tasks for {n} agents"
        wait_for(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM tasks"
                    " WHERE task_id = ANY(%s::uuid[]) AND status = 'ASSIGNED'",
                    (ids,),
                ).fetchone()
                == (n,)
            ),
            300,
            "every task ASSIGNED",
        )
        assigned = time.monotonic() - t0
    delivered = fleet.wait_received(ids) - t0
    return {"cli_s": created, "delivered_s": delivered, "assigned_s": assigned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=8, help="mosquitto_pub processes at once")
    args = parser.parse_args()
    n = args.agents
    with tempfile.TemporaryDirectory(prefix="eucora-bench-tasks-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 (the broker and database accounts must reach it)
        stack = Stack(Path(tmp) / "stack")
        stack.up(
            mqtt_port=free_port(), mqtts_port=free_port(), service_port=free_port(),
            db_port=free_port(), metrics_port=free_port(), durable=False,
        )  # fmt: skip
        passwords = orjson.loads(preprovision(stack, [n]).read_bytes())
        fleet = Fleet(stack.broker().port, passwords)
        try:
            fleet.start()
            with psycopg.connect(stack.database_url(), autocommit=True) as conn:
                wait_for(
                    lambda: (
                        conn.execute(
                            "SELECT count(*) FROM agents"
                            " WHERE status = 'online' AND platform = 'linux'"
                        ).fetchone()
                        == (n,)
                    ),
                    120,
                    "every agent online and registered in the database",
                )
            agents = sorted(passwords)
            rounds: list[dict[str, float]] = []
            for r in range(args.rounds):
                row: dict[str, float] = {"round": r + 1}
                row["mosquitto_pub_s"] = raw_mosquitto_pub(fleet, stack, agents, args.parallel)
                row["paho_s"] = raw_paho(fleet, stack, agents)
                row |= {f"eucora_{k}": v for k, v in eucora(fleet, stack, n).items()}
                rounds.append({k: round(v, 3) for k, v in row.items()})
                print(orjson.dumps(rounds[-1]).decode(), file=sys.stderr, flush=True)
        finally:
            fleet.stop()
            stack.down()
    med = {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0] if k != "round"}
    print(
        orjson.dumps(
            {
                "agents": n,
                "rounds": args.rounds,
                "cpus": os.cpu_count(),
                "median": med,
                "ratio_assigned_vs_mosquitto_pub": round(
                    med["eucora_assigned_s"] / med["mosquitto_pub_s"], 2
                ),
                "ratio_assigned_vs_paho": round(med["eucora_assigned_s"] / med["paho_s"], 2),
                "each": rounds,
            },
            option=orjson.OPT_INDENT_2,
        ).decode()
    )


if __name__ == "__main__":
    main()
