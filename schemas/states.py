"""The closed value sets of the contract, and the task lifecycle as a pure function.

Values are the exact strings on the wire (and in the database), so every enum is a
StrEnum: `TaskStatus.PENDING == "PENDING"`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class AgentState(StrEnum):
    """`status` topic: set by the agent on connect, and by its last will."""

    ONLINE = "online"
    OFFLINE = "offline"


class Platform(StrEnum):
    WINDOWS = "windows"
    MACOS = "macos"
    LINUX = "linux"


class TaskType(StrEnum):
    DEPLOY = "DEPLOY"
    REMEDIATE = "REMEDIATE"
    COLLECT = "COLLECT"
    UPDATE = "UPDATE"
    HEALTHCHECK = "HEALTHCHECK"


class TaskStatus(StrEnum):
    PENDING = "PENDING"  # stored; published or waiting for the agent
    ASSIGNED = "ASSIGNED"  # the agent acknowledged receipt (a PUBACK is not delivery)
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"  # the agent cannot run it (unknown type, expired on arrival...)
    TIMEOUT = "TIMEOUT"  # not finished within timeout_seconds after it started
    EXPIRED = "EXPIRED"  # not started by expires_at
    CANCELLED = "CANCELLED"  # by an operator


# What an agent may report on task-status; the server sets everything else.
AGENT_SETTABLE: frozenset[TaskStatus] = frozenset(
    {
        TaskStatus.ASSIGNED,
        TaskStatus.IN_PROGRESS,
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.REJECTED,
    }
)
# Set by the server only (PENDING is the initial state, never a transition target).
SERVER_SETTABLE: frozenset[TaskStatus] = frozenset(
    {TaskStatus.TIMEOUT, TaskStatus.EXPIRED, TaskStatus.CANCELLED}
)
TERMINAL: frozenset[TaskStatus] = frozenset(
    {
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.REJECTED,
        TaskStatus.TIMEOUT,
        TaskStatus.EXPIRED,
        TaskStatus.CANCELLED,
    }
)
_S = TaskStatus
_NEXT: dict[TaskStatus, frozenset[TaskStatus]] = {
    # Any agent report may arrive straight from PENDING: the ASSIGNED (and
    # IN_PROGRESS) reports can be lost or overtaken, and the later report still
    # proves delivery. EXPIRED: never delivered in time.
    _S.PENDING: frozenset(
        {_S.ASSIGNED, _S.IN_PROGRESS, _S.COMPLETED, _S.FAILED, _S.REJECTED}
        | {_S.EXPIRED, _S.CANCELLED}
    ),
    # Received but not started: the agent may still refuse it; the server may time
    # it out (the agent went silent) or expire it (never started by expires_at).
    _S.ASSIGNED: frozenset(
        {_S.IN_PROGRESS, _S.COMPLETED, _S.FAILED, _S.REJECTED}
        | {_S.TIMEOUT, _S.EXPIRED, _S.CANCELLED}
    ),
    # Started: it can only finish, time out, or be cancelled with --force. Too late
    # to reject, and expires_at no longer applies.
    _S.IN_PROGRESS: frozenset({_S.COMPLETED, _S.FAILED, _S.TIMEOUT, _S.CANCELLED}),
}


def task_transition_allowed(
    current: TaskStatus,
    new: TaskStatus,
    *,
    source: Literal["agent", "server"] | None = None,
) -> bool:
    """Whether a task in `current` may move to `new`.

    The lifecycle (SPEC "Tasks"):

    - PENDING -> ASSIGNED -> IN_PROGRESS -> COMPLETED | FAILED is the normal path.
    - Lost acks: IN_PROGRESS, COMPLETED and FAILED are accepted directly from
      PENDING or ASSIGNED, and ASSIGNED/IN_PROGRESS may be skipped, because the
      agent's earlier reports can be lost or reordered (a reconnect without its
      session, several bridge instances) while the later one still proves the outcome.
    - REJECTED only before the task started (PENDING or ASSIGNED).
    - Server states: TIMEOUT from IN_PROGRESS or ASSIGNED; EXPIRED from PENDING or
      ASSIGNED (not started by expires_at); CANCELLED from PENDING, ASSIGNED or
      IN_PROGRESS (the CLI requires --force for the last).
    - Terminal states (TERMINAL) are final: nothing leaves them.
    - `current == new` is not a transition (False): a duplicate report, or an
      IN_PROGRESS progress update, which changes the progress, not the state.
    - Nothing goes back to PENDING.

    `source`, when given, also requires `new` to be one that source may set:
    AGENT_SETTABLE for "agent", SERVER_SETTABLE for "server".
    """
    if source == "agent" and new not in AGENT_SETTABLE:
        return False
    if source == "server" and new not in SERVER_SETTABLE:
        return False
    return new in _NEXT.get(current, frozenset())


class DeploymentAgentStatus(StrEnum):
    """Per (deployment, agent). The agent reports the first five on deployment-status;
    SKIPPED is the server's (never started: aborted, expired, offline past the
    deployment's deadline)."""

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    ROLLBACK = "ROLLBACK"  # the agent rolled the deployment back (asked to, or on its own)
    SKIPPED = "SKIPPED"


# What an agent may put in a deployment-status report.
DEPLOYMENT_AGENT_REPORTABLE: frozenset[DeploymentAgentStatus] = frozenset(
    set(DeploymentAgentStatus) - {DeploymentAgentStatus.SKIPPED}
)


class DeploymentState(StrEnum):
    """A rollout as a whole (server side; never sent by agents).

    PENDING -> RUNNING -> COMPLETED (every agent finished) | ABORTED (the failure
    threshold passed, or an operator aborted: no new agent is started, unstarted
    tasks are CANCELLED); ROLLING_BACK -> ROLLED_BACK (agents that reported SUCCESS
    get a DEPLOY task with "rollback": true).
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"


DEPLOYMENT_TERMINAL: frozenset[DeploymentState] = frozenset(
    {DeploymentState.COMPLETED, DeploymentState.ABORTED, DeploymentState.ROLLED_BACK}
)
_D = DeploymentState
_DEPLOYMENT_NEXT: dict[DeploymentState, frozenset[DeploymentState]] = {
    _D.PENDING: frozenset({_D.RUNNING, _D.ABORTED}),
    _D.RUNNING: frozenset({_D.COMPLETED, _D.ABORTED}),
    _D.COMPLETED: frozenset({_D.ROLLING_BACK}),
    _D.ABORTED: frozenset({_D.ROLLING_BACK}),
    _D.ROLLING_BACK: frozenset({_D.ROLLED_BACK}),
}


def deployment_transition_allowed(current: DeploymentState, new: DeploymentState) -> bool:
    """PENDING -> RUNNING -> COMPLETED | ABORTED (also straight from PENDING);
    COMPLETED or ABORTED -> ROLLING_BACK -> ROLLED_BACK. Nothing else."""
    return new in _DEPLOYMENT_NEXT.get(current, frozenset())


_A = DeploymentAgentStatus
# A target is finished in these states (SUCCESS may still be rolled back).
DEPLOYMENT_AGENT_FINISHED: frozenset[DeploymentAgentStatus] = frozenset(
    {_A.SUCCESS, _A.FAILED, _A.ROLLBACK, _A.SKIPPED}
)
_AGENT_NEXT: dict[DeploymentAgentStatus, frozenset[DeploymentAgentStatus]] = {
    _A.PENDING: frozenset({_A.IN_PROGRESS, _A.SUCCESS, _A.FAILED, _A.ROLLBACK, _A.SKIPPED}),
    _A.IN_PROGRESS: frozenset({_A.SUCCESS, _A.FAILED, _A.ROLLBACK}),
    _A.SUCCESS: frozenset({_A.ROLLBACK, _A.FAILED}),
    _A.FAILED: frozenset({_A.ROLLBACK}),
}


def deployment_agent_transition_allowed(
    current: DeploymentAgentStatus, new: DeploymentAgentStatus
) -> bool:
    """One target of a deployment (SPEC "Deployments", docs/deployments.md):

    - PENDING (sent, or not yet) -> IN_PROGRESS -> SUCCESS | FAILED; earlier reports may
      be lost, so SUCCESS, FAILED or ROLLBACK are accepted straight from PENDING.
    - ROLLBACK: the previous version is back, after a rollback task (from SUCCESS) or
      on the agent's own initiative (from PENDING, IN_PROGRESS or FAILED).
    - SUCCESS -> FAILED: only a failed rollback task (the server sets it).
    - SKIPPED (server): never started; only from PENDING.
    - ROLLBACK and SKIPPED are final; the same state again is not a transition (an
      IN_PROGRESS progress update changes the progress, not the state).
    """
    return new in _AGENT_NEXT.get(current, frozenset())


class AgentRecordState(StrEnum):
    """`agents.status`: the last online/offline an agent set, or none yet."""

    UNKNOWN = "unknown"
    ONLINE = "online"
    OFFLINE = "offline"


class AgentRegistryState(StrEnum):
    """`state` in `agents list/show`: where the registry says an agent stands. Judged
    in SQL by `agent_state()` (migration 0008), with `connected`, `stale` and
    `healthy` beside it (docs/agents.md)."""

    NEVER_CONNECTED = "never_connected"  # provisioned or seen, no status message yet
    ONLINE = "online"  # its last status says online (stale or not)
    OFFLINE = "offline"
    REVOKED = "revoked"  # `agents revoke`: whatever its last status said


class StatusEventState(StrEnum):
    """`agent_status_events.state`: the agent's transitions, and the bridge's stale mark."""

    ONLINE = "online"
    OFFLINE = "offline"
    STALE = "stale"


class EventSource(StrEnum):
    """Who made a task transition (`task_events.source`)."""

    AGENT = "agent"
    SERVER = "server"
    OPERATOR = "operator"


class InventoryChange(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


# Tasks the agent has not started: a redelivery or a reconnect may still send them.
UNSTARTED: frozenset[TaskStatus] = frozenset({TaskStatus.PENDING, TaskStatus.ASSIGNED})


class DeadLetterReason(StrEnum):
    """Why a message went to the dead-letter table (its `reason` column and the
    `eucora_dead_letters` metric's label). The first five are `schemas.validate`'s."""

    OVERSIZE = "oversize"
    NOT_JSON = "not_json"
    SCHEMA = "schema"
    IDENTITY = "identity"
    UNKNOWN_KIND = "unknown_kind"
    UNKNOWN_TASK = "unknown_task"  # a task-status report on a task that does not exist
    UNKNOWN_DEPLOYMENT = "unknown_deployment"  # a deployment-status report that matches
    # no (deployment, agent) target
    UNSUPPORTED = "unsupported"  # a valid kind this bridge version does not store yet
    STORAGE = "storage"  # the database refused the message's values
    INTERNAL_ERROR = "internal_error"  # a bug in the bridge while storing this message
