"""`eucora agents list/show` and `eucora telemetry show`, on a real database.

Rows are written the way the bridge writes them (plain SQL into the same tables), with
controlled times, so bucket averages and health windows can be checked exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from cli.agents import app as agents_app
from cli.telemetry import app as telemetry_app
from cli.telemetry import sparkline


@pytest.fixture
def now() -> datetime:
    """The test's "now", taken when the test starts (not when the file is collected:
    a health window measured from an old time would fail a test that runs late)."""
    return datetime.now(UTC).replace(microsecond=0)


def run(app: Any, database: str, *args: str) -> Any:
    result = CliRunner().invoke(app, [*args, "--database-url", database])
    return result


def add_agent(conn: psycopg.Connection[Any], now: datetime, agent_id: str, **cols: Any) -> None:
    values = {
        "agent_id": agent_id, "hostname": f"{agent_id}.example", "platform": "linux",
        "tags": Jsonb({"site": "paris"}), "status": "online", "status_epoch": 7,
        "last_seen": now, "last_heartbeat_at": now, "last_telemetry_at": now,
        "agent_version": "1.2.3", "hardware": Jsonb({"cpu_count": 2, "memory_bytes": 1 << 30,
                                                      "disk_bytes": 10 << 30}),
    } | cols  # fmt: skip
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    conn.execute(f"INSERT INTO agents ({names}) VALUES ({marks})", list(values.values()))


@pytest.fixture
def fleet(database: str, now: datetime) -> str:
    old = now - timedelta(minutes=10)
    with psycopg.connect(database, autocommit=True) as conn:
        add_agent(conn, now, "a-healthy")
        add_agent(conn, now, "b-quiet", last_heartbeat_at=old, last_telemetry_at=old)
        add_agent(conn, now, "c-stale", stale=True, last_seen=old, tags=Jsonb({"site": "lon"}))
        add_agent(conn, now, "d-offline", status="offline", platform="windows")
        add_agent(conn, now, "e-unknown", status="unknown", status_epoch=None, platform="macos")
        for i in range(6):  # one sample a minute, 10 minutes ago .. 5 minutes ago
            conn.execute(
                "INSERT INTO telemetry (time, agent_id, cpu_percent, memory_percent,"
                " disk_percent, net_rx_bytes, net_tx_bytes) VALUES (%s, 'a-healthy', %s, 50, 60,"
                " %s, 10)",
                (old + timedelta(minutes=i), 10.0 * i, 100 * i),
            )
        conn.execute(
            "INSERT INTO agent_status_events (time, agent_id, state, epoch, source)"
            " VALUES (%s, 'a-healthy', 'online', 7, 'agent')",
            (old,),
        )
        conn.execute(
            "INSERT INTO inventory (agent_id, name, version) VALUES ('a-healthy', 'curl', '8.5')"
        )
    return database


def listed(database: str, *args: str) -> list[dict[str, Any]]:
    result = run(agents_app, database, "list", "--json", *args)
    assert result.exit_code == 0, result.output
    doc: list[dict[str, Any]] = orjson.loads(result.stdout)
    return doc


def test_list_shows_connected_and_healthy_apart(fleet: str, now: datetime) -> None:
    rows = {r["agent_id"]: (r["connected"], r["healthy"]) for r in listed(fleet)}
    assert rows == {
        "a-healthy": (True, True),
        "b-quiet": (True, False),  # connected, but no heartbeat/telemetry lately
        "c-stale": (False, False),  # status online, but silent for offline_after
        "d-offline": (False, False),
        "e-unknown": (False, False),
    }
    assert [r["agent_id"] for r in listed(fleet, "--online")] == ["a-healthy", "b-quiet"]
    assert [r["agent_id"] for r in listed(fleet, "--offline")] == [
        "c-stale", "d-offline", "e-unknown",
    ]  # fmt: skip
    assert [r["agent_id"] for r in listed(fleet, "--platform", "windows")] == ["d-offline"]
    assert [r["agent_id"] for r in listed(fleet, "--tag", "site=lon")] == ["c-stale"]
    # A wider window makes the quiet one healthy too.
    wide = {r["agent_id"]: r["healthy"] for r in listed(fleet, "--healthy-within", "3600")}
    assert wide["b-quiet"] is True
    one = listed(fleet, "--online")[0]
    assert one["last_seen"] == now.isoformat() and one["epoch"] == 7
    assert one["tags"] == {"site": "paris"} and one["hostname"] == "a-healthy.example"


def test_list_table_and_errors(fleet: str) -> None:
    result = run(agents_app, fleet, "list")
    assert result.exit_code == 0
    assert "CONNECTED" in result.stdout and "stale" in result.stdout
    assert "5 agents, 2 connected, 1 healthy" in result.stdout
    bad = run(agents_app, fleet, "list", "--tag", "nokey")
    assert bad.exit_code != 0 and "key=value" in bad.output


def test_show_one_agent(fleet: str) -> None:
    result = run(agents_app, fleet, "show", "a-healthy", "--json")
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.stdout)
    assert doc["hardware"]["cpu_count"] == 2
    assert doc["connected"] and doc["healthy"]
    assert [e["state"] for e in doc["status_history"]] == ["online"]
    assert doc["telemetry"]["cpu_percent"] == 50.0  # the latest sample
    assert doc["inventory"]["count"] == 1
    text = run(agents_app, fleet, "show", "a-healthy")
    assert "2 CPUs" in text.stdout and "status history" in text.stdout
    missing = run(agents_app, fleet, "show", "nobody")
    assert missing.exit_code == 1 and "not found" in missing.output


def test_telemetry_rows_per_sample_and_per_bucket(fleet: str) -> None:
    result = run(telemetry_app, fleet, "show", "a-healthy", "--since", "1h", "--json")
    assert result.exit_code == 0, result.output
    rows = orjson.loads(result.stdout)
    assert len(rows) == 6
    assert set(rows[0]) == {
        "time", "cpu_percent", "memory_percent", "disk_percent", "net_rx_bytes", "net_tx_bytes",
    }  # fmt: skip
    assert [r["cpu_percent"] for r in rows] == [0, 10, 20, 30, 40, 50]
    result = run(
        telemetry_app, fleet, "show", "a-healthy", "--since", "1h", "--bucket", "1h", "--json"
    )
    buckets = orjson.loads(result.stdout)
    # Averages per bucket: all samples fall in one or two hourly buckets.
    total = sum(b["cpu_percent"] for b in buckets)
    assert 1 <= len(buckets) <= 2 and (len(buckets) == 2 or total == 25.0)
    short = run(telemetry_app, fleet, "show", "a-healthy", "--since", "450s", "--json")
    assert len(orjson.loads(short.stdout)) == 3  # 7, 6 and 5 minutes ago (7.5 m window)
    chart = run(telemetry_app, fleet, "show", "a-healthy", "--since", "1h")
    assert chart.exit_code == 0 and "cpu %" in chart.stdout and "max 50.0" in chart.stdout
    bad = run(telemetry_app, fleet, "show", "a-healthy", "--since", "soon")
    assert bad.exit_code != 0 and "duration" in bad.output


def test_sparkline_scales_and_resamples() -> None:
    assert sparkline([0, 50, 100], 3, 100) == "▁▅█"
    assert sparkline([0, 0, 100, 100], 2, 100) == "▁█"
    assert sparkline([None, 100], 2, 100) == " █"
    assert sparkline([], 10, 100) == ""
