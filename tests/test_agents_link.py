"""The agent on a link that stalls: connecting never stops it measuring, and one
agent's stalled connect never holds up another (real broker; a silent TLS peer)."""

from __future__ import annotations

import contextlib
import gc
import socket
import threading
import warnings
from collections.abc import Iterator

import pytest

from agent.session import AgentSession, Timing
from schemas.config import MqttUrl
from service.stack.broker import Broker
from tests.test_agents_support import (
    FakeHost,
    LoopThread,
    agent_url,
    loop_thread,
    provision,
    wait,
)

__all__ = ["loop_thread"]  # fixture

FAST = Timing(keepalive=5, telemetry_interval=0.2, heartbeat_interval=3600,
              inventory_interval=3600, reconnect_min=0.5, reconnect_max=1)  # fmt: skip


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A TCP listener that accepts and never says a word: a TLS handshake against it
    stalls until the client's connect timeout (paho: 5 s), as on a black-holed link."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    with contextlib.suppress(OSError):
        server.shutdown(socket.SHUT_RDWR)
    server.close()
    for c in held:
        c.close()


def test_the_agent_keeps_sampling_while_its_connect_stalls(
    loop_thread: LoopThread, silent_peer: int
) -> None:
    host = FakeHost()
    s = loop_thread.session_at(
        MqttUrl.parse(f"mqtts://stalled:pw@127.0.0.1:{silent_peer}"), "stalled", host=host,
        timing=FAST,
    )  # fmt: skip
    # The first attempt hangs in the TLS handshake for paho's 5 s connect timeout.
    wait(lambda: s.counters.connect_failures >= 1, 15, "the stalled attempt to give up")
    # Samples every 0.2 s went on meanwhile (~25 in 5 s; none with a blocking connect),
    # kept for when the link is back.
    buffered = loop_thread.call(lambda: len(s.buffer))
    assert buffered >= 10, buffered
    stop_and_forget(loop_thread, s)


def test_one_agents_stalled_connect_does_not_hold_up_another(
    broker: Broker, loop_thread: LoopThread, silent_peer: int
) -> None:
    pw = provision(broker, "fine")["fine"]
    stuck = loop_thread.session_at(
        MqttUrl.parse(f"mqtts://stuck:pw@127.0.0.1:{silent_peer}"), "stuck", timing=FAST
    )
    fine = loop_thread.session_at(MqttUrl.parse(agent_url(broker, "fine", pw)), "fine",
                                  timing=FAST, start_delay=0.1)  # fmt: skip
    wait(lambda: loop_thread.call(lambda: fine.connected), 10, "the healthy agent connected")
    # ... while the other one's first attempt is still stuck in its handshake.
    assert loop_thread.call(lambda: (stuck.connecting, stuck.counters.connect_failures)) == (
        True, 0,
    )  # fmt: skip
    loop_thread.call(fine.stop)
    stop_and_forget(loop_thread, stuck)


def stop_and_forget(loop_thread: LoopThread, s: AgentSession) -> None:
    """Stop a session whose connect may still hang, once it is done (paho leaves the
    socket of a failed TLS handshake to the garbage collector: collected here, quietly)."""
    loop_thread.call(s.stop)
    wait(lambda: s.stopped, 15, "the stalled attempt to end")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
