"""Status races, duplicate agent ids, re-registration and the stale sweep, against a real
broker, bridge process and database."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import protocol
from agent.protocol import EpochClock
from agent.session import AgentSession
from schemas.constants import WILL_REASON
from schemas.states import AgentState
from schemas.topics import Kind, TopicTree
from schemas.validate import parse
from service import identity
from service.stack.broker import Broker
from tests.fix_services import BridgeProcess
from tests.test_agents_support import (
    AgentProcess,
    FakeHost,
    LoopThread,
    agent_factory,
    agent_status,
    loop_thread,
    provision,
    query,
    wait,
)

__all__ = ["agent_factory", "loop_thread"]  # fixtures, imported for the tests below

TREE = TopicTree()


def test_will_reason_is_shared_by_agent_and_bridge() -> None:
    will = parse(Kind.STATUS, "a1", protocol.will(1))
    assert will.reason == WILL_REASON


class Chaos:
    """A test-only account that may publish any agent's status: it plays the late
    last will of an old session (as a delayed will, or one routed through another
    broker node, would arrive)."""

    def __init__(self, broker: Broker) -> None:
        password = identity.new_password()
        # A service account of its own, added to the service listener's files.
        auth = broker.auth
        with auth.lock():
            with open(auth.service_file, "a") as f:
                f.write(f"chaos:{identity.hash_password(password)}\n")
            with open(auth.service_acl, "a") as f:
                f.write(f"\nuser chaos\ntopic write {TREE.wildcard(Kind.STATUS)}\n")
        broker.reload()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="chaos", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.username_pw_set("chaos", password)
        self.client.connect(broker.service_bind, broker.service_port)
        self.client.loop_start()

    def late_will(self, agent_id: str, epoch: int) -> None:
        info = self.client.publish(
            TREE.agent(agent_id, Kind.STATUS), protocol.will(epoch), qos=1, retain=True
        )
        info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def chaos(broker: Broker) -> Iterator[Chaos]:
    c = Chaos(broker)
    yield c
    c.close()


def retained_statuses(broker: Broker, agent_ids: set[str], timeout: float = 10) -> dict[str, Any]:
    """The retained status of each agent, read as the operator account."""
    seen: dict[str, Any] = {}
    done = threading.Event()

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        agent_id = TREE.parse(msg.topic).agent_id
        if agent_id in agent_ids:
            seen[agent_id] = orjson.loads(msg.payload)
            if seen.keys() == agent_ids:
                done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set(identity.OPERATOR_USER, broker.passwords[identity.OPERATOR_USER])
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(TREE.wildcard(Kind.STATUS), qos=1)
    client.connect(broker.service_bind, broker.service_port)
    client.loop_start()
    try:
        assert done.wait(timeout), f"retained statuses missing for {agent_ids - seen.keys()}"
    finally:
        client.disconnect()
        client.loop_stop()
    return seen


def test_quick_reconnect_is_never_left_offline_by_the_old_will_100_races(
    broker: Broker, bridge: BridgeProcess, database: str, loop_thread: LoopThread, chaos: Chaos
) -> None:
    """20 agents x 5 rounds: each round the current session freezes (socket left open,
    as a crashed host's half-open TCP connection) and a new session of the same agent
    connects at once with a newer epoch, taking the session over; the broker publishes
    the old session's will. Half of the rounds also get the old will again *after* the
    new online (a late will). The bridge must end every agent online with its newest
    epoch, never accept an older offline, and the retained status must be online too."""
    agents = [f"race-{i:02d}" for i in range(20)]
    rounds = 5
    passwords = provision(broker, *agents)
    rng = random.Random(5)
    clocks = {a: EpochClock() for a in agents}
    current: dict[str, AgentSession] = {
        a: loop_thread.session(broker, a, passwords[a], epochs=clocks[a]) for a in agents
    }
    abandoned: list[AgentSession] = []

    def connected(sessions: dict[str, AgentSession]) -> bool:
        return loop_thread.call(lambda: all(s.connected for s in sessions.values()))

    wait(lambda: connected(current), 20, "every first session connected")
    late_wills = 0
    for _ in range(rounds):
        old_epochs = {a: s.epoch for a, s in current.items()}
        for a, s in current.items():
            loop_thread.call(s.abandon)
            abandoned.append(s)
            current[a] = loop_thread.session(broker, a, passwords[a], epochs=clocks[a])
        wait(lambda: connected(current), 20, "the new sessions connected")
        for a in agents:
            if rng.random() < 0.5:
                epoch = old_epochs[a]
                assert epoch is not None
                chaos.late_will(a, epoch)
                late_wills += 1
    final = {a: s.epoch for a, s in current.items()}

    def all_online() -> bool:
        return all(agent_status(database, a) == ("online", final[a], False) for a in agents)

    wait(all_online, 30, "every agent online with its newest epoch in the database")
    retained = retained_statuses(broker, set(agents))
    for a in agents:
        assert (retained[a]["state"], retained[a]["epoch"]) == ("online", final[a]), a
    # The history never accepted an older epoch; late wills were recorded as ignored.
    for a in agents:
        events = query(
            database,
            "SELECT state, epoch, accepted FROM agent_status_events"
            " WHERE agent_id = %s ORDER BY time",
            (a,),
        )
        accepted = [e for e in events if e[2]]
        assert [e[1] for e in accepted] == sorted(e[1] for e in accepted), a
        assert accepted[-1][:2] == ("online", final[a])
        # Ignored: older wills, and (under load, with two batches committing at once)
        # an older session's online that committed after a newer one: never the newest.
        for _state, epoch, ok in events:
            if not ok:
                assert epoch < final[a], (a, events)
    ignored = query(database, "SELECT count(*) FROM agent_status_events WHERE NOT accepted")
    assert late_wills > 0 and ignored[0][0] >= 1
    # The sessions that saw an old will overwrite their online republished it.
    republished = loop_thread.call(lambda: sum(s.counters.republished for s in current.values()))
    assert republished >= 1
    # And the database still says online once everything has settled.
    assert all_online()
    for s in current.values():
        loop_thread.call(s.stop)


def test_two_processes_with_one_agent_id_converge(
    broker: Broker, bridge: BridgeProcess, database: str, agent_factory: Callable[..., AgentProcess]
) -> None:
    """Two processes with the same id take the session from each other (each takeover
    publishes the other's will). Once one is gone the survivor must end online with its
    own epoch, in the database and in the retained message, and offline once it stops."""
    pw = provision(broker, "twin")["twin"]
    first = agent_factory(broker, "twin", pw, "--keepalive", "5")
    wait(lambda: (agent_status(database, "twin") or ("",))[0] == "online", 20, "first online")
    second = agent_factory(broker, "twin", pw, "--keepalive", "5")

    def onlines() -> int:
        rows = query(
            database,
            "SELECT count(*) FROM agent_status_events"
            " WHERE agent_id = 'twin' AND state = 'online' AND accepted",
        )
        return int(rows[0][0])

    # They fight: at least first, second, first again.
    wait(lambda: onlines() >= 3, 40, "the two processes to take over from each other")
    assert "another client connected with this agent id" in first.log() + second.log()
    second.kill()

    def settled() -> int | None:
        st = agent_status(database, "twin")
        if st is None or st[0] != "online":
            return None
        retained = retained_statuses(broker, {"twin"})["twin"]
        ok = retained["state"] == "online" and retained["epoch"] == st[1]
        return st[1] if ok else None

    epoch = wait(settled, 60, "the survivor online in the database and the retained status")
    connected = [line for line in first.log().splitlines() if '"msg":"connected"' in line]
    assert orjson.loads(connected[-1])["epoch"] == epoch  # the survivor's own epoch
    assert first.stop() == 0
    wait(lambda: agent_status(database, "twin") == ("offline", epoch, False), 10, "offline")


def test_reregistration_updates_the_agent_and_keeps_history(
    broker: Broker, bridge: BridgeProcess, database: str, loop_thread: LoopThread
) -> None:
    from dataclasses import replace

    pw = provision(broker, "rereg")["rereg"]
    host = FakeHost("rereg-host")
    s = loop_thread.session(broker, "rereg", pw, host=host)

    def registered() -> Any:
        rows = query(database, "SELECT hardware, os_version FROM agents WHERE agent_id = 'rereg'")
        return rows and rows[0][0] and rows[0]

    hardware, os_version = wait(registered, 20, "the registration stored")
    assert hardware == {"cpu_count": 4, "memory_bytes": 8 << 30, "disk_bytes": 256 << 30}
    assert os_version == "Debian GNU/Linux 12"
    # The same registration again (reconnect, redelivery) changes nothing.
    loop_thread.call(s.register)
    # New hardware and OS: the record follows, the old values are kept.
    host.host_info = replace(host.host_info, memory_bytes=16 << 30, os_version="Debian 13")
    loop_thread.call(s.register)

    def changes() -> list[Any]:
        return query(
            database,
            "SELECT field, old_value, new_value FROM agent_changes"
            " WHERE agent_id = 'rereg' ORDER BY field",
        )

    rows = wait(changes, 20, "the changes recorded")
    assert rows == [
        ("hardware", {"cpu_count": 4, "memory_bytes": 8 << 30, "disk_bytes": 256 << 30},
         {"cpu_count": 4, "memory_bytes": 16 << 30, "disk_bytes": 256 << 30}),
        ("os_version", "Debian GNU/Linux 12", "Debian 13"),
    ]  # fmt: skip
    assert query(database, "SELECT hardware->>'memory_bytes', os_version FROM agents") == [
        (str(16 << 30), "Debian 13")
    ]
    events = query(
        database,
        "SELECT event, detail->'fields' FROM security_events WHERE event <> 'first_registration'",
    )
    assert events == [("re_registration", ["os_version", "hardware"])]
    # An older registration arriving late (another bridge, a redelivery) is ignored.
    old = orjson.loads(protocol.register(host.info(), "0.0.1", {}))
    old["ts"] = "2000-01-01T00:00:00Z"
    loop_thread.call(
        lambda: s.client.publish(TREE.agent("rereg", Kind.REGISTER), orjson.dumps(old), qos=1)
    )
    wait(
        lambda: 'eucora_registrations_total{outcome="out_of_order"} 1.0' in bridge.metrics(),
        10,
        "the late registration seen by the bridge",
    )
    assert query(database, "SELECT count(*) FROM agent_changes") == [(2,)]
    assert query(database, "SELECT agent_version FROM agents") == [("0.1.0",)]
    loop_thread.call(s.stop)


def test_silent_agent_is_marked_stale_and_recovers(
    broker: Broker, bridge_factory: Any, database: str, loop_thread: LoopThread
) -> None:
    bridge_factory(broker, database, EUCORA_OFFLINE_AFTER="3")
    pw = provision(broker, "quiet")["quiet"]
    s = loop_thread.session(broker, "quiet", pw)  # heartbeats and telemetry hourly
    epoch = wait(lambda: loop_thread.call(lambda: s.epoch if s.connected else None), 20, "up")

    def stale_events() -> int:
        rows = query(
            database,
            "SELECT count(*) FROM agent_status_events"
            " WHERE agent_id = 'quiet' AND state = 'stale' AND source = 'bridge'",
        )
        return int(rows[0][0])

    wait(lambda: agent_status(database, "quiet") == ("online", epoch, True), 10, "stale")
    assert stale_events() == 1
    # Any message clears it; silence makes it stale again (a second event, not more).
    loop_thread.call(s._heartbeat_tick)
    wait(lambda: agent_status(database, "quiet") == ("online", epoch, False), 10, "fresh again")
    wait(lambda: agent_status(database, "quiet") == ("online", epoch, True), 10, "stale again")
    assert stale_events() == 2
    loop_thread.call(s.stop)


def test_status_messages_are_idempotent_across_two_bridges(
    broker: Broker, bridge_factory: Any, database: str, loop_thread: LoopThread
) -> None:
    """Status is not a shared subscription: both bridges get every status and must
    record each transition once."""
    bridge_factory(broker, database, client_id="bridge-a")
    bridge_factory(broker, database, client_id="bridge-b")
    pw = provision(broker, "dual")["dual"]
    s = loop_thread.session(broker, "dual", pw)
    epoch = wait(lambda: loop_thread.call(lambda: s.epoch if s.connected else None), 20, "up")
    loop_thread.call(s.stop)
    wait(lambda: agent_status(database, "dual") == ("offline", epoch, False), 10, "offline")
    rows = query(
        database,
        "SELECT state, epoch, accepted FROM agent_status_events WHERE agent_id = 'dual'"
        " ORDER BY time",
    )
    assert rows == [("online", epoch, True), ("offline", epoch, True)]
    assert AgentState.ONLINE == "online"  # the wire values are the stored values


def test_status_judgement_table() -> None:
    # judge() is the whole decision; its table is tested without any service.
    from service.domains.agents import Verdict, judge

    on, off = AgentState.ONLINE, AgentState.OFFLINE
    assert judge(None, None, off, 5).verdict is Verdict.ACCEPT
    assert judge("unknown", None, on, 5).verdict is Verdict.ACCEPT
    assert judge("online", 5, on, 6).verdict is Verdict.ACCEPT
    assert judge("online", 5, off, 6).verdict is Verdict.ACCEPT
    assert judge("online", 5, off, 5).verdict is Verdict.ACCEPT  # its own will
    assert judge("online", 5, on, 5).verdict is Verdict.DUPLICATE
    assert judge("offline", 5, off, 5).verdict is Verdict.DUPLICATE
    assert judge("offline", 5, on, 5).verdict is Verdict.DUPLICATE  # no revival
    assert judge("online", 5, off, 4).verdict is Verdict.IGNORE  # an old will
    assert judge("online", 5, on, 4).verdict is Verdict.IGNORE


def test_presence_over_mqtt_311_online_crash_will_and_back(
    broker: Broker, bridge: BridgeProcess, database: str, loop_thread: LoopThread
) -> None:
    pw = provision(broker, "old-proto")["old-proto"]
    s = loop_thread.session(broker, "old-proto", pw, mqtt_version="3.1.1")
    first = wait(lambda: loop_thread.call(lambda: s.epoch if s.connected else None), 20, "up")
    wait(lambda: agent_status(database, "old-proto") == ("online", first, False), 10, "online")
    # A crash (no DISCONNECT): the broker publishes the retained will, the bridge
    # records it as the last will's offline; the agent comes back with a new epoch.
    loop_thread.call(lambda: s.crash(2.0))
    wait(
        lambda: query(database, "SELECT count(*) FROM agent_status_events WHERE agent_id ="
                      " 'old-proto' AND state = 'offline' AND source = 'last_will'")[0][0] == 1,
        15, "the will recorded",
    )  # fmt: skip
    second = wait(
        lambda: loop_thread.call(lambda: s.epoch if s.connected and s.epoch != first else None),
        20, "back",
    )  # fmt: skip
    wait(lambda: agent_status(database, "old-proto") == ("online", second, False), 10, "again")
    loop_thread.call(s.stop)
    wait(lambda: agent_status(database, "old-proto")[0] == "offline", 10, "own offline")
