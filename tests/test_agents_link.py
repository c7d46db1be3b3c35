"""The agent on a link that stalls: connecting never stops it measuring, and one
agent's stalled connect never holds up another (real broker; a silent TLS peer)."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent import protocol
from agent.buffer import DurableBuffer, FallbackBuffer, TelemetryBuffer, open_buffer
from agent.protocol import Metrics
from agent.session import AgentSession, Timing
from cli.agents import app as agents_app
from cli.tasks import app as tasks_app
from schemas.config import MqttUrl
from schemas.payloads import TelemetrySample
from service.stack.broker import Broker
from tests.fix_services import BridgeProcess
from tests.test_agents_support import (
    AgentProcess,
    FakeHost,
    LoopThread,
    Proxy,
    agent_factory,
    agent_status,
    agent_url,
    loop_thread,
    provision,
    query,
    wait,
)

__all__ = ["agent_factory", "loop_thread"]  # fixtures

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


# --- the offline buffer -----------------------------------------------------------


def sample(i: int) -> TelemetrySample:
    return protocol.sample(Metrics(float(i % 100), 40.0, 50.0, i, i),
                           ts=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i))  # fmt: skip


def test_the_durable_buffer_survives_a_restart_bounded_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "buf.sqlite3"
    b = DurableBuffer(path, capacity=5)
    for i in range(8):
        b.append(sample(i))
    assert (len(b), b.dropped) == (5, 3)  # the three oldest went
    handed = b.unsent()
    assert [s.net_rx_bytes for _, s in handed] == [3, 4, 5, 6, 7]
    b.sent(handed[1][0])
    assert [s.net_rx_bytes for _, s in b.unsent()] == [5, 6, 7]  # not handed twice
    b.acked(handed[1][0])  # the broker took 3 and 4
    b.close()
    # A new process (after a crash or a reboot): what was not acknowledged is still
    # there, handed or not, and so is the count of what was dropped.
    again = DurableBuffer(path, capacity=5)
    assert [s.net_rx_bytes for _, s in again.unsent()] == [5, 6, 7]
    assert again.dropped == 3
    again.close()


def test_samples_past_the_age_bound_are_dropped_and_counted(tmp_path: Path) -> None:
    for b in (DurableBuffer(tmp_path / "b.sqlite3", 100, max_age_s=0.2),
              TelemetryBuffer(100, max_age_s=0.2)):  # fmt: skip
        b.append(sample(1))
        wait(lambda b=b: (b.append(sample(2)), b.dropped)[1] >= 1, 5, "the old one to go")  # type: ignore[misc]
        assert [s.net_rx_bytes for _, s in b.unsent()][-1] == 2


def test_an_unwritable_state_dir_or_a_full_disk_degrade_to_memory_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    b = open_buffer(blocked / "state", 10)
    assert isinstance(b, TelemetryBuffer)
    assert [r.getMessage() for r in caplog.records].count(
        "cannot keep the offline telemetry buffer on disk; keeping it in memory"
    ) == 1
    caplog.clear()
    # A disk that fills up: SQLite's page limit makes it full here ("database or disk
    # is full"); sampling goes on in memory, one warning, nothing raised.
    fb = open_buffer(tmp_path / "state", 100_000)
    assert isinstance(fb, FallbackBuffer) and fb.durable
    inner = fb._inner
    assert isinstance(inner, DurableBuffer)
    inner._db.execute("PRAGMA max_page_count = 4")
    for i in range(2000):
        fb.append(sample(i))
    assert not fb.durable and len(fb) > 0
    warned = [r for r in caplog.records if "cannot write to disk" in r.getMessage()]
    assert len(warned) == 1


def test_an_agent_restarted_while_offline_sends_what_it_buffered_before_once(
    broker: Broker, bridge: BridgeProcess, database: str,
    agent_factory: Callable[..., AgentProcess], tmp_path: Path,
) -> None:  # fmt: skip
    pw = provision(broker, "durable")["durable"]
    proxy = Proxy(broker.port)
    state = tmp_path / "state"
    env = {"EUCORA_MQTT_URL": f"mqtt://durable:{pw}@127.0.0.1:{proxy.port}"}
    args = ("--telemetry-interval", "0.2", "--keepalive", "5", "--reconnect-max", "1",
            "--state-dir", str(state), "--buffer-size", "20")  # fmt: skip
    agent = agent_factory(broker, "durable", pw, *args, **env)
    stored = "SELECT count(*) FROM telemetry WHERE agent_id = 'durable'"
    wait(lambda: query(database, stored)[0][0] >= 2, 20, "live telemetry")
    proxy.cut()
    wait(lambda: "disconnected" in agent.log(), 10, "the agent to notice the outage")
    # Offline long enough to fill the 20-sample buffer and drop some.
    db_file = state / "telemetry.sqlite3"
    wait(lambda: _rows(db_file) == 20 and _dropped(db_file) >= 3, 20, "the buffer full on disk")
    before = query(database, stored)[0][0]
    agent.kill()  # SIGKILL while offline: nothing in memory survives
    proxy.start()
    again = agent_factory(broker, "durable", pw, *args, **env)
    # The 20 samples from before the kill arrive, each once (plus new live ones).
    wait(lambda: query(database, stored)[0][0] >= before + 20, 30, "the old samples stored")
    dups = "SELECT count(*) FROM (SELECT time FROM telemetry WHERE agent_id = 'durable'" \
           " GROUP BY time HAVING count(*) > 1) d"  # fmt: skip
    assert query(database, dups) == [(0,)]
    # The drops were reported in the first heartbeat after the reconnect (with what
    # was still buffered then), and `agents show` tells them.
    reported = "SELECT dropped_samples, buffered_samples FROM agents WHERE agent_id = 'durable'"

    def counts() -> tuple[int, int] | None:
        dropped, buffered = query(database, reported)[0]
        return None if dropped is None else (int(dropped), int(buffered))

    found = wait(counts, 20, "drops reported")
    assert found is not None
    dropped, buffered = found
    assert dropped >= 3 and buffered >= 20
    shown = CliRunner().invoke(agents_app, ["show", "durable", "--database-url", database])
    assert f"{dropped} dropped" in shown.stdout
    wait(lambda: _rows(db_file) == 0, 20, "the buffer emptied once acknowledged")
    assert again.stop() == 0
    proxy.close()


def _rows(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT count(*) FROM samples").fetchone()[0])


def _dropped(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(row[0]) if row else 0


# --- a link that goes half-open ---------------------------------------------------

KEEPALIVE = 5
INTERVAL = 1.0


def gaps(database: str, agent_id: str) -> tuple[int, float]:
    """(samples stored, the longest gap between consecutive samples, seconds)."""
    rows = query(
        database,
        "SELECT count(*), coalesce(max(gap), 0) FROM (SELECT extract(epoch FROM time - lag(time)"
        " OVER (ORDER BY time)) AS gap FROM telemetry WHERE agent_id = %s) g",
        (agent_id,),
    )
    return int(rows[0][0]), float(rows[0][1])


@pytest.mark.parametrize("outage", ["half-open", "connects-unanswered"])
def test_an_outage_on_a_dead_link_loses_no_sample_and_no_task(
    outage: str, broker: Broker, bridge: BridgeProcess, database: str,
    agent_factory: Callable[..., AgentProcess], tmp_path: Path,
) -> None:  # fmt: skip
    """half-open: the link stays up but carries nothing for 2.5 x keepalive (a laptop lid
    closed, a NAT mapping gone); connects-unanswered: the agent is cut off, then every
    connection attempt for 30 s is accepted and never answered."""
    agent_id = f"link-{outage}"
    pw = provision(broker, agent_id)[agent_id]
    proxy = Proxy(broker.port)
    agent = agent_factory(
        broker, agent_id, pw,
        "--telemetry-interval", str(INTERVAL), "--keepalive", str(KEEPALIVE),
        "--reconnect-max", "2", "--state-dir", str(tmp_path / "state"),
        "--allow-list", str(_allow(tmp_path)),
        EUCORA_MQTT_URL=f"mqtt://{agent_id}:{pw}@127.0.0.1:{proxy.port}",
    )  # fmt: skip
    wait(lambda: gaps(database, agent_id)[0] >= 3, 20, "live telemetry")
    before = (agent_status(database, agent_id) or ("", None, False))[1]
    proxy.black_hole()
    if outage == "connects-unanswered":
        # Make the agent notice, so what follows are fresh attempts that get no answer.
        wait(lambda: "disconnected" in agent.log(), 3 * KEEPALIVE, "the agent to notice")
        length = 30.0
    else:
        length = 2.5 * KEEPALIVE
    began = time.monotonic()
    # A task created during the outage.
    created = CliRunner().invoke(tasks_app, ["create", "--agent", agent_id, "--type",
                                             "HEALTHCHECK", "--json", "--database-url",
                                             database])  # fmt: skip
    assert created.exit_code == 0, created.output
    task_id = json.loads(created.stdout)[0]["task_id"]
    wait(lambda: time.monotonic() - began >= length, length + 1, "the outage to last")
    proxy.restore()

    # Online again, in a new session (a new epoch), within a few seconds.
    def back_online() -> bool:
        st = agent_status(database, agent_id)
        return st is not None and st[0] == "online" and (st[1] or 0) > (before or 0)

    wait(back_online, 20, "online again")
    wait(lambda: query(database, "SELECT status FROM tasks WHERE task_id = %s",
                       (task_id,))[0][0] == "COMPLETED", 30, "the task done")  # fmt: skip
    # Every sample measured during the outage arrives: no gap longer than 1.5 intervals
    # (duplicates are impossible: (agent, time) is the key). The buffered batch may
    # commit just after the task's report: wait for it, then check.
    reconnected = "SELECT count(*) FROM telemetry WHERE agent_id = %s AND time > now()"
    wait(lambda: query(database, reconnected + " - interval '2 s'", (agent_id,))[0][0] > 0,
         10, "live samples after the outage")  # fmt: skip
    count, longest = gaps(database, agent_id)
    assert longest <= 1.5 * INTERVAL, (count, longest)
    runs = query(database, "SELECT count(*) FROM task_events WHERE task_id = %s"
                           " AND status = 'COMPLETED' AND accepted", (task_id,))  # fmt: skip
    assert runs == [(1,)]
    assert agent.stop() == 0
    proxy.close()


def _allow(tmp_path: Path) -> Path:
    path = tmp_path / "allow.json"
    path.write_text(json.dumps({"commands": []}))
    return path


def test_the_agents_socket_lets_the_kernel_find_a_dead_link(
    broker: Broker, loop_thread: LoopThread
) -> None:
    pw = provision(broker, "probed")["probed"]
    s = loop_thread.session(broker, "probed", pw)  # keepalive 5 s
    wait(lambda: loop_thread.call(lambda: s.connected), 10, "connected")
    sock = loop_thread.call(lambda: s.client.socket())
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
    # Sent data unacknowledged for 1.5 x keepalive aborts the connection (Linux).
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7500
    loop_thread.call(s.stop)
