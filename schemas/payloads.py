"""Pydantic models, one per payload kind: the single source of the JSON Schemas.

Conventions, shared by every model:
- Field names are SPEC's, unchanged. Unknown fields are kept (SPEC: "Fields may be
  added"), so an older bridge accepts a newer agent.
- Optional fields may be absent or null; both mean "not given".
- Every timestamp is RFC 3339 with a time zone offset (`Z` or `+hh:mm`).
- Models are strict (no "42" for a number, no "true" for a bool), except that an
  integer may be written 42.0, as JSON Schema's "integer" allows.
- Numbers are bounded; NaN and Infinity are rejected.
- `agent_id` may be sent in any payload; `schemas.validate.parse` rejects it when it
  differs from the id in the topic.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetPydanticSchema,
    IPvAnyAddress,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from schemas.states import (
    AGENT_SETTABLE,
    DEPLOYMENT_AGENT_REPORTABLE,
    AgentState,
    DeploymentAgentStatus,
    Platform,
    TaskStatus,
    TaskType,
)
from schemas.topics import AGENT_ID_PATTERN, Kind

INT64_MAX = 2**63 - 1  # PostgreSQL bigint

# RFC 3339 `date-time` (section 5.6): seconds required, offset required. Checked on
# the raw string because pydantic alone would also accept "2025-01-15T10:30Z" or a
# unix number. [0-9], not \d: pydantic-core's regex engine takes \d as any Unicode digit.
RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def _native(
    schema: core_schema.CoreSchema, kind: str, error: str, json_schema: dict[str, Any]
) -> Any:
    """A field type validated by pydantic-core alone, failing with one plain message.

    The bridge validates every sample it stores: a Python validator called from
    pydantic-core per field cost as much as the rest of a telemetry sample's
    validation (bench.ingest, the bridge's CPU per message).
    """
    return GetPydanticSchema(
        lambda _source, _handler: core_schema.custom_error_schema(
            schema, custom_error_type=kind, custom_error_message=error
        )
    ), WithJsonSchema(json_schema)


# A string of that form, then parsed as an aware datetime.
Timestamp = Annotated[
    AwareDatetime,
    *_native(
        core_schema.chain_schema(
            [
                core_schema.str_schema(pattern=RFC3339_PATTERN, strict=True),
                core_schema.datetime_schema(strict=False, tz_constraint="aware"),
            ]
        ),
        "timestamp",
        "must be an RFC 3339 timestamp with a time zone, e.g. 2025-01-15T10:30:00Z",
        {"type": "string", "format": "date-time"},
    ),
]


def _agent_settable(value: TaskStatus) -> TaskStatus:
    if value not in AGENT_SETTABLE:
        raise ValueError(f"{value} is set by the server; an agent may report {_AGENT_STATES}")
    return value


_AGENT_STATES = ", ".join(s.value for s in TaskStatus if s in AGENT_SETTABLE)
# A TaskStatus (so callers compare and store one type), restricted to AGENT_SETTABLE.
ReportedTaskStatus = Annotated[
    TaskStatus,
    AfterValidator(_agent_settable),
    WithJsonSchema(
        {"type": "string", "enum": [s.value for s in TaskStatus if s in AGENT_SETTABLE]}
    ),
]


def _reportable(value: DeploymentAgentStatus) -> DeploymentAgentStatus:
    if value not in DEPLOYMENT_AGENT_REPORTABLE:
        raise ValueError(f"{value} is set by the server; an agent may report {_DEPLOY_STATES}")
    return value


_DEPLOY_STATES = ", ".join(
    s.value for s in DeploymentAgentStatus if s in DEPLOYMENT_AGENT_REPORTABLE
)
ReportedDeploymentStatus = Annotated[
    DeploymentAgentStatus,
    AfterValidator(_reportable),
    WithJsonSchema(
        {
            "type": "string",
            "enum": [s.value for s in DeploymentAgentStatus if s in DEPLOYMENT_AGENT_REPORTABLE],
        }
    ),
]
Percent = Annotated[float, Field(ge=0, le=100)]


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" includes 42.0; strict mode alone would refuse it (while
    # lax mode would also take "42" and true).
    if type(value) is float and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]
# What _integral does, in pydantic-core: an integer, or a float with no fraction.
ByteCount = Annotated[
    int,
    *_native(
        core_schema.chain_schema(
            [
                core_schema.union_schema(
                    [
                        core_schema.int_schema(strict=True),
                        core_schema.chain_schema(
                            [
                                core_schema.float_schema(strict=True, allow_inf_nan=False),
                                core_schema.int_schema(strict=False),
                            ]
                        ),
                    ],
                    mode="left_to_right",
                ),
                core_schema.int_schema(ge=0, le=INT64_MAX, strict=True),
            ]
        ),
        "count",
        f"must be a whole number from 0 to {INT64_MAX}",
        {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
    ),
]
Count = ByteCount
AgentId = Annotated[str, StringConstraints(pattern=AGENT_ID_PATTERN)]
CorrelationId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TagKey = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")
]  # no "=": the CLI's --tag k=v
TagValue = Annotated[str, StringConstraints(max_length=256)]
IpAddress = Annotated[
    IPvAnyAddress,
    WithJsonSchema({"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}),
]
MAC_PATTERN = r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$"

MAX_TAGS = 64
MAX_SOFTWARE = 20_000
MAX_BATCH = 1000


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, frozen=True)


class Payload(_Model):
    """Base of every top-level payload model (and of telemetry samples in a batch)."""

    agent_id: AgentId | None = Field(
        default=None,
        description="Optional; when present it must equal the agent id in the topic.",
    )


def _ts_field(description: str = "When this was produced (RFC 3339 with time zone).") -> Any:
    return Field(description=description)


class Status(Payload):
    """Retained online status, published by the agent on connect and as its last will."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "state": "online",
                    "epoch": 1736937000123,
                    "ts": "2025-01-15T10:30:00.123Z",
                    "session_present": True,
                },
                {
                    "state": "offline",
                    "epoch": 1736937000123,
                    "ts": "2025-01-15T10:30:00.123Z",
                    "reason": "last will",
                },
                {
                    "state": "offline",
                    "epoch": 42,
                    "ts": "2025-01-15T12:00:00+01:00",
                    "reason": "graceful shutdown",
                },
            ]
        }
    )

    state: AgentState
    epoch: Count = Field(
        description="Strictly increasing per agent (boot counter or ms timestamp); "
        "the last will carries the epoch of the online message it follows."
    )
    ts: Timestamp = _ts_field()
    session_present: bool | None = Field(
        default=None, description="Whether the broker kept the agent's session on connect."
    )
    reason: str | None = Field(default=None, max_length=256)


class Hardware(_Model):
    cpu_count: Integer = Field(ge=1, le=65_536)
    memory_bytes: ByteCount
    disk_bytes: ByteCount


class Register(Payload):
    """Who the agent is; sent after each connect."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "hostname": "web-01.corp.example",
                    "platform": "linux",
                    "os_version": "Ubuntu 24.04.1 LTS",
                    "agent_version": "1.4.2",
                    "hardware": {
                        "cpu_count": 8,
                        "memory_bytes": 17179869184,
                        "disk_bytes": 512110190592,
                    },
                    "ip_address": "10.20.0.15",
                    "mac_address": "52:54:00:12:34:56",
                    "tags": {"env": "prod", "site": "fra1"},
                    "ts": "2025-01-15T10:30:01Z",
                },
                {
                    "hostname": "LAPTOP-7F3K2",
                    "platform": "windows",
                    "os_version": "Windows 11 Pro 23H2 (22631.4602)",
                    "agent_version": "1.4.2",
                    "hardware": {
                        "cpu_count": 12,
                        "memory_bytes": 34359738368,
                        "disk_bytes": 1024209543168,
                    },
                    "ip_address": "fd00:10:20::42",
                    "mac_address": "A4-BB-6D-01-02-03",
                    "tags": {},
                    "ts": "2025-01-15T11:30:01+01:00",
                    "agent_id": "LAPTOP-7F3K2",
                },
            ]
        }
    )

    hostname: str = Field(min_length=1, max_length=255)
    platform: Platform
    os_version: str = Field(min_length=1, max_length=256)
    agent_version: str = Field(min_length=1, max_length=64)
    hardware: Hardware
    ip_address: IpAddress
    mac_address: str = Field(pattern=MAC_PATTERN, description="aa:bb:cc:dd:ee:ff or AA-BB-...")
    tags: dict[TagKey, TagValue] = Field(
        max_length=MAX_TAGS,
        description='Free key/value labels, e.g. {"env": "prod"}.',
        # Keys outside the pattern are rejected by the model; say so in the schema too.
        json_schema_extra={"additionalProperties": False},
    )
    ts: Timestamp = _ts_field()


class Heartbeat(Payload):
    """Liveness, every 60 s by default."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"ts": "2025-01-15T10:31:00Z", "seq": 17, "uptime_s": 86412.5},
                {
                    "ts": "2025-01-15T10:31:00Z",
                    "seq": 18,
                    "uptime_s": 86472.5,
                    "buffered_samples": 120,
                    "dropped_samples": 4,
                },
                {"ts": "2025-01-15T10:31:00.5-05:00"},
            ]
        }
    )

    ts: Timestamp = _ts_field()
    seq: Count | None = Field(default=None, description="Increments by one per heartbeat.")
    uptime_s: float | None = Field(
        default=None, ge=0, le=1e10, description="Seconds since the host booted."
    )
    buffered_samples: Count | None = Field(
        default=None, description="Telemetry samples waiting in the agent's offline buffer."
    )
    dropped_samples: Count | None = Field(
        default=None,
        description="Telemetry samples the agent's bounded offline buffer has dropped (full, or"
        " past its age bound) since its state was created.",
    )


class TelemetrySample(Payload):
    """One metrics sample."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ts": "2025-01-15T10:30:00Z",
                    "cpu_percent": 23.5,
                    "memory_percent": 61.2,
                    "disk_percent": 48.9,
                    "net_rx_bytes": 1048576,
                    "net_tx_bytes": 524288,
                },
                {
                    "ts": "2025-01-15T10:30:10.250+02:00",
                    "cpu_percent": 100,
                    "memory_percent": 0,
                    "disk_percent": 97.25,
                    "net_rx_bytes": 0,
                    "net_tx_bytes": 12,
                    "correlation_id": "3f1c2a9e-healthcheck",
                },
            ]
        }
    )

    ts: Timestamp = _ts_field("When the sample was taken (RFC 3339 with time zone).")
    cpu_percent: Percent
    memory_percent: Percent
    disk_percent: Percent
    net_rx_bytes: ByteCount = Field(description="Bytes received since the previous sample.")
    net_tx_bytes: ByteCount = Field(description="Bytes sent since the previous sample.")
    correlation_id: CorrelationId | None = None


class TelemetryBatch(Payload):
    """Samples buffered while offline, sent together (1..1000, oldest first)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "samples": [
                        {
                            "ts": "2025-01-15T09:00:00Z",
                            "cpu_percent": 12.0,
                            "memory_percent": 40.5,
                            "disk_percent": 48.9,
                            "net_rx_bytes": 2048,
                            "net_tx_bytes": 1024,
                        },
                        {
                            "ts": "2025-01-15T09:01:00Z",
                            "cpu_percent": 14.5,
                            "memory_percent": 40.7,
                            "disk_percent": 48.9,
                            "net_rx_bytes": 4096,
                            "net_tx_bytes": 512,
                        },
                    ]
                }
            ]
        }
    )

    samples: list[TelemetrySample] = Field(min_length=1, max_length=MAX_BATCH)


class Software(_Model):
    name: str = Field(min_length=1, max_length=512)
    version: str = Field(max_length=256)
    publisher: str | None = Field(default=None, max_length=512)


class Inventory(Payload):
    """The full list of installed software (not a delta)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ts": "2025-01-15T10:35:00Z",
                    "software": [
                        {"name": "openssl", "version": "3.0.13-0ubuntu3.4", "publisher": "Ubuntu"},
                        {"name": "curl", "version": "8.5.0-2ubuntu10.6"},
                    ],
                },
                {
                    "ts": "2025-01-15T11:35:00+01:00",
                    "software": [
                        {
                            "name": "Google Chrome",
                            "version": "131.0.6778.265",
                            "publisher": "Google LLC",
                        },
                        {
                            "name": "7-Zip 24.09 (x64)",
                            "version": "24.09",
                            "publisher": "Igor Pavlov",
                        },
                    ],
                },
                {"ts": "2025-01-15T10:35:00Z", "software": []},
            ]
        }
    )

    ts: Timestamp = _ts_field()
    software: list[Software] = Field(max_length=MAX_SOFTWARE)


# --- task payloads: what `payload` holds, per task type -------------------------------
# Checked wherever a task is made or received: `eucora tasks create` and `deployments
# create` before storing, the bridge's outbox before publishing, the agent on receipt
# (a TaskCommand whose payload does not fit its type is invalid). Extra fields are kept,
# as everywhere.

Argv = Annotated[
    list[Annotated[str, StringConstraints(max_length=4096)]],
    Field(min_length=1, max_length=256),
]


class CommandTaskPayload(_Model):
    """REMEDIATE and UPDATE: one declared command, run without a shell. The agent runs
    it only if its local allow-list permits it (otherwise REJECTED)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"command": ["/opt/eucora/bin/restart-service", "cups"]}]}
    )

    command: Argv = Field(description="argv: the program and its arguments (no shell).")


class DeployTaskPayload(CommandTaskPayload):
    """DEPLOY: a command, as REMEDIATE; a deployment's DEPLOY tasks also carry its
    deployment_id (set by the rollout engine), and a rollback task `rollback: true`
    with the deployment's `rollback_command` to run instead."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"command": ["/usr/bin/apt-get", "install", "-y", "eucora-agent=1.4.3"]},
                {
                    "command": ["/opt/install", "2.1"],
                    "rollback_command": ["/opt/install", "2.0"],
                    "package": "eucora-agent",
                    "version": "2.1",
                    "deployment_id": "9a3c1f7e-2b4d-4e6f-8a1b-3c5d7e9f1a2b",
                    "rollback": True,
                },
            ]
        }
    )

    # Lax: the payload is checked as a Python dict, where a strict UUID is an object.
    deployment_id: Annotated[uuid.UUID, Field(strict=False)] | None = Field(
        default=None, description="The deployment (rollout) this task belongs to."
    )
    rollback: bool = Field(default=False, description="Run rollback_command instead of command.")
    rollback_command: Argv | None = Field(
        default=None, description="argv that undoes `command` (a deployment's rollback)."
    )


class HealthcheckTaskPayload(_Model):
    """HEALTHCHECK: local checks against thresholds (percent); FAILED when one fails."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{}, {"disk_max_percent": 80, "paths": ["/", "/var"]}],
        }
    )

    disk_max_percent: Percent | None = Field(default=None, description="Default 90.")
    memory_max_percent: Percent | None = Field(default=None, description="Default 90.")
    cpu_max_percent: Percent | None = Field(default=None, description="Default 95.")
    paths: list[Annotated[str, StringConstraints(min_length=1, max_length=4096)]] | None = Field(
        default=None, min_length=1, max_length=64, description="Mount points (default: /)."
    )


CollectorName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class CollectTaskPayload(_Model):
    """COLLECT: a snapshot of what `what` names (the agent knows `telemetry` and
    `inventory`; an unknown name is REJECTED by the agent)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{}, {"what": ["telemetry", "inventory"]}]}
    )

    what: list[CollectorName] | CollectorName | None = Field(
        default=None, description='Default ["telemetry"]; one name may be given as a string.'
    )


TASK_PAYLOADS: dict[TaskType, type[_Model]] = {
    TaskType.DEPLOY: DeployTaskPayload,
    TaskType.REMEDIATE: CommandTaskPayload,
    TaskType.UPDATE: CommandTaskPayload,
    TaskType.HEALTHCHECK: HealthcheckTaskPayload,
    TaskType.COLLECT: CollectTaskPayload,
}


def _article(type_: TaskType) -> str:
    return "an" if type_ is TaskType.UPDATE else "a"


def check_task_payload(type_: TaskType, payload: dict[str, Any]) -> None:
    """A ValueError (one line naming the field) when `payload` does not fit `type_`."""
    try:
        TASK_PAYLOADS[type_].model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        # Union branches appear in the location as e.g. "list[constrained-str]": left out.
        loc = [str(p) for p in first["loc"] if isinstance(p, int) or p.isidentifier()]
        where = ".".join(["payload", *loc])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise PydanticCustomError(
            "task_payload", f"{_article(type_)} {type_.value} task's {where}: {first['msg']}{more}"
        ) from None


class TaskCommand(Payload):
    """A task for the agent (bridge -> agent). task_id is an idempotency key."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task_id": "0b5e2c1e-8a43-4f0e-9d0c-5d2f6b1a7c11",
                    "type": "HEALTHCHECK",
                    "payload": {},
                    "timeout_seconds": 3600,
                    "expires_at": "2025-01-22T10:30:00Z",
                    "correlation_id": "op-7d1f9a",
                    "created_at": "2025-01-15T10:30:00Z",
                    "attempt": 1,
                },
                {
                    "task_id": "6f7c4a52-3b1d-4c8e-a3f9-9e2d8b7c6a50",
                    "type": "DEPLOY",
                    "payload": {
                        "command": ["/usr/bin/apt-get", "install", "-y", "eucora-agent=1.4.3"],
                        "deployment_id": "9a3c1f7e-2b4d-4e6f-8a1b-3c5d7e9f1a2b",
                        "package": "eucora-agent",
                        "version": "1.4.3",
                    },
                    "timeout_seconds": 900,
                    "expires_at": "2025-01-16T10:30:00Z",
                    "correlation_id": "9a3c1f7e-2b4d-4e6f-8a1b-3c5d7e9f1a2b",
                    "created_at": "2025-01-15T10:30:00Z",
                    "attempt": 2,
                },
            ]
        }
    )

    task_id: uuid.UUID
    type: TaskType
    payload: dict[str, Any] = Field(
        description="Type-specific parameters (may be {}): task-payload-<type>.schema.json."
    )
    timeout_seconds: Integer = Field(
        ge=1,
        le=30 * 86_400,
        description="Seconds the task may run after it started before the server marks it TIMEOUT.",
    )
    expires_at: Timestamp = Field(
        description="The agent must not start the task after this time (report REJECTED)."
    )
    correlation_id: CorrelationId
    created_at: Timestamp
    attempt: Integer = Field(ge=1, le=1_000_000, description="1 for the first publication.")

    @model_validator(mode="after")
    def _payload_fits_type(self) -> TaskCommand:
        check_task_payload(self.type, self.payload)
        return self


class TaskCancel(Payload):
    """Cancel a task (bridge -> agent): stop it if it runs, never start it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"cancel": "6f7c4a52-3b1d-4c8e-a3f9-9e2d8b7c6a50"},
                {
                    "cancel": "0b5e2c1e-8a43-4f0e-9d0c-5d2f6b1a7c11",
                    "correlation_id": "op-7d1f9a",
                    "ts": "2025-01-15T10:40:00Z",
                },
            ]
        }
    )

    cancel: uuid.UUID = Field(description="The task_id to cancel.")


class TaskStatusReport(Payload):
    """The agent's report on a task (ASSIGNED on receipt, then progress and outcome)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "task_id": "0b5e2c1e-8a43-4f0e-9d0c-5d2f6b1a7c11",
                    "status": "ASSIGNED",
                    "ts": "2025-01-15T10:30:01Z",
                },
                {
                    "task_id": "6f7c4a52-3b1d-4c8e-a3f9-9e2d8b7c6a50",
                    "status": "IN_PROGRESS",
                    "progress": 40,
                    "ts": "2025-01-15T10:31:00Z",
                },
                {
                    "task_id": "0b5e2c1e-8a43-4f0e-9d0c-5d2f6b1a7c11",
                    "status": "COMPLETED",
                    "progress": 100,
                    "result": {"checks": {"disk": "ok", "service": "ok"}},
                    "ts": "2025-01-15T10:30:05Z",
                },
                {
                    "task_id": "6f7c4a52-3b1d-4c8e-a3f9-9e2d8b7c6a50",
                    "status": "REJECTED",
                    "error": "expired before start (expires_at 2025-01-16T10:30:00Z)",
                    "ts": "2025-01-17T08:00:00Z",
                },
            ]
        }
    )

    task_id: uuid.UUID
    status: ReportedTaskStatus = Field(
        description="Only the states an agent may set; the server sets the others."
    )
    progress: float | None = Field(default=None, ge=0, le=100)
    result: Any = Field(default=None, description="Any JSON value: the task's output.")
    error: str | None = Field(default=None, max_length=16_384)
    ts: Timestamp = _ts_field()


class DeploymentStatusReport(Payload):
    """The agent's progress on one deployment (rollout)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "deployment_id": "9a3c1f7e-2b4d-4e6f-8a1b-3c5d7e9f1a2b",
                    "status": "IN_PROGRESS",
                    "progress": 35.5,
                    "message": "downloading eucora-agent 1.4.3",
                    "ts": "2025-01-15T10:31:10Z",
                },
                {
                    "deployment_id": "9a3c1f7e-2b4d-4e6f-8a1b-3c5d7e9f1a2b",
                    "status": "ROLLBACK",
                    "progress": 100,
                    "message": "health check failed; restored 1.4.2",
                    "ts": "2025-01-15T10:35:00+00:00",
                },
            ]
        }
    )

    deployment_id: uuid.UUID
    status: ReportedDeploymentStatus
    progress: Percent
    message: str | None = Field(default=None, max_length=4096)
    ts: Timestamp = _ts_field()


def _dict_has(key: str) -> Callable[[Any], str]:
    # Tag by the presence of one key, so errors come from the intended model only.
    # Non-objects go to the first model, whose error says "Input should be an object".
    def pick(value: Any) -> str:
        present = key in value if isinstance(value, dict) else hasattr(value, key)
        return key if present else "other"

    return pick


Telemetry = Annotated[
    Annotated[TelemetrySample, Tag("other")] | Annotated[TelemetryBatch, Tag("samples")],
    Discriminator(_dict_has("samples")),
]
TaskMessage = Annotated[
    Annotated[TaskCommand, Tag("other")] | Annotated[TaskCancel, Tag("cancel")],
    Discriminator(_dict_has("cancel")),
]

# The models behind each kind; the first is its "main" model.
MODELS: dict[Kind, tuple[type[Payload], ...]] = {
    Kind.STATUS: (Status,),
    Kind.REGISTER: (Register,),
    Kind.HEARTBEAT: (Heartbeat,),
    Kind.TELEMETRY: (TelemetrySample, TelemetryBatch),
    Kind.INVENTORY: (Inventory,),
    Kind.TASKS: (TaskCommand, TaskCancel),
    Kind.TASK_STATUS: (TaskStatusReport,),
    Kind.DEPLOYMENT_STATUS: (DeploymentStatusReport,),
}

# One validator per kind: TypeAdapter for the two unions, the model itself otherwise.
ADAPTERS: dict[Kind, TypeAdapter[Any]] = {
    kind: TypeAdapter(
        Telemetry if kind is Kind.TELEMETRY else TaskMessage if kind is Kind.TASKS else models[0]
    )
    for kind, models in MODELS.items()
}

DESCRIPTIONS: dict[Kind, str] = {
    Kind.STATUS: "Agent online status (retained; also the agent's last will).",
    Kind.REGISTER: "Agent registration: host, platform, hardware, network, tags.",
    Kind.HEARTBEAT: "Agent heartbeat (every 60 s by default).",
    Kind.TELEMETRY: 'One metrics sample, or {"samples": [...]}: 1..1000 samples '
    "buffered while offline.",
    Kind.INVENTORY: "Installed software: the full current list.",
    Kind.TASKS: 'Bridge -> agent: a task command, or {"cancel": task_id}.',
    Kind.TASK_STATUS: "Agent -> bridge: a task's status (ASSIGNED, IN_PROGRESS, COMPLETED, "
    "FAILED, REJECTED).",
    Kind.DEPLOYMENT_STATUS: "Agent -> bridge: progress on one deployment (rollout).",
}

__all__ = [
    "ADAPTERS",
    "DESCRIPTIONS",
    "MAX_BATCH",
    "MAX_SOFTWARE",
    "MAX_TAGS",
    "MODELS",
    "TASK_PAYLOADS",
    "CollectTaskPayload",
    "CommandTaskPayload",
    "DeployTaskPayload",
    "DeploymentStatusReport",
    "Hardware",
    "HealthcheckTaskPayload",
    "Heartbeat",
    "Inventory",
    "Payload",
    "Register",
    "Software",
    "Status",
    "TaskCancel",
    "TaskCommand",
    "TaskMessage",
    "TaskStatusReport",
    "Telemetry",
    "TelemetryBatch",
    "TelemetrySample",
    "Timestamp",
    "check_task_payload",
]
