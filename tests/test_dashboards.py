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


# One agent of each kind the definitions tell apart, times set with the database's clock.
FLEET = """
INSERT INTO agents (agent_id, status, stale, last_seen, last_heartbeat_at, last_telemetry_at,
                    revoked_at) VALUES
    ('healthy-1',   'online',  false, now(), now(), now(), NULL),
    ('healthy-2',   'online',  false, now(), now(), now() - interval '100 seconds', NULL),
    ('quiet',       'online',  false, now(), now(), now() - interval '250 seconds', NULL),
    ('no-samples',  'online',  false, now(), now(), NULL, NULL),
    ('stale-1',     'online',  true,  now() - interval '10 minutes', now() - interval '10 minutes',
                    now() - interval '10 minutes', NULL),
    ('stale-2',     'online',  true,  now() - interval '1 hour', NULL, NULL, NULL),
    ('offline',     'offline', true,  now(), now(), now(), NULL),
    ('never',       'unknown', false, NULL, NULL, NULL, NULL),
    ('revoked',     'online',  false, now(), now(), now(), now())
"""


def test_cli_and_dashboards_count_the_same_agents(database: str) -> None:
    """The panels that count connected, stale and healthy agents say what `eucora agents
    list` says, on a fleet with every state: both read migration 0008's definitions."""
    import orjson
    from typer.testing import CliRunner

    from cli.agents import app as agents_app

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(FLEET)
        panels: dict[str, int] = {}
        for where, sql in queries():
            if "FROM agents" in sql or "FROM agent_health" in sql:
                cur = conn.execute(expand_macros(sql))  # type: ignore[arg-type]
                row = cur.fetchone()
                assert row is not None and cur.description is not None, where
                panels |= {c.name: int(v) for c, v in zip(cur.description, row, strict=True)
                           if isinstance(v, int)}  # fmt: skip
    result = CliRunner().invoke(agents_app, ["list", "--json", "--database-url", database])
    assert result.exit_code == 0, result.output
    listed = orjson.loads(result.stdout)
    cli = {
        "connected": sum(r["connected"] for r in listed),
        "stale": sum(r["stale"] for r in listed),
        "healthy": sum(r["healthy"] for r in listed),
        "total": len(listed),
    }
    assert panels == cli
    assert cli == {"connected": 4, "stale": 2, "healthy": 2, "total": 9}
