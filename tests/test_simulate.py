"""`eucora simulate` against a real broker, bridge and database, checked with
`eucora agents list --online --json`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from cli.agents import app as agents_app
from cli.tasks import app as tasks_app
from service import dynsec
from service.stack.broker import Broker
from tests.fix_services import BridgeProcess
from tests.test_agents_support import query, wait

SIMULATE = [sys.executable, "-c", "from cli.simulate import app; app()"]


def start_simulator(broker: Broker, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "EUCORA_MQTT_URL": broker.url(dynsec.OPERATOR_USER),
        "EUCORA_MQTT_ADMIN_URL": broker.url(dynsec.ADMIN_USER),
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
        broker, log, "--agents", str(agents), "--telemetry-interval", "5", "--connect-rate", "500"
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
        "agent_id", "hostname", "platform", "tags", "connected", "healthy", "last_seen", "epoch",
    }  # fmt: skip
    registered = query(database, "SELECT count(*) FROM agents WHERE hardware <> '{}'")[0][0]
    assert registered == 100


@pytest.mark.slow
def test_simulate_1000_agents(
    broker: Broker, bridge: BridgeProcess, database: str, tmp_path: Path
) -> None:
    took, listed = run_fleet(broker, database, tmp_path, 1000, 120)
    assert len(listed) == 1000
    print(f"1000 simulated agents online in {took:.1f} s")
