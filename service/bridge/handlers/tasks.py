"""Task-status reports from agents (SPEC "Tasks: lifecycle"; docs/tasks.md).

Runs inside the batch's transaction. The task's row is locked first (SELECT ... FOR
UPDATE), so the copies of a report that two bridges handle at once (with plain
subscriptions every bridge receives every report) serialise, and the second one
judges against the first one's result.

Every report leaves a task_events row: accepted ones with the transition, the others
(duplicate, out of order, after a terminal state, illegal, on another agent's task)
with accepted = false and the reason, changing nothing else. A message already
recorded (same agent, status and `ts`: a QoS 1 redelivery, or the copy another bridge
handled) is only counted (outcome `repeat`). A report on a task that does not exist
has no task to attach an event to: it becomes a dead letter (reason `unknown_task`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import psycopg
from psycopg.types.json import Jsonb

from schemas.payloads import Status, TaskStatusReport
from schemas.states import TERMINAL, AgentState, TaskStatus, task_transition_allowed
from schemas.topics import Kind
from service.bridge import metrics
from service.bridge.handlers.agents import STATUS_HOOKS
from service.bridge.outbox import owe_again
from service.bridge.store import Rejected, handles

if TYPE_CHECKING:
    from service.bridge.ingest import Inbound

log = logging.getLogger("eucora.bridge.tasks")

_S = TaskStatus
# How far along the lifecycle a state is: a report of an earlier stage than the
# current one arrived out of order.
_STAGE: Final[dict[TaskStatus, int]] = {
    _S.PENDING: 0,
    _S.ASSIGNED: 1,
    _S.IN_PROGRESS: 2,
    **{s: 3 for s in TERMINAL},
}


@dataclass(frozen=True)
class Verdict:
    # accepted: a transition; progress: same IN_PROGRESS, further along (stored);
    # anything else: recorded with accepted = false and changes nothing.
    outcome: str
    reason: str | None = None

    @property
    def applies(self) -> bool:
        return self.outcome in ("accepted", "progress")


def judge_report(
    current: TaskStatus,
    new: TaskStatus,
    current_progress: float | None = None,
    new_progress: float | None = None,
) -> Verdict:
    """What an agent's report of `new` does to a task in `current` (pure)."""
    if task_transition_allowed(current, new, source="agent"):
        return Verdict("accepted")
    if new == current:
        if new is _S.IN_PROGRESS and new_progress is not None:
            if current_progress is None or new_progress > current_progress:
                return Verdict("progress", "progress")
            if new_progress < current_progress:
                return Verdict(
                    "out_of_order", f"progress {new_progress:g} after {current_progress:g}"
                )
        return Verdict("duplicate", f"duplicate {new.value}")
    if current in TERMINAL:
        return Verdict("after_terminal", f"{new.value} after terminal {current.value}")
    if _STAGE[new] < _STAGE[current]:
        return Verdict("out_of_order", f"{new.value} after {current.value}")
    return Verdict("illegal", f"{new.value} is not allowed from {current.value}")


_UPDATE = """
UPDATE tasks SET
    status = %(status)s,
    progress = CASE WHEN %(progress)s::smallint IS NOT NULL THEN %(progress)s::smallint
                    WHEN %(status)s = 'COMPLETED' THEN 100 ELSE progress END,
    result = coalesce(%(result)s, result),
    error = coalesce(%(error)s, error),
    assigned_at = coalesce(assigned_at, clock_timestamp()),
    started_at = CASE WHEN %(status)s = 'IN_PROGRESS' THEN coalesce(started_at, clock_timestamp())
                      ELSE started_at END,
    finished_at = CASE WHEN %(terminal)s THEN clock_timestamp() ELSE finished_at END,
    next_publish_at = NULL,
    updated_at = now()
 WHERE task_id = %(task_id)s
"""

_SEEN = """
SELECT 1 FROM task_events
 WHERE task_id = %s AND agent_id = %s AND status = %s AND source = 'agent'
   AND detail->>'agent_ts' = %s
 LIMIT 1
"""

_EVENT = """
INSERT INTO task_events (time, task_id, agent_id, status, previous_status, source,
                         correlation_id, progress, detail, accepted, reason)
VALUES (clock_timestamp(), %(task_id)s, %(agent_id)s, %(status)s, %(previous)s, 'agent',
        %(correlation_id)s, %(progress)s, %(detail)s, %(accepted)s, %(reason)s)
"""


def _progress(value: float | None) -> int | None:
    return None if value is None else round(value)


@handles(Kind.TASK_STATUS)
async def handle_task_status(conn: psycopg.AsyncConnection[Any], item: Inbound) -> None:
    assert item.agent_id is not None
    agent_id: str = item.agent_id  # the topic's: the broker's ACL bound it to the account
    report: TaskStatusReport = item.model
    cur = await conn.execute(
        "SELECT agent_id, status, progress, correlation_id FROM tasks"
        " WHERE task_id = %s FOR UPDATE",
        (report.task_id,),
    )
    row = await cur.fetchone()
    if row is None:
        metrics.TASK_REPORTS.labels("unknown_task").inc()
        raise Rejected("unknown_task", f"task-status: no task {report.task_id}")
    owner, current_text, current_progress, task_correlation = row
    agent_ts = report.ts.isoformat()
    # The very message already recorded: a QoS 1 redelivery, or the same report handled
    # by another bridge (plain subscriptions: each bridge gets every report). A new
    # statement, so it sees what the lock holder committed.
    cur = await conn.execute(_SEEN, (report.task_id, agent_id, report.status.value, agent_ts))
    if await cur.fetchone() is not None:
        metrics.TASK_REPORTS.labels("repeat").inc()
        return
    current = TaskStatus(current_text)
    extra = report.model_extra or {}
    correlation = extra.get("correlation_id")
    detail: dict[str, Any] = {"agent_ts": agent_ts}
    if report.error is not None:
        detail["error"] = report.error[:1000]
    event = {
        "task_id": report.task_id,
        "agent_id": agent_id,
        "status": report.status.value,
        "previous": current.value,
        "correlation_id": correlation if isinstance(correlation, str) else task_correlation,
        "progress": _progress(report.progress),
        "detail": Jsonb(detail),
    }

    if owner != agent_id:
        # The ACL lets an agent publish only on its own topics, but nothing stops it
        # from naming another agent's task_id in the payload.
        metrics.TASK_REPORTS.labels("foreign").inc()
        await conn.execute(
            _EVENT,
            event
            | {"accepted": False, "reason": f"foreign: reported by {agent_id}, task of {owner}"},
        )
        await conn.execute(
            "INSERT INTO security_events (time, agent_id, event, detail)"
            " VALUES (now(), %s, 'foreign_task_report', %s)",
            (
                agent_id,
                Jsonb(
                    {"task_id": str(report.task_id), "owner": owner, "status": report.status.value}
                ),
            ),
        )
        log.warning(
            "an agent reported on another agent's task",
            extra={"agent_id": agent_id, "task_id": str(report.task_id), "owner": owner},
        )
        return

    verdict = judge_report(current, report.status, current_progress, report.progress)
    metrics.TASK_REPORTS.labels(verdict.outcome).inc()
    if verdict.applies:
        await conn.execute(
            _UPDATE,
            {
                "task_id": report.task_id,
                "status": report.status.value,
                "progress": _progress(report.progress),
                "result": Jsonb(report.result) if report.result is not None else None,
                "error": report.error,
                "terminal": report.status in TERMINAL,
            },
        )
    await conn.execute(_EVENT, event | {"accepted": verdict.applies, "reason": verdict.reason})


async def _owe_on_lost_session(
    conn: psycopg.AsyncConnection[Any], agent_id: str, status: Status
) -> None:
    # session_present false: the broker lost the agent's queue (session expired, broker
    # restarted without its store, never connected before). Absent (an agent that does
    # not say) is treated alike: a duplicate is harmless, a lost task is not.
    if status.state is AgentState.ONLINE and status.session_present is not True:
        n = await owe_again(conn, agent_id)
        if n:
            log.info("republishing tasks to an agent without its session",
                     extra={"agent_id": agent_id, "tasks": n})  # fmt: skip


STATUS_HOOKS.append(_owe_on_lost_session)
