"""Bridge processes side by side: one per client id, restarts never blocked, and the
address /metrics listens on (docs/ingest.md)."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request

import psycopg
import pytest

from service.stack.process import wait_for
from tests.fix_services import BridgeProcess

CLIENT_ID = "eucora-bridge-twin"


def heartbeat_of(database: str, client_id: str) -> tuple[str, int] | None:
    with psycopg.connect(database) as conn:
        row = conn.execute(
            "SELECT hostname, pid FROM bridges WHERE client_id = %s", (client_id,)
        ).fetchone()
    return (row[0], row[1]) if row else None


def wait_heartbeat(bridge: BridgeProcess, database: str) -> None:
    assert bridge.proc is not None
    wait_for(
        lambda: heartbeat_of(database, CLIENT_ID) == (socket.gethostname(), bridge.proc.pid),  # type: ignore[union-attr]
        30,
        "the bridge's heartbeat",
    )


def own_address() -> str:
    """This machine's first non-loopback IPv4 address (`hostname -I`)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        out = ""
    for addr in out.split():
        if "." in addr and not addr.startswith("127."):
            return addr
    pytest.skip("this machine has no non-loopback IPv4 address (`hostname -I`)")


def http_status(host: str, port: int, path: str = "/healthz") -> int:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=3) as resp:
        return int(resp.status)


def test_second_bridge_with_the_same_client_id_refuses_to_start(
    bridge_factory, broker, database: str
) -> None:  # type: ignore[no-untyped-def]
    first = bridge_factory(broker, database, client_id=CLIENT_ID)
    wait_heartbeat(first, database)

    second = bridge_factory(broker, database, client_id=CLIENT_ID, start=False)
    second.start(wait_ready=False)
    assert second.proc is not None
    rc = second.proc.wait(60)

    lines = [line for line in second.log().splitlines() if not line.startswith("{")]
    assert rc == 2, second.log()
    assert "Traceback" not in second.log()
    assert lines == [
        f"error: a bridge with client id {CLIENT_ID} is already running on"
        f" {socket.gethostname()} pid {first.proc.pid} (last seen {lines[0].split('last seen ')[1]}"
    ]
    assert lines[0].endswith("give this one another EUCORA_BRIDGE_CLIENT_ID")
    # The first one was never disturbed: still connected, its session its own.
    assert first.running and first.ready()
    events = [json.loads(line)["msg"] for line in first.log().splitlines() if line[:1] == "{"]
    assert "disconnected from broker" not in events


def test_restart_after_kill_9_is_not_blocked(bridge_factory, broker, database: str) -> None:  # type: ignore[no-untyped-def]
    first = bridge_factory(broker, database, client_id=CLIENT_ID)
    wait_heartbeat(first, database)
    first.kill()  # its heartbeat row is still fresh
    again = bridge_factory(broker, database, client_id=CLIENT_ID)  # waits until ready
    wait_heartbeat(again, database)


def test_fresh_heartbeat_of_a_dead_bridge_elsewhere_is_not_blocking(
    bridge_factory, broker, database: str
) -> None:  # type: ignore[no-untyped-def]
    """A bridge killed on another host (or in a container that was replaced): its row
    is fresh, but it does not move, so the new bridge starts."""
    with psycopg.connect(database) as conn:
        conn.execute(
            "INSERT INTO bridges (client_id, hostname, pid, version, started_at, last_seen, ready)"
            " VALUES (%s, 'elsewhere', 1, 'x', now(), now(), true)",
            (CLIENT_ID,),
        )
    bridge = bridge_factory(broker, database, client_id=CLIENT_ID)
    wait_heartbeat(bridge, database)


def test_metrics_bind(bridge_factory, broker, database: str) -> None:  # type: ignore[no-untyped-def]
    address = own_address()
    default = bridge_factory(broker, database, client_id="bridge-loopback")
    with pytest.raises(OSError):
        http_status(address, default.metrics_port)

    everywhere = bridge_factory(
        broker,
        database,
        client_id="bridge-everywhere",
        EUCORA_METRICS_BIND="0.0.0.0",  # noqa: S104 (the point)
    )
    assert http_status(address, everywhere.metrics_port) == 200
    assert http_status(address, everywhere.metrics_port, "/readyz") == 200
