"""The provisioned Grafana dashboards: every SQL query runs on our schema as Grafana's
read-only role (plain PostgreSQL here; tests/test_timescale_ddl.py covers the
TimescaleDB functions they call), that role cannot write, every panel has a unit, and
every Prometheus expression names a metric a running bridge exports."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

GRAFANA = Path(__file__).parents[1] / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


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
            for target in panel.get("targets", []):
                if "rawSql" in target:
                    found.append((f"{path.name}: {panel['title']}", target["rawSql"]))
        for var in doc.get("templating", {}).get("list", []):
            found.append((f"{path.name}: variable {var['name']}", var["query"]))
    return found


def test_there_are_dashboards() -> None:
    assert DASHBOARDS and len(queries()) >= 5


def panels() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}: {panel['title']}", panel)
        for path in DASHBOARDS
        for panel in json.loads(path.read_text())["panels"]
    ]


def prometheus_expressions() -> list[tuple[str, str]]:
    return [
        (where, target["expr"])
        for where, panel in panels()
        for target in panel.get("targets", [])
        if "expr" in target
    ]


@pytest.fixture
def grafana_url(database: str) -> str:
    """`database` as Grafana connects to it: the read-only role, with a login now."""
    from service.db import grafana

    password = uuid.uuid4().hex
    with psycopg.connect(database, autocommit=True) as conn:
        assert grafana.grant_login(conn, password)
    return urlunsplit(
        urlsplit(database)._replace(
            netloc=f"{grafana.ROLE}:{password}@{urlsplit(database).netloc.rsplit('@', 1)[-1]}"
        )
    )


def test_every_panel_has_a_unit() -> None:
    for where, panel in panels():
        if panel["type"] != "row":
            assert panel["fieldConfig"]["defaults"].get("unit"), where


def test_grafana_reads_the_database_as_the_read_only_role() -> None:
    text = (GRAFANA / "provisioning" / "datasources" / "eucora.yaml").read_text()
    assert "user: eucora_grafana" in text and "${EUCORA_GRAFANA_DB_PASSWORD}" in text
    assert "type: prometheus" in text


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO tasks (agent_id, type) VALUES ('agent-1', 'COLLECT')",
        "UPDATE deployments SET status = 'ABORTED'",
        "DELETE FROM telemetry",
        "INSERT INTO dead_letters (topic, reason, detail, payload, payload_size)"
        " VALUES ('t', 'schema', 'd', '', 0)",
        "CREATE TABLE grafana_was_here (x int)",
        "CREATE VIEW grafana_view AS SELECT 1",
        "SELECT password_hash FROM agents",  # the hashes are not the dashboards' business
        "SELECT * FROM security_events",
    ],
)
def test_grafana_role_cannot_write(grafana_url: str, statement: str) -> None:
    with psycopg.connect(grafana_url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)  # type: ignore[arg-type]


@pytest.mark.parametrize(("where", "sql"), queries(), ids=[w for w, _ in queries()])
def test_dashboard_query_runs(database: str, grafana_url: str, where: str, sql: str) -> None:
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
    with psycopg.connect(grafana_url) as conn:  # what Grafana can read, it reads as itself
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


def exported_names(text: str) -> set[str]:
    """Metric names in a /metrics page: every sample's, and for a counter with no
    sample yet (a labelled one nobody incremented) the `_total` name it will have."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names |= {name, f"{name}_total"} if kind == "counter" else {name}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_prometheus_expressions_name_metrics_the_bridge_exports(bridge: Any) -> None:
    exprs = prometheus_expressions()
    assert len(exprs) >= 5
    exported = exported_names(bridge.metrics())
    for where, expr in exprs:
        named = set(re.findall(r"\beucora_[a-z0-9_]+", expr))
        assert named and named <= exported, (where, named - exported)
