"""The event stream's contract: the envelope, every kind, and each kind's `data`.

One event is one recorded state change (docs/events.md). The kinds are spelled here
once; `python -m schemas.generate` writes `event-<kind>.schema.json` for each from
these models (the envelope with that kind's `data`). Consumers should ignore fields
they do not know: fields may be added, none is removed or renamed within `v1`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field


class EventKind(StrEnum):
    AGENT_REGISTERED = "agent.registered"
    AGENT_CHANGED = "agent.changed"
    AGENT_ONLINE = "agent.online"
    AGENT_OFFLINE = "agent.offline"
    AGENT_STALE = "agent.stale"
    TASK_CREATED = "task.created"
    TASK_STATUS = "task.status"
    DEPLOYMENT_CREATED = "deployment.created"
    DEPLOYMENT_STATUS = "deployment.status"
    DEPLOYMENT_AGENT = "deployment.agent"
    INVENTORY_CHANGED = "inventory.changed"
    SECURITY = "security.event"
    DEAD_LETTER = "message.dead_lettered"


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow")


class AgentRegistered(_Data):
    """An agent registered for the first time: what it said about itself."""

    hostname: str | None = None
    platform: str | None = None
    os_version: str | None = None
    agent_version: str | None = None
    hardware: dict[str, Any] = {}
    ip_address: str | None = None
    mac_address: str | None = None
    tags: dict[str, str] = {}


class AgentChanged(_Data):
    """One field of an agent's record changed: a registration field, or the operator's
    `labels`. One event per field (the rows of agent_changes)."""

    field: str
    old_value: Any = None
    new_value: Any = None


class AgentStatus(_Data):
    """agent.online, agent.offline, agent.stale: an accepted presence transition."""

    epoch: int | None = None
    reason: str | None = None
    # agent, last_will, bridge (stale detection), operator (revoked)
    source: str
    session_present: bool | None = None


class TaskCreated(_Data):
    task_id: uuid.UUID
    type: str
    status: str
    deployment_id: uuid.UUID | None = None
    created_by: str | None = None


class TaskStatusChanged(_Data):
    """A task's status changed (or an IN_PROGRESS task reported further progress)."""

    task_id: uuid.UUID
    status: str
    previous_status: str | None = None
    # agent, server, operator
    source: str
    progress: int | None = None
    reason: str | None = None
    detail: dict[str, Any] | None = None


class DeploymentCreated(_Data):
    deployment_id: uuid.UUID
    intent_id: str | None = None
    status: str
    targets: int
    created_by: str | None = None


class DeploymentStatus(_Data):
    """A deployment as a whole changed state (agent_id is null)."""

    deployment_id: uuid.UUID
    intent_id: str | None = None
    status: str
    previous_status: str
    reason: str | None = None


class DeploymentAgent(_Data):
    """One target's state in a deployment changed (or progressed)."""

    deployment_id: uuid.UUID
    status: str
    previous_status: str | None = None
    source: str
    progress: int | None = None
    message: str | None = None
    reason: str | None = None


class SoftwareChange(_Data):
    name: str
    change: str  # added, removed, changed
    old_version: str | None = None
    new_version: str | None = None
    publisher: str | None = None


class InventoryChanged(_Data):
    """An agent's software list changed: every difference from the stored list."""

    added: int = Field(ge=0)
    removed: int = Field(ge=0)
    changed: int = Field(ge=0)
    changes: list[SoftwareChange]


class SecurityEvent(_Data):
    """Provisioning, first registration changes, revocation, deletion, an identity
    violation...: `event` names it (the rows of security_events)."""

    event: str
    detail: dict[str, Any] = {}


class DeadLetter(_Data):
    """A message that could not be stored, kept in dead_letters."""

    topic: str
    kind: str | None = None
    reason: str
    detail: str | None = None
    payload_size: int = Field(ge=0)


DATA: Final[dict[EventKind, type[_Data]]] = {
    EventKind.AGENT_REGISTERED: AgentRegistered,
    EventKind.AGENT_CHANGED: AgentChanged,
    EventKind.AGENT_ONLINE: AgentStatus,
    EventKind.AGENT_OFFLINE: AgentStatus,
    EventKind.AGENT_STALE: AgentStatus,
    EventKind.TASK_CREATED: TaskCreated,
    EventKind.TASK_STATUS: TaskStatusChanged,
    EventKind.DEPLOYMENT_CREATED: DeploymentCreated,
    EventKind.DEPLOYMENT_STATUS: DeploymentStatus,
    EventKind.DEPLOYMENT_AGENT: DeploymentAgent,
    EventKind.INVENTORY_CHANGED: InventoryChanged,
    EventKind.SECURITY: SecurityEvent,
    EventKind.DEAD_LETTER: DeadLetter,
}

DESCRIPTIONS: Final[dict[EventKind, str]] = {
    EventKind.AGENT_REGISTERED: "An agent registered for the first time.",
    EventKind.AGENT_CHANGED: "One field of an agent's record changed (re-registration, labels).",
    EventKind.AGENT_ONLINE: "An agent came online (a new session).",
    EventKind.AGENT_OFFLINE: "An agent went offline (its last will, a clean stop, a revoke).",
    EventKind.AGENT_STALE: "An agent said online but sent nothing for too long.",
    EventKind.TASK_CREATED: "A task was created for an agent.",
    EventKind.TASK_STATUS: "A task changed status, or reported progress.",
    EventKind.DEPLOYMENT_CREATED: "A deployment was created (agent_id is null).",
    EventKind.DEPLOYMENT_STATUS: "A deployment changed state (agent_id is null).",
    EventKind.DEPLOYMENT_AGENT: "One agent's state in a deployment changed.",
    EventKind.INVENTORY_CHANGED: "An agent's installed software changed.",
    EventKind.SECURITY: "A security event (provisioning, revocation, identity violation...).",
    EventKind.DEAD_LETTER: "A message could not be stored and was dead-lettered.",
}


class Envelope(BaseModel):
    """One event as readers get it (`eucora events tail --json`, a JetStream message)."""

    model_config = ConfigDict(extra="allow")

    event_id: uuid.UUID
    # Where a reader resumes: the position just after this event (opaque text).
    cursor: str
    # null for events about no single agent
    agent_id: str | None
    # 1, 2, 3... per agent, without gaps; null when agent_id is null
    agent_seq: int | None = Field(ge=1)
    kind: str
    ts: datetime
    correlation_id: str | None = None
    data: dict[str, Any]

    def document(self) -> dict[str, Any]:
        """The JSON object (uuids and times as strings)."""
        return self.model_dump(mode="json")
