"""SQLModel models of the relational tables, for AsyncSession work (CLI, deployments).

They mirror the migrations and do not create anything: the schema is owned by the SQL
migrations (`eucora db upgrade`), never by `metadata.create_all()`.
tests/test_migrations.py compares every model with the migrated database, and
tests/test_contract.py every state column's CHECK and default with schemas/, so none
of them can drift. Time-series tables (telemetry, *_events, dead_letters) have no model:
they are written with COPY / plain SQL and read with time_bucket queries.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Double, SmallInteger, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from schemas.constants import (
    DEPLOYMENT_ABORT_MIN_FINISHED,
    TASK_DEFAULT_EXPIRES_IN_S,
    TASK_DEFAULT_TIMEOUT_S,
)
from schemas.states import AgentRecordState, DeploymentState, TaskStatus

_TS = DateTime(timezone=True)


def _now() -> datetime:
    return datetime.now(UTC)


class Agent(SQLModel, table=True):
    __tablename__ = "agents"

    agent_id: str = Field(primary_key=True, sa_type=Text)
    hostname: str | None = Field(default=None, sa_type=Text)
    platform: str | None = Field(default=None, sa_type=Text)
    os_version: str | None = Field(default=None, sa_type=Text)
    agent_version: str | None = Field(default=None, sa_type=Text)
    hardware: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    ip_address: str | None = Field(default=None, sa_type=Text)
    mac_address: str | None = Field(default=None, sa_type=Text)
    tags: dict[str, str] = Field(default_factory=dict, sa_type=JSONB)
    first_seen: datetime = Field(default_factory=_now, sa_type=_TS)
    registered_at: datetime | None = Field(default=None, sa_type=_TS)
    last_seen: datetime | None = Field(default=None, sa_type=_TS)
    status: str = Field(default=AgentRecordState.UNKNOWN.value, sa_type=Text)
    status_epoch: int | None = Field(default=None, sa_type=BigInteger)
    status_changed_at: datetime | None = Field(default=None, sa_type=_TS)
    status_reason: str | None = Field(default=None, sa_type=Text)
    session_present: bool | None = None
    last_heartbeat_at: datetime | None = Field(default=None, sa_type=_TS)
    last_telemetry_at: datetime | None = Field(default=None, sa_type=_TS)
    stale: bool = False
    updated_at: datetime = Field(default_factory=_now, sa_type=_TS)
    # 0002: the agent's ts of the registration / inventory applied (ordering guards).
    registration_ts: datetime | None = Field(default=None, sa_type=_TS)
    inventory_ts: datetime | None = Field(default=None, sa_type=_TS)
    inventory_updated_at: datetime | None = Field(default=None, sa_type=_TS)


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


class Task(SQLModel, table=True):
    __tablename__ = "tasks"

    task_id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    agent_id: str = Field(foreign_key="agents.agent_id", sa_type=Text)
    type: str = Field(sa_type=Text)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSONB)
    status: str = Field(default=TaskStatus.PENDING.value, sa_type=Text)
    progress: int | None = Field(default=None, sa_type=SmallInteger)
    result: Any | None = Field(default=None, sa_type=JSONB)
    error: str | None = Field(default=None, sa_type=Text)
    timeout_seconds: int = TASK_DEFAULT_TIMEOUT_S
    expires_at: datetime | None = Field(default=None, sa_type=_TS)
    correlation_id: str = Field(default_factory=lambda: str(uuid.uuid4()), sa_type=Text)
    created_at: datetime = Field(default_factory=_now, sa_type=_TS)
    updated_at: datetime = Field(default_factory=_now, sa_type=_TS)
    published_at: datetime | None = Field(default=None, sa_type=_TS)
    assigned_at: datetime | None = Field(default=None, sa_type=_TS)
    started_at: datetime | None = Field(default=None, sa_type=_TS)
    finished_at: datetime | None = Field(default=None, sa_type=_TS)
    attempts: int = 0
    # The outbox: set (now, by default) while a message is owed to the agent.
    next_publish_at: datetime | None = Field(default_factory=_now, sa_type=_TS)
    deployment_id: uuid.UUID | None = Field(
        default=None, foreign_key="deployments.deployment_id", ondelete="SET NULL"
    )
    cancel_requested: bool = False
    created_by: str | None = Field(default=None, sa_type=Text)


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
