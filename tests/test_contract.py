"""Every contract constant is defined once, in schemas/, and everything else agrees.

The database's CHECK constraints and defaults are compared with schemas.states and
schemas.constants on a migrated database; the source is searched for copies of the
constants' literals.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, get_args

import psycopg
import pytest

from schemas.constants import (
    DEPLOYMENT_ABORT_MIN_FINISHED,
    OUTBOX_CHANNEL,
    TASK_DEFAULT_EXPIRES_IN_S,
    TASK_DEFAULT_TIMEOUT_S,
    TELEMETRY_METRICS,
    WILL_REASON,
)
from schemas.payloads import TelemetrySample
from schemas.states import (
    AgentRecordState,
    DeadLetterReason,
    DeploymentAgentStatus,
    DeploymentState,
    EventSource,
    InventoryChange,
    Platform,
    StatusEventState,
    TaskStatus,
    TaskType,
)
from schemas.validate import Reason
from service.db import models
from service.domains import telemetry

ROOT = Path(__file__).resolve().parent.parent

# (table, CHECK constraint) -> the enum whose values it must allow, exactly.
CHECKS: dict[tuple[str, str], type[StrEnum]] = {
    ("agents", "agents_platform_valid"): Platform,
    ("agents", "agents_status_valid"): AgentRecordState,
    ("agent_status_events", "agent_status_events_state_valid"): StatusEventState,
    ("inventory_changes", "inventory_changes_change_valid"): InventoryChange,
    ("deployments", "deployments_status_valid"): DeploymentState,
    ("deployment_status", "deployment_status_status_valid"): DeploymentAgentStatus,
    ("deployment_status_events", "deployment_status_events_status_valid"): DeploymentAgentStatus,
    ("tasks", "tasks_type_valid"): TaskType,
    ("tasks", "tasks_status_valid"): TaskStatus,
    ("task_events", "task_events_source_valid"): EventSource,
    ("deployment_status_events", "deployment_status_events_source_valid"): EventSource,
}


def check_values(conn: psycopg.Connection[Any], table: str, name: str) -> set[str]:
    row = conn.execute(
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c"
        " WHERE c.conrelid = %s::regclass AND c.conname = %s",
        (table, name),
    ).fetchone()
    assert row is not None, f"no constraint {name} on {table}"
    return set(re.findall(r"'([^']*)'::text", row[0]))


@pytest.mark.parametrize(("table", "name"), list(CHECKS))
def test_state_checks_allow_exactly_the_contract_values(
    database: str, table: str, name: str
) -> None:
    with psycopg.connect(database) as conn:
        assert check_values(conn, table, name) == {e.value for e in CHECKS[table, name]}


def column_default(conn: psycopg.Connection[Any], table: str, column: str) -> str | None:
    row = conn.execute(
        "SELECT column_default FROM information_schema.columns"
        " WHERE table_name = %s AND column_name = %s",
        (table, column),
    ).fetchone()
    assert row is not None
    return None if row[0] is None else str(row[0])


def test_defaults_are_the_contract_defaults(database: str) -> None:
    with psycopg.connect(database) as conn:
        assert column_default(conn, "tasks", "timeout_seconds") == str(TASK_DEFAULT_TIMEOUT_S)
        assert column_default(conn, "tasks", "status") == f"'{TaskStatus.PENDING}'::text"
        assert column_default(conn, "agents", "status") == f"'{AgentRecordState.UNKNOWN}'::text"
        assert column_default(conn, "deployments", "status") == f"'{DeploymentState.PENDING}'::text"
        assert column_default(conn, "deployments", "abort_min_finished") == str(
            DEPLOYMENT_ABORT_MIN_FINISHED
        )
        assert column_default(conn, "deployments", "expires_in_s") == str(TASK_DEFAULT_EXPIRES_IN_S)
    assert models.Task().timeout_seconds == TASK_DEFAULT_TIMEOUT_S
    assert models.Task().status == TaskStatus.PENDING
    assert models.Agent(agent_id="a").status == AgentRecordState.UNKNOWN


def test_telemetry_fields_are_one_list(database: str) -> None:
    fields = set(TelemetrySample.model_fields) - {"ts", "correlation_id", "agent_id"}
    assert fields == set(TELEMETRY_METRICS)
    with psycopg.connect(database) as conn:
        columns = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = 'telemetry' ORDER BY ordinal_position"
            )
        ]
    assert set(columns) - set(telemetry.COLUMNS) == {"received_at"}  # set by the database


def test_dead_letter_reasons_include_the_validator_s() -> None:
    assert set(get_args(Reason)) <= {r.value for r in DeadLetterReason}


# Literals of the contract that must not be spelled outside schemas/ (its examples
# there may show them).
SINGLE: dict[str, str] = {
    "session expiry": r"7 \* 24 \* 3600",
    "will reason": re.escape(f'"{WILL_REASON}"'),
    "outbox channel": re.escape(f'"{OUTBOX_CHANNEL}"'),
    "default expiry": r"7 \* 86400|interval '7 days'",
    "task states": r"\('PENDING', 'ASSIGNED'",
    "deployment states": r"\"ROLLING_BACK\"|'ROLLING_BACK'",
}


@pytest.mark.parametrize("what", list(SINGLE))
def test_contract_literals_are_spelled_once(what: str) -> None:
    pattern = re.compile(SINGLE[what])
    places = [
        str(path.relative_to(ROOT))
        for pkg in ("service", "cli", "agent")
        for path in (ROOT / pkg).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert places == []


def test_task_events_are_written_in_one_place() -> None:
    places = [
        str(path.relative_to(ROOT))
        for pkg in ("schemas", "service", "cli", "agent")
        for path in (ROOT / pkg).rglob("*.py")
        if "INSERT INTO task_events" in path.read_text()
    ]
    assert sorted(places) == ["service/domains/tasks.py"]
