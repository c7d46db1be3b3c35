"""The bridge process as an operator runs it: start, readiness, SIGTERM, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg

from service import identity
from service.stack.broker import Broker
from service.stack.process import free_port, wait_for
from tests.fix_services import BridgeProcess


def run_bridge(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`eucora bridge run` to completion; returns exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "cli", "bridge", "run"],
        env=os.environ | {"EUCORA_METRICS_PORT": "0", "EUCORA_CONNECT_TIMEOUT": "2"} | env,
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_bridge_connects_and_stops_on_sigterm_within_5s(bridge: BridgeProcess) -> None:
    assert bridge.ready()
    assert "eucora_mqtt_connected 1.0" in bridge.metrics()
    started = time.monotonic()
    rc = bridge.stop(signal.SIGTERM, timeout=5)
    assert rc == 0
    assert time.monotonic() - started < 5
    log = bridge.log()
    assert '"msg":"bridge ready"' in log and '"msg":"bridge stopped"' in log


def test_bridge_logs_are_json_lines_without_secrets(
    bridge: BridgeProcess, broker: Broker, database: str
) -> None:
    import json

    bridge.stop()
    lines = [line for line in bridge.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        doc = json.loads(line)  # every line is one JSON object
        assert {"ts", "level", "msg"} <= doc.keys()
    secret = broker.passwords[identity.BRIDGE_USER]
    db_password = database.split(":")[2].split("@")[0]
    assert secret not in bridge.log()
    assert db_password not in bridge.log()


def test_wrong_database_url_is_one_line_error(broker: Broker) -> None:
    done = run_bridge({
        "EUCORA_MQTT_URL": broker.url(identity.BRIDGE_USER),
        "EUCORA_DATABASE_URL": f"postgresql://nobody:hunter2@127.0.0.1:{free_port()}/nothing",
    })  # fmt: skip
    assert done.returncode == 4  # unreachable (README.md, "Exit codes")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "cannot use database" in errors[0] and "still failing after" in errors[0]
    assert "hunter2" not in done.stderr + done.stdout


def test_malformed_urls_are_refused_before_connecting() -> None:
    done = run_bridge({"EUCORA_MQTT_URL": "http://x", "EUCORA_DATABASE_URL": "postgresql://x/y"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: EUCORA_MQTT_URL must start")
    done = run_bridge({"EUCORA_MQTT_URL": "mqtt://a:b@h:1", "EUCORA_DATABASE_URL": "mysql://x"})
    assert done.returncode == 2
    assert "EUCORA_DATABASE_URL must start with postgresql://" in done.stderr


def test_database_without_migrations_is_refused(broker: Broker, empty_database: str) -> None:
    done = run_bridge({
        "EUCORA_MQTT_URL": broker.url(identity.BRIDGE_USER),
        "EUCORA_DATABASE_URL": empty_database,
    })  # fmt: skip
    assert done.returncode == 2
    assert "run `eucora db upgrade`" in done.stderr


def test_wrong_broker_password_is_fatal_not_retried(broker: Broker, database: str) -> None:
    url = broker.url(identity.BRIDGE_USER).replace(broker.passwords[identity.BRIDGE_USER], "wrong")
    started = time.monotonic()
    done = run_bridge(
        {"EUCORA_MQTT_URL": url, "EUCORA_DATABASE_URL": database, "EUCORA_CONNECT_TIMEOUT": "30"}
    )
    assert done.returncode == 2
    assert "refused the connection" in done.stderr
    assert time.monotonic() - started < 20  # did not spend the 30 s retry budget


def test_bridge_waits_for_a_broker_that_starts_late(
    broker_factory: Any, bridge_factory: Any, database: str
) -> None:
    broker = broker_factory()
    broker.stop()
    bridge = bridge_factory(broker, database, start=False)
    bridge.start(wait_ready=False)
    # The bridge retries while the broker is down, then becomes ready once it is up.
    with psycopg.connect(database):
        pass
    assert not bridge.ready()
    broker.start()
    from service.stack.process import wait_for

    wait_for(bridge.ready, 30, "bridge ready after the broker came up")
    assert bridge.stop() == 0


def test_status_reports_database_broker_and_bridge(
    broker: Broker, database: str, bridge: BridgeProcess
) -> None:
    """`eucora status`: each part reachable or not, exit 0 only when all three are."""
    from typer.testing import CliRunner

    from cli.status import app as status_app

    env = {"EUCORA_DATABASE_URL": database, "EUCORA_MQTT_URL": broker.url(identity.OPERATOR_USER)}
    runner = CliRunner()

    def status(**extra: str) -> tuple[int, dict[str, Any]]:
        result = runner.invoke(status_app, ["--json"], env=env | extra)
        return result.exit_code, json.loads(result.stdout)

    wait_for(lambda: status()[0] == 0, 20, "a bridge heartbeat")
    code, doc = status()
    assert {k: doc[k]["reachable"] for k in ("database", "broker", "bridge")} == {
        "database": True, "broker": True, "bridge": True,
    }  # fmt: skip
    assert doc["bridge"]["instances"][0]["client_id"] == "eucora-bridge-test"
    assert doc["bridge"]["last_seen"] and doc["broker"]["accepted"] is True
    # A wrong password: reachable, refused, not ok; the password never printed.
    wrong = broker.url(identity.OPERATOR_USER).replace("@", "-wrong@", 1)
    code, doc = status(EUCORA_MQTT_URL=wrong)
    assert code == 1 and doc["broker"]["reachable"] and not doc["broker"]["accepted"]
    assert "-wrong" not in json.dumps(doc) and "not authorized" in doc["broker"]["error"].lower()
    # The bridge stopped: not reachable at once (its last heartbeat says so).
    assert bridge.stop() == 0
    code, doc = status()
    assert code == 1 and doc["bridge"]["reachable"] is False
    assert doc["database"]["reachable"] and doc["broker"]["reachable"]
    # The broker gone too: unreachable (README.md, "Exit codes").
    broker.kill()
    code, doc = status()
    assert code == 4 and doc["broker"]["reachable"] is False and doc["broker"]["error"]
