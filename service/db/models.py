"""SQLModel models: the relational tables, and the rows the CLI reads and prints.

Table models mirror the migrations and do not create anything: the schema is owned by
the SQL migrations (`eucora db upgrade`), never by `metadata.create_all()`.
tests/test_migrations.py compares every table model with the migrated database, and
tests/test_contract.py every state column's CHECK and default with schemas/, so none
of them can drift. Time-series tables (telemetry, *_events, dead_letters) have no table
model: they are written with COPY / plain SQL and read with time_bucket queries.

What the CLI prints follows SQLModel's "multiple models" pattern: a Base holds the
columns a table shares with what is shown of it, the table model adds the rest, and a
Public model is one `--json` document (or one element of a list), field for field.
Where a query delivers more than is printed (a column only the text table needs, a
part nested from another query), a Row model is read and the Public model taken from
it (`Public.model_validate(row)`). Rows are read with `model_row(Model)`, psycopg's
`class_row` made strict: the query's columns must be exactly the model's fields, so a
field no query delivers fails at once instead of printing its default. Timestamps
print as RFC 3339 in UTC (`+00:00`), UUIDs as strings.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from psycopg.rows import BaseRowFactory, RowMaker, no_result
from pydantic import PlainSerializer, field_validator
from sqlalchemy import BigInteger, DateTime, Double, Integer, SmallInteger, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from schemas.constants import (
    DEPLOYMENT_ABORT_MIN_FINISHED,
    TASK_DEFAULT_EXPIRES_IN_S,
    TASK_DEFAULT_TIMEOUT_S,
)
from schemas.states import AgentRecordState, DeploymentState, TaskStatus

if TYPE_CHECKING:
    from psycopg._cursor_base import BaseCursor

_TS = DateTime(timezone=True)

M = TypeVar("M", bound=SQLModel)


def _now() -> datetime:
    return datetime.now(UTC)


def rfc3339(value: datetime) -> str:
    """A timestamp as JSON output shows it: RFC 3339 in UTC (as cli.common.iso)."""
    return value.astimezone(UTC).isoformat()


UtcTime = Annotated[datetime, PlainSerializer(rfc3339, return_type=str, when_used="json")]
"""A timestamptz column; `model_dump(mode="json")` gives `2025-01-02T03:04:05.123+00:00`."""


class ColumnMismatch(TypeError):
    """A query's columns are not exactly a model's fields (a bug in the query or model)."""


def model_row(model: type[M]) -> BaseRowFactory[M]:
    """psycopg's `class_row`, strict: every column of the query is a field of `model` and
    every field a column (a model's default never stands in for a column the query
    forgot; nothing is selected for nothing). Checked once per result, then each row
    is validated into `model`."""
    fields = set(model.model_fields)

    def factory(cursor: BaseCursor[Any, Any]) -> RowMaker[M]:
        if cursor.description is None:
            return no_result
        names = [c.name for c in cursor.description]
        if len(set(names)) != len(names) or set(names) != fields:
            missing = sorted(fields - set(names))
            extra = sorted({n for n in names if n not in fields or names.count(n) > 1})
            raise ColumnMismatch(
                f"{model.__name__}: the query lacks {missing or 'nothing'},"
                f" delivers {extra or 'nothing'} besides (or twice)"
            )
        validate = model.model_validate

        def make(values: Sequence[Any]) -> M:
            return validate(dict(zip(names, values, strict=True)))

        return make

    return factory


# -- agents ----------------------------------------------------------------------------


class AgentBase(SQLModel):
    """The columns of an agent that every listing shows (`agents list` and `show`)."""

    agent_id: str = Field(primary_key=True, sa_type=Text)
    hostname: str | None = Field(default=None, sa_type=Text)
    platform: str | None = Field(default=None, sa_type=Text)
    tags: dict[str, str] = Field(default_factory=dict, sa_type=JSONB)
    # 0008: operator labels (`agents label`), kept apart from the agent's own tags.
    labels: dict[str, str] = Field(default_factory=dict, sa_type=JSONB)
    agent_version: str | None = Field(default=None, sa_type=Text)
    last_seen: UtcTime | None = Field(default=None, sa_type=_TS)


class AgentDetailBase(AgentBase):
    """The further columns `agents show` prints."""

    os_version: str | None = Field(default=None, sa_type=Text)
    hardware: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    ip_address: str | None = Field(default=None, sa_type=Text)
    mac_address: str | None = Field(default=None, sa_type=Text)
    first_seen: UtcTime = Field(default_factory=_now, sa_type=_TS)
    registered_at: UtcTime | None = Field(default=None, sa_type=_TS)
    status: str = Field(default=AgentRecordState.UNKNOWN.value, sa_type=Text)
    status_changed_at: UtcTime | None = Field(default=None, sa_type=_TS)
    status_reason: str | None = Field(default=None, sa_type=Text)
    session_present: bool | None = None
    last_heartbeat_at: UtcTime | None = Field(default=None, sa_type=_TS)
    last_telemetry_at: UtcTime | None = Field(default=None, sa_type=_TS)
    stale: bool = False
    revoked_at: UtcTime | None = Field(default=None, sa_type=_TS)
    # The agent's offline telemetry buffer, as its heartbeats last said.
    buffered_samples: int | None = Field(default=None, sa_type=BigInteger)
    dropped_samples: int | None = Field(default=None, sa_type=BigInteger)


class Agent(AgentDetailBase, table=True):
    __tablename__ = "agents"

    status_epoch: int | None = Field(default=None, sa_type=BigInteger)
    updated_at: UtcTime = Field(default_factory=_now, sa_type=_TS)
    # 0002: the agent's ts of the registration / inventory applied (ordering guards).
    registration_ts: UtcTime | None = Field(default=None, sa_type=_TS)
    inventory_ts: UtcTime | None = Field(default=None, sa_type=_TS)
    inventory_updated_at: UtcTime | None = Field(default=None, sa_type=_TS)
    # 0007: the broker account (docs/broker.md): home broker, hash, provisioned (revoked_at
    # is AgentDetailBase's: `agents show` prints it).
    broker_id: int | None = Field(default=None, sa_type=Integer)
    password_hash: str | None = Field(default=None, sa_type=Text, repr=False)
    provisioned_at: UtcTime | None = Field(default=None, sa_type=_TS)
    # 0013: a certificate identity instead of a password: its serial (hex) and expiry.
    cert_serial: str | None = Field(default=None, sa_type=Text)
    cert_not_after: UtcTime | None = Field(default=None, sa_type=_TS)


class AgentHealth(SQLModel):
    """Where an agent stands, judged in SQL at read time by the functions of migration
    0008 (agent_state, agent_connected, agent_stale, agent_healthy; docs/agents.md)."""

    state: str  # schemas.states.AgentRegistryState
    connected: bool  # online, not stale, not revoked
    stale: bool  # online but silent for offline_after (the bridge's flag)
    healthy: bool  # connected, heartbeat and telemetry within --healthy-within
    epoch: int | None  # agents.status_epoch


class AgentPublic(AgentHealth, AgentBase):
    """`agents list --json`: one agent (SPEC's fields)."""


class AgentDetailRow(AgentHealth, AgentDetailBase):
    """What `agents show` reads of the agents row."""


class AgentStatusEventPublic(SQLModel):
    """One row of agent_status_events (`agents show`: status_history)."""

    time: UtcTime
    state: str
    epoch: int | None
    source: str
    reason: str | None
    accepted: bool
    session_present: bool | None


class AgentChangePublic(SQLModel):
    """One row of agent_changes (`agents show`: changes)."""

    time: UtcTime
    field: str
    old_value: Any
    new_value: Any


class SecurityEventPublic(SQLModel):
    """One row of security_events (`agents show`: security_events, the audit trail)."""

    time: UtcTime
    event: str
    detail: dict[str, Any]


class InventoryChangePublic(SQLModel):
    """One row of inventory_changes (`agents show`: inventory.recent_changes)."""

    time: UtcTime
    name: str
    change: str
    old_version: str | None
    new_version: str | None


class InventorySummaryRow(SQLModel):
    """An agent's software list in two figures."""

    count: int
    updated_at: UtcTime | None  # agents.inventory_updated_at: when the list last changed


class InventoryPublic(InventorySummaryRow):
    """`agents show`: inventory."""

    recent_changes: list[InventoryChangePublic]


class TelemetrySample(SQLModel):
    """One telemetry row as stored (`agents show`: the latest sample)."""

    time: UtcTime
    cpu_percent: float | None
    memory_percent: float | None
    disk_percent: float | None
    net_rx_bytes: int | None
    net_tx_bytes: int | None


class TelemetryPublic(TelemetrySample):
    """`telemetry show --json`: one sample, or one bucket's averages; percentages to two
    decimals, bytes to whole bytes (an average of bigint is numeric)."""

    @field_validator("cpu_percent", "memory_percent", "disk_percent", mode="before")
    @classmethod
    def _two_decimals(cls, value: Any) -> float | None:
        return None if value is None else round(float(value), 2)

    @field_validator("net_rx_bytes", "net_tx_bytes", mode="before")
    @classmethod
    def _whole_bytes(cls, value: Any) -> int | None:
        return None if value is None else round(float(value))


class AgentDetailPublic(AgentDetailRow):
    """`agents show --json`."""

    status_history: list[AgentStatusEventPublic]
    changes: list[AgentChangePublic]
    telemetry: TelemetrySample | None
    inventory: InventoryPublic
    security_events: list[SecurityEventPublic]


class Inventory(SQLModel, table=True):
    __tablename__ = "inventory"

    agent_id: str = Field(primary_key=True, foreign_key="agents.agent_id", sa_type=Text)
    name: str = Field(primary_key=True, sa_type=Text)
    version: str | None = Field(default=None, sa_type=Text)
    publisher: str | None = Field(default=None, sa_type=Text)
    updated_at: datetime = Field(default_factory=_now, sa_type=_TS)


class Deployment(SQLModel, table=True):
    __tablename__ = "deployments"

    deployment_id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    target: dict[str, Any] = Field(sa_type=JSONB)
    rate_per_minute: int | None = None
    max_in_flight: int | None = None
    abort_after_count: int | None = None
    abort_after_percent: float | None = Field(default=None, sa_type=Double)
    status: str = Field(default=DeploymentState.PENDING.value, sa_type=Text)
    status_reason: str | None = Field(default=None, sa_type=Text)
    correlation_id: str = Field(default_factory=lambda: str(uuid.uuid4()), sa_type=Text)
    created_at: datetime = Field(default_factory=_now, sa_type=_TS)
    updated_at: datetime = Field(default_factory=_now, sa_type=_TS)
    started_at: datetime | None = Field(default=None, sa_type=_TS)
    finished_at: datetime | None = Field(default=None, sa_type=_TS)
    # 0004: the rollout engine's (docs/deployments.md).
    intent_id: str | None = Field(default=None, sa_type=Text)
    created_by: str | None = Field(default=None, sa_type=Text)
    abort_min_finished: int = DEPLOYMENT_ABORT_MIN_FINISHED
    next_start_at: datetime | None = Field(default=None, sa_type=_TS)
    expires_in_s: int = TASK_DEFAULT_EXPIRES_IN_S
    targets: int = 0


class DeploymentStatus(SQLModel, table=True):
    __tablename__ = "deployment_status"

    deployment_id: uuid.UUID = Field(
        primary_key=True, foreign_key="deployments.deployment_id", ondelete="CASCADE"
    )
    agent_id: str = Field(primary_key=True, foreign_key="agents.agent_id", sa_type=Text)
    status: str = Field(sa_type=Text)
    progress: int = Field(default=0, sa_type=SmallInteger)
    message: str | None = Field(default=None, sa_type=Text)
    task_id: uuid.UUID | None = None
    reported_at: datetime | None = Field(default=None, sa_type=_TS)
    updated_at: datetime = Field(default_factory=_now, sa_type=_TS)
    # 0004
    started_at: datetime | None = Field(default=None, sa_type=_TS)
    finished_at: datetime | None = Field(default=None, sa_type=_TS)
    failed: bool = False
    rollback_task_id: uuid.UUID | None = None
    reason: str | None = Field(default=None, sa_type=Text)


# -- tasks -----------------------------------------------------------------------------


class TaskBase(SQLModel):
    """The columns of a task that every listing shows (`tasks list` and `show`)."""

    task_id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    agent_id: str = Field(foreign_key="agents.agent_id", sa_type=Text)
    type: str = Field(sa_type=Text)
    status: str = Field(default=TaskStatus.PENDING.value, sa_type=Text)
    progress: int | None = Field(default=None, sa_type=SmallInteger)
    attempts: int = 0
    correlation_id: str = Field(default_factory=lambda: str(uuid.uuid4()), sa_type=Text)
    created_at: UtcTime = Field(default_factory=_now, sa_type=_TS)
    finished_at: UtcTime | None = Field(default=None, sa_type=_TS)


class TaskDetailBase(TaskBase):
    """The further columns `tasks show` prints."""

    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    result: Any | None = Field(default=None, sa_type=JSONB)
    error: str | None = Field(default=None, sa_type=Text)
    timeout_seconds: int = TASK_DEFAULT_TIMEOUT_S
    expires_at: UtcTime | None = Field(default=None, sa_type=_TS)
    created_by: str | None = Field(default=None, sa_type=Text)
    published_at: UtcTime | None = Field(default=None, sa_type=_TS)
    assigned_at: UtcTime | None = Field(default=None, sa_type=_TS)
    started_at: UtcTime | None = Field(default=None, sa_type=_TS)
    cancel_requested: bool = False
    deployment_id: uuid.UUID | None = Field(
        default=None, foreign_key="deployments.deployment_id", ondelete="SET NULL"
    )


class Task(TaskDetailBase, table=True):
    __tablename__ = "tasks"

    updated_at: UtcTime = Field(default_factory=_now, sa_type=_TS)
    # The outbox: set (now, by default) while a message is owed to the agent.
    next_publish_at: UtcTime | None = Field(default_factory=_now, sa_type=_TS)


class TaskPublic(TaskBase):
    """`tasks list --json`: one task."""

    updated_at: UtcTime


class TaskProgressPublic(SQLModel):
    """`tasks create --wait --json`: one task, once every one has finished (or the wait
    timed out)."""

    task_id: uuid.UUID
    agent_id: str
    status: str
    progress: int | None
    error: str | None
    correlation_id: str


class TaskEventPublic(SQLModel):
    """One row of task_events (`tasks show`: events), every report included, also
    those that changed nothing (accepted false, and why in reason)."""

    ts: UtcTime  # task_events.time
    status: str
    previous_status: str | None
    source: str
    correlation_id: str | None
    progress: int | None
    accepted: bool
    reason: str | None
    detail: Any


class TaskDetailRow(TaskDetailBase):
    """What `tasks show` reads of the tasks row."""

    owed: bool  # next_publish_at is set: a message is owed to the agent


class TaskDetailPublic(TaskDetailRow):
    """`tasks show --json`."""

    events: list[TaskEventPublic]


class Bridge(SQLModel, table=True):
    """A running bridge's heartbeat (0005); `eucora status` reads it."""

    __tablename__ = "bridges"

    client_id: str = Field(primary_key=True, sa_type=Text)
    hostname: str = Field(sa_type=Text)
    pid: int
    version: str = Field(sa_type=Text)
    started_at: datetime = Field(sa_type=_TS)
    last_seen: datetime = Field(sa_type=_TS)
    ready: bool
    brokers: list[Any] = Field(default_factory=list, sa_type=JSONB)


RELATIONAL_MODELS: tuple[type[SQLModel], ...] = (
    Bridge,
    Agent,
    Inventory,
    Deployment,
    DeploymentStatus,
    Task,
)


CLI_MODELS: dict[type[SQLModel], type[SQLModel] | None] = {
    AgentPublic: Agent,
    AgentDetailRow: Agent,
    AgentDetailPublic: Agent,
    AgentStatusEventPublic: None,
    AgentChangePublic: None,
    SecurityEventPublic: None,
    InventoryChangePublic: None,
    InventorySummaryRow: None,
    InventoryPublic: None,
    TelemetrySample: None,
    TelemetryPublic: None,
    TaskPublic: Task,
    TaskProgressPublic: Task,
    TaskEventPublic: None,
    TaskDetailRow: Task,
    TaskDetailPublic: Task,
}
"""What the CLI reads and prints, each with the table model it shows (None: a
time-series table, which has none); a field named like a column has its type."""
