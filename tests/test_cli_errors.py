"""What an operator sees when something is wrong: the documented exit code (README.md,
"Exit codes"), one `error: ...` line on stderr, never a traceback.

Every command runs as a real process (`python -m cli ...`) against a real database: a
new one that was never migrated, and an address where no server listens.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from service.stack.process import free_port, wait_for

OK, NOT_OK, USAGE, WAIT_TIMEOUT, UNREACHABLE = 0, 1, 2, 3, 4
ANY_ID = "0b5e2c1e-8a43-4f0e-9d0c-5d2f6b1a7c11"  # no such task or deployment

# Every command that reads or writes the database.
DATABASE_COMMANDS = [
    ["agents", "list"],
    ["agents", "show", "web-01"],
    ["agents", "label", "web-01", "owner=ops"],
    ["agents", "provision", "web-02"],
    ["agents", "revoke", "web-01"],
    ["agents", "delete", "web-01"],
    ["tasks", "list"],
    ["tasks", "show", ANY_ID],
    ["tasks", "create", "--agent", "web-01", "--type", "HEALTHCHECK"],
    ["tasks", "cancel", ANY_ID],
    ["telemetry", "show", "web-01"],
    ["deployments", "list"],
    ["deployments", "show", ANY_ID],
    ["deployments", "create", "--agent", "web-01", "--payload", '{"command": ["true"]}'],
    ["deployments", "abort", ANY_ID],
    ["deployments", "rollback", ANY_ID],
]


def eucora(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EUCORA_")}
    # provision/revoke check the broker's account folder first: one that exists.
    clean["EUCORA_AUTH_DIR"] = tempfile.gettempdir()
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def is_log_line(line: str) -> bool:
    """A JSON log line of a long-running process (the bridge, the agent)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def error_line(result: subprocess.CompletedProcess[str], code: int, *, logs: bool = False) -> str:
    """Assert the exit code, no traceback, and exactly one line on stderr besides a
    service's JSON log lines (`logs`); return that line."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = result.stderr.splitlines()
    if logs:
        lines = [line for line in lines if not is_log_line(line)]
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, output
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.fixture
def unreachable_database() -> str:
    """A database address where no server listens."""
    return f"postgresql://eucora:secret@127.0.0.1:{free_port()}/eucora"


@pytest.mark.parametrize("command", DATABASE_COMMANDS, ids=" ".join)
def test_unmigrated_database(command: list[str], empty_database: str) -> None:
    line = error_line(eucora(*command, EUCORA_DATABASE_URL=empty_database), USAGE)
    assert "database schema is at version 0, this eucora needs" in line
    assert "run `eucora db upgrade`" in line


@pytest.mark.parametrize(
    "command", [*DATABASE_COMMANDS, ["status"], ["db", "upgrade"]], ids=" ".join
)
def test_unreachable_database(command: list[str], unreachable_database: str) -> None:
    result = eucora(*command, EUCORA_DATABASE_URL=unreachable_database)
    line = error_line(result, UNREACHABLE)
    assert "secret" not in result.stdout + result.stderr
    assert "cannot" in line and "database" in line


def test_bridge_unreachable_database(broker, unreachable_database: str) -> None:  # type: ignore[no-untyped-def]
    from service import identity

    result = eucora(
        "bridge", "run", "--metrics-port", "0",
        EUCORA_MQTT_URL=broker.url(identity.BRIDGE_USER),
        EUCORA_DATABASE_URL=unreachable_database,
        EUCORA_CONNECT_TIMEOUT="1",
    )  # fmt: skip
    line = error_line(result, UNREACHABLE, logs=True)
    assert "still failing" in line


def test_bridge_unmigrated_database(broker, empty_database: str) -> None:  # type: ignore[no-untyped-def]
    from service import identity

    result = eucora(
        "bridge", "run", "--metrics-port", "0",
        EUCORA_MQTT_URL=broker.url(identity.BRIDGE_USER), EUCORA_DATABASE_URL=empty_database,
    )  # fmt: skip
    assert "run `eucora db upgrade`" in error_line(result, USAGE, logs=True)


def test_bridge_log_level(unreachable_database: str) -> None:
    result = eucora(
        "bridge", "run", "--log-level", "LOUD",
        EUCORA_MQTT_URL="mqtt://bridge:pw@127.0.0.1:1883", EUCORA_DATABASE_URL=unreachable_database,
    )  # fmt: skip
    assert "LOUD" in error_line(result, USAGE)


def test_bridge_metrics_port_in_use(unreachable_database: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = eucora(
            "bridge", "run", "--metrics-port", str(port),
            EUCORA_MQTT_URL="mqtt://bridge:pw@127.0.0.1:1883",
            EUCORA_DATABASE_URL=unreachable_database,
        )  # fmt: skip
    line = error_line(result, USAGE, logs=True)
    assert f"127.0.0.1:{port}" in line and "--metrics-port" in line


def provisioned(tmp_path: Path, **fields: object) -> Path:
    """A config file as `eucora agents provision web-01 --json` prints it."""
    doc = {
        "agent_id": "web-01",
        "mqtt_url": "mqtts://127.0.0.1:8883",
        "username": "web-01",
        "password": "secret",
        "ca_file": None,
    } | fields
    path = tmp_path / "web-01.json"
    path.write_text(json.dumps(doc))
    return path


def test_agent_ca_file_missing(tmp_path: Path) -> None:
    """The config file copied to another host without the CA certificate."""
    missing = "/etc/eucora/ca.pem-not-copied"
    config = provisioned(tmp_path, ca_file=missing)
    result = eucora("agent", "run", "--config", str(config))
    line = error_line(result, USAGE)
    assert missing in line and str(config) in line and "copy" in line
    assert "secret" not in result.stderr


def test_agent_log_level(tmp_path: Path) -> None:
    result = eucora("agent", "run", "--config", str(provisioned(tmp_path)), "--log-level", "LOUD")
    assert "LOUD" in error_line(result, USAGE)


def test_agent_state_dir_not_writable(tmp_path: Path) -> None:
    # A regular file where the folder should be: refused even for root.
    (tmp_path / "state").write_text("")
    result = eucora(
        "agent", "run", "--config", str(provisioned(tmp_path)),
        "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    line = error_line(result, USAGE)
    assert str(tmp_path / "state") in line and "--state-dir" in line


def test_database_lost_in_the_middle_of_a_command(database: str) -> None:
    """`tasks create --wait` follows its task when the database ends its connection."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO agents (agent_id, status) VALUES ('web-01', 'online')")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EUCORA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "tasks", "create", "--agent", "web-01",
         "--type", "HEALTHCHECK", "--wait", "--wait-timeout", "60"],
        env=clean | {"EUCORA_DATABASE_URL": database},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the progress line: it is waiting now
    assert first.startswith("0/1 finished"), first
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'eucora'"
            " AND pid <> pg_backend_pid()"
        )
    out, err = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = error_line(result, UNREACHABLE)
    assert "lost the database" in line


@pytest.mark.parametrize(
    "command",
    [["provision", "web-02"], ["revoke", "web-01"], ["delete", "web-01"]],
    ids=" ".join,
)
def test_account_command_loses_the_database(command: list[str], database: str) -> None:
    """The connection ends while the command waits for the provisioning lock (another
    provisioner holds it): exit 4, one line, and the registry as it was."""
    from service.domains import accounts

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO agents (agent_id, password_hash) VALUES ('web-01', '$7$101$x$y')")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EUCORA_")}
    with psycopg.connect(database) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (accounts.LOCK_KEY,))
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "agents", *command],
            env=clean | {"EUCORA_DATABASE_URL": database, "EUCORA_AUTH_DIR": tempfile.gettempdir()},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        with psycopg.connect(database, autocommit=True) as admin:
            waiting = (
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'eucora' AND wait_event_type = 'Lock'"
            )
            wait_for(lambda: admin.execute(waiting).fetchone() is not None, 30, "the lock wait")
            admin.execute(f"SELECT pg_terminate_backend(pid) FROM ({waiting}) w")
            out, err = proc.communicate(timeout=60)
        holder.rollback()
    line = error_line(
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err), UNREACHABLE
    )
    assert "lost the database" in line
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT agent_id, password_hash IS NOT NULL FROM agents").fetchall()
    assert rows == [("web-01", True)]
