"""Every query of the provisioned Grafana dashboards runs on our schema (plain PostgreSQL
here; tests/test_timescale_ddl.py covers the TimescaleDB functions they call)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

DASHBOARDS = sorted((Path(__file__).parents[1] / "grafana" / "dashboards").glob("*.json"))


def expand_macros(sql: str) -> str:
    """What Grafana's PostgreSQL data source does with the macros we use."""
    sql = re.sub(
        r"\$__timeFilter\(([\w.]+)\)", r"\1 BETWEEN now() - interval '6 hours' AND now()", sql
    )
    return sql.replace("$__interval", "1 minute").replace("$agent", "agent-1")


def queries() -> list[tuple[str, str]]:
    found = []
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        for panel in doc["panels"]:
            for target in panel["targets"]:
                found.append((f"{path.name}: {panel['title']}", target["rawSql"]))
        for var in doc.get("templating", {}).get("list", []):
            found.append((f"{path.name}: variable {var['name']}", var["query"]))
    return found


def test_there_are_dashboards() -> None:
    assert DASHBOARDS and len(queries()) >= 5


@pytest.mark.parametrize(("where", "sql"), queries(), ids=[w for w, _ in queries()])
def test_dashboard_query_runs(database: str, where: str, sql: str) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO agents (agent_id, status) VALUES ('agent-1', 'online')")
        conn.execute(
            "INSERT INTO telemetry (time, agent_id, cpu_percent, memory_percent, disk_percent,"
            " net_rx_bytes, net_tx_bytes) VALUES (%s, 'agent-1', 50, 40, 30, 10, 20)",
            (now - timedelta(minutes=5),),
        )
        conn.execute(
            "INSERT INTO deployments (deployment_id, target, status, targets) VALUES"
            " ('00000000-0000-0000-0000-000000000001', '{}', 'RUNNING', 1)"
        )
        conn.execute(
            "INSERT INTO deployment_status (deployment_id, agent_id, status, started_at)"
            " VALUES ('00000000-0000-0000-0000-000000000001', 'agent-1', 'IN_PROGRESS', now())"
        )
        conn.execute(
            "INSERT INTO deployment_status_events (time, deployment_id, agent_id, status)"
            " VALUES (now(), '00000000-0000-0000-0000-000000000001', 'agent-1', 'IN_PROGRESS')"
        )
        rows = conn.execute(expand_macros(sql)).fetchall()  # type: ignore[arg-type]
    assert isinstance(rows, list), where
    if "deployment" in sql:  # the fixture's deployment shows
        assert rows, where
