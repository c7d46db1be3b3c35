"""What the CLI prints is its Public models (service/db/models.py), on a real database.

Every reading command runs with --json against rows with every column set: the document
has exactly the Public model's fields (nested ones included), and none is null, so each
field comes from the query, never from a default. `model_row` is what makes a query
and its model agree: it refuses a result with a column missing, extra or twice.
"""

from __future__ import annotations

import types
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Union, get_args, get_origin

import orjson
import psycopg
import pytest
import typer
from psycopg.types.json import Jsonb
from sqlmodel import SQLModel
from typer.testing import CliRunner

from cli import tasks as tasks_cli
from cli.agents import app as agents_app
from cli.telemetry import app as telemetry_app
from schemas.constants import TELEMETRY_METRICS
from service.db import models
from service.db.models import CLI_MODELS, ColumnMismatch, model_row
from service.domains import security

NOW = datetime.now(UTC).replace(microsecond=0)
AGENT = "full-1"
TASK = uuid.uuid4()


@pytest.fixture
def full(database: str) -> str:
    """One agent and one task with every column set, and a row of each history."""
    old = NOW - timedelta(minutes=10)
    deployment = uuid.uuid4()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO agents (agent_id, hostname, platform, os_version, agent_version,"
            " hardware, ip_address, mac_address, tags, first_seen, registered_at, last_seen,"
            " status, status_epoch, status_changed_at, status_reason, session_present,"
            " last_heartbeat_at, last_telemetry_at, stale, registration_ts, inventory_ts,"
            " inventory_updated_at, labels, revoked_at, buffered_samples, dropped_samples)"
            " VALUES (%s, 'full.example', 'linux',"
            " '6.8', '1.2.3', %s, '10.0.0.1', 'aa:bb:cc:dd:ee:ff', %s, %s, %s, %s, 'online', 3,"
            " %s, 'agent', true, %s, %s, false, %s, %s, %s, %s, %s, 12, 3)",
            (AGENT, Jsonb({"cpu_count": 2}), Jsonb({"site": "paris"}), old, old, NOW, old,
             NOW, NOW, old, old, old, Jsonb({"owner": "ops"}), NOW),
        )  # fmt: skip
        conn.execute(
            "INSERT INTO agent_status_events (time, agent_id, state, epoch, source, reason,"
            " session_present) VALUES (%s, %s, 'online', 3, 'agent', 'connected', true)",
            (old, AGENT),
        )
        conn.execute(
            "INSERT INTO agent_changes (time, agent_id, field, old_value, new_value)"
            " VALUES (%s, %s, 'hostname', '\"old.example\"', '\"full.example\"')",
            (old, AGENT),
        )
        conn.execute("INSERT INTO inventory (agent_id, name, version) VALUES (%s, 'curl', '8.5')",
                     (AGENT,))  # fmt: skip
        security.security_event(conn, "provisioned", [(AGENT, {"broker_id": 1})])
        conn.execute(
            "INSERT INTO inventory_changes (time, agent_id, name, change, old_version,"
            " new_version) VALUES (%s, %s, 'curl', 'changed', '8.4', '8.5')",
            (old, AGENT),
        )
        for i in range(3):
            conn.execute(
                "INSERT INTO telemetry (time, agent_id, cpu_percent, memory_percent,"
                " disk_percent, net_rx_bytes, net_tx_bytes) VALUES (%s, %s, %s, 50, 60, %s, 7)",
                (old + timedelta(minutes=i), AGENT, 10.0 * i, 100 * i),
            )
        conn.execute(
            "INSERT INTO deployments (deployment_id, target) VALUES (%s, %s)",
            (deployment, Jsonb({"platform": "linux"})),
        )
        conn.execute(
            "INSERT INTO tasks (task_id, agent_id, type, payload, status, progress, result,"
            " error, timeout_seconds, expires_at, correlation_id, created_at, published_at,"
            " assigned_at, started_at, finished_at, attempts, next_publish_at, deployment_id,"
            " cancel_requested, created_by) VALUES (%s, %s, 'COLLECT', %s, 'FAILED', 40, %s,"
            " 'exit 1', 60, %s, 'corr-1', %s, %s, %s, %s, %s, 1, NULL, %s, false, 'operator')",
            (TASK, AGENT, Jsonb({"what": "logs"}), Jsonb({"exit": 1}), NOW, old, old, old,
             old, NOW, deployment),
        )  # fmt: skip
        conn.execute(
            "INSERT INTO task_events (time, task_id, agent_id, status, previous_status,"
            " source, correlation_id, progress, detail, accepted, reason) VALUES (%s, %s, %s,"
            " 'FAILED', 'IN_PROGRESS', 'agent', 'corr-1', 40, %s, false, 'duplicate')",
            (NOW, TASK, AGENT, Jsonb({"exit": 1})),
        )
    return database


def _nested(annotation: Any) -> type[SQLModel] | None:
    """The model inside `M`, `list[M]` or `M | None`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, SQLModel):
        return annotation
    if get_origin(annotation) in (list, Union, types.UnionType):
        inner = [m for a in get_args(annotation) if (m := _nested(a)) is not None]
        return inner[0] if inner else None
    return None


def assert_is(doc: Any, model: type[SQLModel], where: str) -> None:
    """`doc` (a JSON object) has exactly `model`'s fields, none null; nested alike."""
    assert isinstance(doc, dict), where
    assert set(doc) == set(model.model_fields), where
    for name, field in model.model_fields.items():
        value = doc[name]
        assert value is not None, f"{where}.{name} is null"
        inner = _nested(field.annotation)
        if inner is None:
            continue
        assert value != [], f"{where}.{name} is empty"
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            assert_is(item, inner, f"{where}.{name}[{i}]")


def run_json(app: Any, database: str, *args: str) -> Any:
    result = CliRunner().invoke(app, [*args, "--json", "--database-url", database])
    assert result.exit_code == 0, result.output or repr(result.exception)
    return orjson.loads(result.stdout)


@pytest.mark.parametrize(
    ("app", "args", "model", "many"),
    [
        (agents_app, ["list"], models.AgentPublic, True),
        (agents_app, ["show", AGENT], models.AgentDetailPublic, False),
        (tasks_cli.app, ["list"], models.TaskPublic, True),
        (tasks_cli.app, ["show", str(TASK)], models.TaskDetailPublic, False),
        (telemetry_app, ["show", AGENT], models.TelemetryPublic, True),
        (telemetry_app, ["show", AGENT, "--bucket", "1m"], models.TelemetryPublic, True),
    ],
    ids=["agents-list", "agents-show", "tasks-list", "tasks-show", "telemetry", "buckets"],
)
def test_json_output_is_the_public_model(
    full: str, app: Any, args: list[str], model: type[SQLModel], many: bool
) -> None:
    doc = run_json(app, full, *args)
    for i, item in enumerate(doc if many else [doc]):
        assert_is(item, model, f"{' '.join(args)}[{i}]")


def test_wait_rows_are_the_public_model(full: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`tasks create --wait --json`: the rows printed once the tasks finished."""
    with psycopg.connect(full) as conn, pytest.raises(typer.Exit) as failed:
        tasks_cli._wait(conn, [{"task_id": str(TASK)}], None, json_output=True)
    assert failed.value.exit_code == tasks_cli.EXIT_NOT_OK  # FAILED, not COMPLETED
    (row,) = orjson.loads(capsys.readouterr().out)
    assert_is(row, models.TaskProgressPublic, "wait")
    assert row["task_id"] == str(TASK) and row["error"] == "exit 1"


def test_timestamps_and_ids_print_as_before(full: str) -> None:
    """RFC 3339 in UTC with +00:00 (cli.common.iso), UUIDs as strings."""
    (agent,) = run_json(agents_app, full, "list")
    assert agent["last_seen"] == NOW.isoformat()
    task = run_json(tasks_cli.app, full, "show", str(TASK))
    assert task["task_id"] == str(TASK) and uuid.UUID(task["deployment_id"])
    assert task["expires_at"] == NOW.isoformat() and task["events"][0]["ts"] == NOW.isoformat()
    assert task["owed"] is False and agent["epoch"] == 3


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        ("SELECT 'a' AS field, now() AS time, 1 AS old_value", "lacks ['new_value']"),
        ("SELECT 'a' AS field, now() AS time, 1 AS old_value, 2 AS new_value, 3 AS x", "['x']"),
        (
            "SELECT 'a' AS field, now() AS time, 1 AS old_value, 2 AS new_value, 3 AS field",
            "['field']",
        ),
    ],
    ids=["missing", "extra", "twice"],
)
def test_model_row_refuses_a_query_unlike_the_model(database: str, sql: str, problem: str) -> None:
    with psycopg.connect(database) as conn:
        cur = conn.cursor(row_factory=model_row(models.AgentChangePublic))
        with pytest.raises(ColumnMismatch, match="AgentChangePublic") as refused:
            cur.execute(sql)
        assert problem in str(refused.value)
        cur.execute("SELECT 'a' AS field, %s AS time, 1 AS old_value, 2 AS new_value", (NOW,))
        assert cur.fetchone() == models.AgentChangePublic(
            field="a", time=NOW, old_value=1, new_value=2
        )


def test_telemetry_rows_are_the_contract_metrics() -> None:
    assert tuple(models.TelemetrySample.model_fields) == ("time", *TELEMETRY_METRICS)
    assert tuple(models.TelemetryPublic.model_fields) == ("time", *TELEMETRY_METRICS)


def test_public_fields_are_typed_as_their_columns() -> None:
    """A field redeclared in a Public or Row model has its table model's type."""
    for model, table in CLI_MODELS.items():
        if table is None:
            continue
        for name in set(model.model_fields) & set(table.model_fields):
            assert model.model_fields[name].annotation == table.model_fields[name].annotation, (
                f"{model.__name__}.{name}"
            )


def test_an_online_agent_without_a_heartbeat_is_not_healthy(database: str) -> None:
    """`healthy` is false, never null, before the first heartbeat or sample."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO agents (agent_id, status) VALUES ('new-1', 'online')")
    (listed,) = run_json(agents_app, database, "list")
    shown = run_json(agents_app, database, "show", "new-1")
    assert (listed["connected"], listed["healthy"]) == (True, False)
    assert (shown["connected"], shown["healthy"]) == (True, False)


# The time-series tables the CLI reads without a table model, and renamed columns.
SERIES: dict[type[SQLModel], tuple[str, dict[str, str]]] = {
    models.AgentStatusEventPublic: ("agent_status_events", {}),
    models.AgentChangePublic: ("agent_changes", {}),
    models.InventoryChangePublic: ("inventory_changes", {}),
    models.TelemetrySample: ("telemetry", {}),
    models.TaskEventPublic: ("task_events", {"ts": "time"}),
}


def test_time_series_fields_admit_null_where_their_columns_do(database: str) -> None:
    with psycopg.connect(database) as conn:
        for model, (table, renamed) in SERIES.items():
            nullable = dict(
                conn.execute(
                    "SELECT column_name, is_nullable = 'YES' FROM information_schema.columns"
                    " WHERE table_schema = 'public' AND table_name = %s",
                    (table,),
                ).fetchall()
            )
            for name, field in model.model_fields.items():
                column = renamed.get(name, name)
                assert column in nullable, f"{model.__name__}.{name}: no column {table}.{column}"
                admits_none = field.annotation is Any or type(None) in get_args(field.annotation)
                assert admits_none == nullable[column], f"{model.__name__}.{name}"
