"""Agents against a real broker, bridge process and database: online status with
epochs, last wills, takeovers, registration history, stale sweep, buffered telemetry.

Every wait polls the database (or the broker's retained message) with a deadline.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from service.stack.broker import Broker
from tests.fix_services import BridgeProcess
from tests.test_agents_support import (
    AgentProcess,
    agent_factory,
    agent_status,
    provision,
    query,
    wait,
)

__all__ = ["agent_factory"]  # a fixture, imported for the tests below

KEEPALIVE = 2


def online_epoch(database: str, agent_id: str) -> int | None:
    st = agent_status(database, agent_id)
    return st[1] if st and st[0] == "online" and not st[2] else None


def test_killed_agent_is_offline_within_keepalive_bound(
    broker: Broker, bridge: BridgeProcess, database: str, agent_factory: Callable[..., AgentProcess]
) -> None:
    pw = provision(broker, "kill-me")["kill-me"]
    agent = agent_factory(
        broker, "kill-me", pw, "--keepalive", str(KEEPALIVE), "--telemetry-interval", "1"
    )
    epoch = wait(lambda: online_epoch(database, "kill-me"), 20, "the agent online")
    killed = time.monotonic()
    agent.signal(signal.SIGKILL)
    wait(
        lambda: agent_status(database, "kill-me") == ("offline", epoch, False),
        1.5 * KEEPALIVE + 5,
        "offline after SIGKILL",
    )
    elapsed = time.monotonic() - killed
    assert elapsed <= 1.5 * KEEPALIVE + 5
    (source, accepted) = query(
        database,
        "SELECT source, accepted FROM agent_status_events"
        " WHERE agent_id = %s AND state = 'offline'",
        ("kill-me",),
    )[0]
    assert (source, accepted) == ("last_will", True)


def test_frozen_agent_is_offline_within_keepalive_bound_and_comes_back(
    broker: Broker, bridge: BridgeProcess, database: str, agent_factory: Callable[..., AgentProcess]
) -> None:
    pw = provision(broker, "freeze-me")["freeze-me"]
    agent = agent_factory(broker, "freeze-me", pw, "--keepalive", str(KEEPALIVE))
    epoch = wait(lambda: online_epoch(database, "freeze-me"), 20, "the agent online")
    agent.signal(signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        # The broker notices a silent client after 1.5 x keepalive (checked every ~5 s).
        wait(
            lambda: agent_status(database, "freeze-me") == ("offline", epoch, False),
            1.5 * KEEPALIVE + 5 + 1,  # +1: the bridge's batching delay and our polling
            "offline after SIGSTOP",
        )
        assert time.monotonic() - frozen <= 1.5 * KEEPALIVE + 6
    finally:
        agent.signal(signal.SIGCONT)
    # Thawed, it finds its connection gone and reconnects with a newer epoch.
    new = wait(lambda: online_epoch(database, "freeze-me"), 30, "online again after SIGCONT")
    assert new > epoch


def test_graceful_stop_publishes_offline_itself(
    broker: Broker, bridge: BridgeProcess, database: str, agent_factory: Callable[..., AgentProcess]
) -> None:
    pw = provision(broker, "polite")["polite"]
    agent = agent_factory(broker, "polite", pw)
    epoch = wait(lambda: online_epoch(database, "polite"), 20, "the agent online")
    assert agent.stop() == 0
    wait(lambda: agent_status(database, "polite") == ("offline", epoch, False), 10, "offline")
    rows = query(
        database,
        "SELECT state, epoch, source, reason FROM agent_status_events"
        " WHERE agent_id = %s ORDER BY time",
        ("polite",),
    )
    assert rows == [
        ("online", epoch, "agent", None),
        ("offline", epoch, "agent", "graceful shutdown"),
    ]
    # Registration and heartbeat arrived too.
    (hostname, platform, hb) = query(
        database,
        "SELECT hostname, platform, last_heartbeat_at IS NOT NULL FROM agents WHERE agent_id = %s",
        ("polite",),
    )[0]
    assert hostname and platform == "linux" and hb


def test_agent_refuses_bad_configuration_and_bad_credentials(
    broker: Broker, agent_factory: Callable[..., AgentProcess]
) -> None:
    no_id = agent_factory(broker, "x", "pw", EUCORA_AGENT_ID="")
    assert no_id.proc is not None and no_id.proc.wait(20) == 2
    assert "error: no agent id" in no_id.log()
    provision(broker, "locked-out")
    wrong = agent_factory(broker, "locked-out", "not-the-password")
    assert wrong.proc is not None and wrong.proc.wait(20) == 2
    assert "the broker refused" in wrong.log() and "not-the-password" not in wrong.log()
