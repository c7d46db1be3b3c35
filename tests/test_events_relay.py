"""The event relay to NATS JetStream, against real nats-servers, bridges and PostgreSQL.

What a consumer of the stream checks: every event of the events table arrives, once
by event_id, whatever happens to the relaying bridge (SIGKILL, restart, a second
bridge taking over) or to the JetStream cluster (its stream leader SIGKILLed).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from schemas.config import ConfigError
from schemas.events import EventKind
from service.bridge import relay
from service.config import Settings
from service.db.connect import connect
from service.domains import event_relays, events
from service.stack.broker import Broker
from service.stack.nats import NatsServer
from service.stack.process import free_port_range, wait_for
from tests.fix_nats import cluster_url
from tests.fix_services import service_dir

# Agents whose events the writer records: one with dots (a subject token cannot hold
# them), and events about no agent at all.
AGENTS = ["relay-a1", "host.example.com", "relay-a3", None]


# --- pure rules ------------------------------------------------------------------------


def test_subject_is_one_token_per_agent_and_the_kind() -> None:
    assert relay.subject("agent-1", "task.status") == "eucora.v1.events.agent-1.task.status"
    assert relay.subject("host.example.com", "agent.online") == (
        "eucora.v1.events.host%2Eexample%2Ecom.agent.online"
    )
    assert relay.subject(None, "deployment.status") == "eucora.v1.events._.deployment.status"


def test_events_url_is_checked_before_anything_connects() -> None:
    env = {
        "EUCORA_MQTT_URL": "mqtt://b:p@127.0.0.1:1883",
        "EUCORA_DATABASE_URL": "postgresql://e@h/e",
    }
    assert Settings.from_env(env).events_url is None  # the default: no forwarding
    assert Settings.from_env(env | {"EUCORA_EVENTS_URL": ""}).events_url is None
    cluster = "nats://u:pw@127.0.0.2:4222,nats://u:pw@127.0.0.3:4222"
    more = {"EUCORA_EVENTS_URL": cluster, "EUCORA_EVENTS_REPLICAS": "3"}
    settings = Settings.from_env(env | more)
    assert relay.servers(settings.events_url or "") == cluster.split(",")
    assert settings.events_replicas == 3
    assert "pw" not in repr(settings) and "pw" not in relay.describe_target(cluster)
    with pytest.raises(ConfigError, match="EUCORA_EVENTS_URL") as bad:
        Settings.from_env(env | {"EUCORA_EVENTS_URL": "http://u:secret@127.0.0.1:4222"})
    assert "secret" not in str(bad.value)
    with pytest.raises(ConfigError, match="EUCORA_EVENTS_REPLICAS"):
        Settings.from_env(env | {"EUCORA_EVENTS_REPLICAS": "0"})


# --- helpers ---------------------------------------------------------------------------


@dataclass
class Writer:
    """A thread recording `total` events in small transactions, about `rate` per second,
    through the core's record (as the domain code writes them)."""

    database_url: str
    total: int
    rate: float = 4000.0
    per_tx: int = 40
    written: int = 0
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def start(self) -> Writer:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            with connect(self.database_url) as conn:
                started = time.monotonic()
                while self.written < self.total:
                    batch = [
                        events.NewEvent(
                            kind=EventKind.AGENT_CHANGED,
                            agent_id=AGENTS[(self.written + i) % len(AGENTS)],
                            data={"field": "labels", "new_value": self.written + i},
                        )
                        for i in range(min(self.per_tx, self.total - self.written))
                    ]
                    with conn.transaction():
                        events.record_sync(conn, batch)
                    self.written += len(batch)
                    ahead = self.written / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except BaseException as exc:
            self.error = exc
            raise

    def join(self, timeout: float = 60) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the writer did not finish"
        assert self.error is None, self.error


def table_event_ids(database_url: str) -> set[str]:
    with connect(database_url) as conn:
        return {str(r[0]) for r in conn.execute("SELECT event_id FROM events").fetchall()}


async def _stream_count(url: str) -> int:
    nc = await nats.connect(servers=url.split(","), connect_timeout=2, allow_reconnect=False)
    try:
        info = await nc.jetstream(timeout=2).stream_info(relay.STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()


def stream_count(url: str) -> int:
    """Messages stored in the events stream (0 while it cannot be asked)."""
    try:
        return asyncio.run(_stream_count(url))
    except (nats.errors.Error, OSError, TimeoutError):
        return 0


async def _consume(url: str) -> list[dict[str, Any]]:
    """A consumer reading the whole stream from its start, as an operator's would."""
    nc = await nats.connect(servers=url.split(","), connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        expected = (await js.stream_info(relay.STREAM)).state.messages
        deadline = time.monotonic() + 30
        while True:  # a cluster that lost a node may still be electing its leaders
            try:
                sub = await js.pull_subscribe(
                    relay.SUBJECTS,
                    stream=relay.STREAM,
                    config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
                )
                break
            except nats.errors.TimeoutError:
                if time.monotonic() > deadline:
                    raise
        got: list[dict[str, Any]] = []
        while len(got) < expected:
            for msg in await sub.fetch(1000, timeout=5):
                doc = orjson.loads(msg.data)
                assert msg.headers is not None
                assert msg.headers["Nats-Msg-Id"] == doc["event_id"]
                assert msg.subject == relay.subject(doc["agent_id"], doc["kind"])
                got.append(doc)
                await msg.ack()
        return got
    finally:
        await nc.close()


def consume(url: str) -> list[dict[str, Any]]:
    return asyncio.run(_consume(url))


def relay_report(database_url: str) -> event_relays.RelayReport:
    with connect(database_url) as conn:
        (found,) = event_relays.reports_sync(conn, relay.STREAM)
    return found


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def is_active(bridge: Any) -> bool:
    return metric(bridge.metrics(), "eucora_events_relay_active") == 1


def assert_each_event_once(database_url: str, url: str) -> list[dict[str, Any]]:
    """The consumer's count: every event of the table, each exactly once by event_id."""
    got = consume(url)
    counts = collections.Counter(doc["event_id"] for doc in got)
    duplicates = {k: n for k, n in counts.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} events stored more than once"
    in_table = table_event_ids(database_url)
    assert set(counts) == in_table, (
        f"missing {len(in_table - set(counts))}, unknown {len(set(counts) - in_table)}"
    )
    return got


# --- the relay's guarantees ------------------------------------------------------------


def test_relay_killed_restarted_and_taken_over_forwards_every_event_once(
    bridge_factory: Callable[..., Any], broker: Broker, database: str, nats_server: NatsServer
) -> None:
    url = nats_server.url()
    first = bridge_factory(broker, database, client_id="relay-1", EUCORA_EVENTS_URL=url)
    second = bridge_factory(broker, database, client_id="relay-2", EUCORA_EVENTS_URL=url)
    wait_for(lambda: is_active(first), 15, "the first bridge to relay")
    assert not is_active(second)  # a standby
    writer = Writer(database, total=30_000).start()
    wait_for(lambda: stream_count(url) >= 3_000, 30, "the relay to forward a first part")
    # The crash that matters: JetStream acknowledged events whose position the relay
    # had not saved yet. The gap between the two is too short to hit by chance, so the
    # relay is frozen (still holding its lock), its saved position set back to the
    # start, and then it is killed: the next holder resends everything.
    first.proc.send_signal(signal.SIGSTOP)
    with connect(database) as conn, conn.transaction():
        conn.execute("UPDATE event_relays SET cursor_xid = '0', cursor_id = 0")
    first.kill()
    assert writer.written < writer.total, "the kill came after the last event was written"
    wait_for(lambda: relay_report(database).holder == "relay-2", 15, "the standby to take over")
    first.start()  # restarted: a standby now, the second bridge relays
    writer.join()
    total = len(table_event_ids(database))
    wait_for(lambda: stream_count(url) >= total, 30, "the relay to forward every event")
    wait_for(lambda: relay_report(database).behind == 0, 10, "the relay's position to catch up")

    got = assert_each_event_once(database, url)
    # In the stream, each agent's events come in agent_seq order, without gaps.
    seqs: dict[str, list[int]] = collections.defaultdict(list)
    for doc in got:
        if doc["agent_id"] is not None:
            seqs[doc["agent_id"]].append(doc["agent_seq"])
    for agent, numbers in seqs.items():
        assert numbers == list(range(1, len(numbers) + 1)), agent
    report = relay_report(database)
    assert report.holder == "relay-2"
    assert metric(second.metrics(), "eucora_events_relay_active") == 1
    # What it resent, JetStream already had: dropped by message id, counted.
    assert metric(second.metrics(), "eucora_events_relay_duplicates_total") >= 3_000
    assert metric(first.metrics(), "eucora_events_relay_active") == 0


def test_jetstream_cluster_stream_leader_killed_under_load_loses_nothing(
    bridge_factory: Callable[..., Any],
    broker: Broker,
    database: str,
    nats_cluster: list[NatsServer],
) -> None:
    url = cluster_url(nats_cluster)
    bridge = bridge_factory(
        broker, database, client_id="relay-r3", EUCORA_EVENTS_URL=url, EUCORA_EVENTS_REPLICAS="3"
    )
    wait_for(lambda: is_active(bridge), 30, "the relay to create its R3 stream")
    writer = Writer(database, total=20_000).start()
    wait_for(lambda: stream_count(url) >= 2_000, 40, "the relay to forward a first part")
    leader = asyncio.run(_stream_leader(url))
    (victim,) = [n for n in nats_cluster if n.name == leader]
    victim.kill()
    assert writer.written < writer.total, "the kill came after the last event was written"
    survivors = cluster_url([n for n in nats_cluster if n is not victim])
    writer.join()
    total = len(table_event_ids(database))
    wait_for(lambda: stream_count(survivors) >= total, 45, "the relay to forward every event")
    assert_each_event_once(database, survivors)


async def _stream_leader(url: str) -> str:
    nc = await nats.connect(servers=url.split(","), connect_timeout=2)
    try:
        info = await nc.jetstream(timeout=5).stream_info(relay.STREAM)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.leader
        return str(info.cluster.leader)
    finally:
        await nc.close()


def test_relay_waits_out_a_nats_server_that_goes_away(
    bridge_factory: Callable[..., Any], broker: Broker, database: str, nats_server: NatsServer
) -> None:
    """NATS away: the relay retries with back-off, says why in `eucora status`, and
    forwards everything once the server is back."""
    url = nats_server.url()
    bridge = bridge_factory(broker, database, client_id="relay-away", EUCORA_EVENTS_URL=url)
    Writer(database, total=500, rate=5000).start().join()
    wait_for(lambda: stream_count(url) >= 500, 20, "the first events")
    nats_server.stop()
    Writer(database, total=500, rate=5000).start().join()  # written while NATS is away
    wait_for(lambda: relay_report(database).error is not None, 20, "the relay to report it")
    assert bridge.ready()  # ingest is not affected
    nats_server.start()
    wait_for(lambda: stream_count(url) >= 1000, 30, "the relay to resume")
    wait_for(lambda: relay_report(database).behind == 0, 10, "the relay's position")
    assert relay_report(database).error is None
    assert_each_event_once(database, url)
    assert metric(bridge.metrics(), "eucora_events_relay_failures_total") >= 1
    # The consumer docs/events.md shows reads every event once.
    got = run_docs_consumer(url, until=1000)
    assert {e["event_id"] for e in got} == table_event_ids(database)


class Enough(Exception):
    pass


def run_docs_consumer(url: str, until: int) -> list[dict[str, Any]]:
    """The example consumer of docs/events.md, as written, until it handled `until` events."""
    text = (Path(__file__).parents[1] / "docs" / "events.md").read_text()
    block = text.split("**A consumer**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = block.rsplit("asyncio.run(", 1)[0]  # the example's own run, forever
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/events.md", "exec"), namespace)  # noqa: S102 (our own docs)
    got: list[dict[str, Any]] = []

    def handle(event: dict[str, Any]) -> None:
        got.append(event)
        if len(got) >= until:
            raise Enough

    with pytest.MonkeyPatch.context() as env:
        env.setenv("EUCORA_EVENTS_URL", url)
        with pytest.raises(Enough):
            asyncio.run(asyncio.wait_for(namespace["consume"](handle), 30))
    return got


# --- the local stack -------------------------------------------------------------------


def eucora(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=None if env is None else os.environ | env,
    )


def test_stack_up_events_nats_forwards_and_status_shows_the_relay() -> None:
    with service_dir("stack") as root:
        d = str(root / "s")
        first = free_port_range(3)  # below the ephemeral range: no client takes them
        mqtt, service, db = first, first + 1, first + 2
        ports = ["--mqtt-port", str(mqtt), "--service-port", str(service), "--db-port", str(db)]
        up = eucora("stack", "up", "--dir", d, *ports, "--events", "nats", "--json")
        try:
            assert up.returncode == 0, up.stderr
            urls = json.loads(up.stdout)
            url = urls["events_url"]
            assert url.startswith("nats://eucora:")
            Writer(urls["database_url"], total=200).start().join()
            wait_for(lambda: stream_count(url) >= 200, 20, "the stack's relay to forward")

            env = {"EUCORA_DATABASE_URL": urls["database_url"], "EUCORA_MQTT_URL": urls["mqtt_url"]}

            database = urls["database_url"]
            wait_for(lambda: relay_report(database).behind == 0, 10, "the relay to catch up")
            shown = json.loads(eucora("status", "--json", env=env).stdout)["events"]
            assert shown["behind"] == 0
            assert shown["forwarding"] is True
            assert shown["stream"] == relay.STREAM and shown["error"] is None
            assert shown["relayed"] >= 200
            assert "eucora:***@" in shown["target"]  # never the password
            text = eucora("status", env=env)
            assert "forwarding" in text.stdout and "on, to nats://" in text.stdout

            st = eucora("stack", "status", "--dir", d, "--json")
            assert st.returncode == 0, st.stderr
            assert json.loads(st.stdout)["events"]["running"] is True
        finally:
            down = eucora("stack", "down", "--dir", d)
        assert down.returncode == 0, down.stderr
        st = eucora("stack", "status", "--dir", d, "--json")
        assert json.loads(st.stdout)["events"]["running"] is False
        secrets = json.loads((Path(d) / "secrets.json").read_text())
        logs = (Path(d) / "bridge.log").read_text() + (Path(d) / "nats/nats.log").read_text()
        for value in secrets.values():
            assert value not in logs
