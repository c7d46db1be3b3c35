"""The task domain: every statement that reads or changes a task, and its history.

SPEC "Tasks: lifecycle and the offline queue"; docs/tasks.md. The lifecycle's rules
are the pure function `schemas.states.task_transition_allowed`; this module applies
them to the database. Its callers are thin: the CLI (`create_tasks`, `cancel_task`),
the bridge's outbox (`claim_due`, `mark_sent`, `expire`), its sweeps (`sweep`), the
task-status handler (`apply_reports`) and the status handler (`owe_again`).

Every task transition, and every report that changed nothing, leaves one row in
task_events, and `record_events` is the only place that writes them.

Everything here runs in the caller's transaction: a task row and its event commit
together, and so does the NOTIFY that wakes the outbox.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from schemas.constants import (
    OUTBOX_CHANNEL,
    TASK_DEFAULT_EXPIRES_IN_S,
    TASK_DEFAULT_TIMEOUT_S,
)
from schemas.events import EventKind
from schemas.payloads import TaskStatusReport
from schemas.states import TERMINAL, UNSTARTED, Platform, TaskStatus, TaskType
from schemas.states import task_transition_allowed as allowed
from service import logs, metrics
from service.domains import events
from service.domains.events import NewEvent
from service.domains.security import as_events, security_event_async
from service.domains.targets import Target, target_where

log = logging.getLogger("eucora.tasks")

Conn = psycopg.AsyncConnection[Any]
Source = Literal["agent", "server", "operator"]
_S = TaskStatus

# For rows written without expires_at (the CLI always sets it).
_EXPIRES = (
    f"coalesce(t.expires_at, t.created_at + make_interval(secs => {TASK_DEFAULT_EXPIRES_IN_S}))"
)


def _states(*states: TaskStatus) -> list[str]:
    return [s.value for s in states]


def _from(new: TaskStatus) -> list[str]:
    """The states the lifecycle lets a task leave for `new` (server transitions)."""
    return [s.value for s in TaskStatus if allowed(s, new)]


# --- history -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskEvent:
    task_id: uuid.UUID
    agent_id: str
    status: str
    previous: str | None
    source: Source
    correlation_id: str | None
    reason: str | None = None
    progress: int | None = None
    detail: dict[str, Any] | None = None
    accepted: bool = True
    # Only in the task.created event (task_events does not repeat the task's row).
    type: str | None = None
    deployment_id: uuid.UUID | None = None

    def event(self) -> NewEvent:
        """The event of an accepted row: task.created, or task.status."""
        data: dict[str, Any] = {
            "task_id": str(self.task_id),
            "status": self.status,
            "previous_status": self.previous,
            "source": self.source,
            "progress": self.progress,
            "reason": self.reason,
            "detail": self.detail,
        }
        if self.previous is None:
            data |= {
                "type": self.type,
                "deployment_id": None if self.deployment_id is None else str(self.deployment_id),
            }
        kind = EventKind.TASK_CREATED if self.previous is None else EventKind.TASK_STATUS
        return NewEvent(kind, self.agent_id, data, self.correlation_id)


_RECORD = """
INSERT INTO task_events (time, task_id, agent_id, status, previous_status, source,
                         correlation_id, progress, detail, accepted, reason)
SELECT clock_timestamp(), e.* FROM unnest(
    %b::uuid[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::smallint[],
    %b::jsonb[], %b::bool[], %b::text[]) AS e
"""


async def record_events(
    conn: Conn, history: Sequence[TaskEvent], *, events_too: bool = True
) -> None:
    """The one writer of task_events; each accepted row is also one event (recorded
    here, or with events_too=False by the caller, among its other events)."""
    if not history:
        return
    await conn.execute(
        _RECORD,
        (
            [e.task_id for e in history],
            [e.agent_id for e in history],
            [e.status for e in history],
            [e.previous for e in history],
            [e.source for e in history],
            [e.correlation_id for e in history],
            [e.progress for e in history],
            [None if e.detail is None else Jsonb(e.detail) for e in history],
            [e.accepted for e in history],
            [e.reason for e in history],
        ),
    )
    if events_too:
        await events.record(conn, [e.event() for e in history if e.accepted])


async def notify_outbox(conn: Conn) -> None:
    """Wake the outbox at commit (it polls besides, for writers that do not notify)."""
    await conn.execute("SELECT pg_notify(%s, '')", (OUTBOX_CHANNEL,))


# --- operator commands ---------------------------------------------------------------


class TaskError(Exception):
    """A request that cannot be done (unknown task, already finished...)."""


_CREATE = """
INSERT INTO tasks (agent_id, type, payload, timeout_seconds, expires_at, correlation_id,
                   created_by, deployment_id)
SELECT agent_id, %(type)s, %(payload)s, %(timeout)s,
       now() + make_interval(secs => %(expires_in)s), %(correlation_id)s, %(created_by)s,
       %(deployment_id)s
  FROM agents a WHERE {where}
RETURNING task_id, agent_id, status, correlation_id
"""


async def create_tasks(
    conn: Conn,
    *,
    type_: TaskType,
    payload: dict[str, Any],
    agents: list[str] | None = None,
    tags: dict[str, str] | None = None,
    platform: Platform | None = None,
    timeout: int = TASK_DEFAULT_TIMEOUT_S,  # noqa: ASYNC109 (the task's, not ours)
    expires_in: float = TASK_DEFAULT_EXPIRES_IN_S,
    correlation_id: str | None = None,
    created_by: str | None = None,
    deployment_id: uuid.UUID | None = None,
) -> list[dict[str, Any]]:
    """One PENDING task per matching agent, with its 'created' event and a NOTIFY to the
    outbox. Sorted by agent id."""
    target = Target(agents or [], tags or {}, platform)
    if target.empty:
        raise ValueError("no target")
    where, target_params = target_where(target)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        _CREATE.format(where=where),
        {
            **target_params,
            "type": type_.value,
            "payload": Jsonb(payload),
            "timeout": timeout,
            "expires_in": expires_in,
            "correlation_id": correlation_id or str(uuid.uuid4()),
            "created_by": created_by,
            "deployment_id": deployment_id,
        },
    )
    rows = sorted(await cur.fetchall(), key=lambda r: r["agent_id"])
    await record_events(
        conn,
        [
            TaskEvent(
                r["task_id"], r["agent_id"], r["status"], None, "operator", r["correlation_id"],
                "created", detail={"created_by": created_by}, type=type_.value,
                deployment_id=deployment_id,
            )
            for r in rows
        ],
    )  # fmt: skip
    if rows:
        await notify_outbox(conn)
    return [
        {
            "task_id": str(r["task_id"]),
            "agent_id": r["agent_id"],
            "status": r["status"],
            "correlation_id": r["correlation_id"],
        }
        for r in rows
    ]


@dataclass(frozen=True)
class Cancelled:
    task_id: uuid.UUID
    agent_id: str
    previous: str
    agent_told: bool


async def cancel_task(
    conn: Conn, task_id: uuid.UUID, *, force: bool = False, by: str | None = None
) -> Cancelled:
    """CANCELLED now: PENDING or ASSIGNED, IN_PROGRESS only with `force`. An agent that
    may have the task (it was published) is sent {"cancel": task_id} by the outbox."""
    # The row lock waits for an outbox round that is publishing this task, so
    # `attempts` below says whether the agent may have it.
    cur = await conn.execute(
        "SELECT agent_id, status, attempts, correlation_id FROM tasks"
        " WHERE task_id = %s FOR UPDATE",
        (task_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise TaskError(f"no task {task_id}")
    agent_id, status, attempts, correlation_id = row
    if status in TERMINAL:
        raise TaskError(f"task {task_id} is already {status}")
    if status == _S.IN_PROGRESS and not force:
        raise TaskError(
            f"task {task_id} is IN_PROGRESS on {agent_id}: use --force to cancel it "
            "(the agent is told to stop)"
        )
    tell = attempts > 0
    await conn.execute(
        "UPDATE tasks SET status = %(new)s, finished_at = now(), updated_at = now(),"
        " cancel_requested = %(tell)s, next_publish_at = CASE WHEN %(tell)s THEN now() END"
        " WHERE task_id = %(id)s",
        {"id": task_id, "tell": tell, "new": _S.CANCELLED.value},
    )
    await record_events(
        conn,
        [
            TaskEvent(
                task_id, agent_id, _S.CANCELLED.value, status, "operator", correlation_id,
                "cancelled with --force" if force else "cancelled",
                detail={"by": by, "agent_told": tell},
            )
        ],
    )  # fmt: skip
    if tell:
        await notify_outbox(conn)
    return Cancelled(task_id, agent_id, status, tell)


_CANCEL_UNSTARTED = """
UPDATE tasks t SET status = %(new)s, finished_at = now(), updated_at = now(),
       cancel_requested = t.attempts > 0,
       next_publish_at = CASE WHEN t.attempts > 0 THEN now() END,
       error = coalesce(t.error, %(reason)s)
  FROM (SELECT task_id, status FROM tasks WHERE task_id = ANY(%(ids)b) AND status = ANY(%(from)b)
         ORDER BY task_id FOR UPDATE) old
 WHERE t.task_id = old.task_id
RETURNING t.task_id, t.agent_id, t.correlation_id, old.status, t.attempts > 0
"""


async def cancel_unstarted(
    conn: Conn, task_ids: Sequence[uuid.UUID], *, reason: str, source: Source = "server"
) -> list[uuid.UUID]:
    """CANCELLED for those of `task_ids` the agent has not started (PENDING, ASSIGNED);
    an agent that may have one is sent its cancel. Returns the ids cancelled."""
    if not task_ids:
        return []
    cur = await conn.execute(
        _CANCEL_UNSTARTED,
        {
            "ids": list(task_ids),
            "from": _states(*UNSTARTED),
            "new": _S.CANCELLED.value,
            "reason": reason,
        },
    )
    rows = await cur.fetchall()
    await record_events(
        conn,
        [
            TaskEvent(tid, agent, _S.CANCELLED.value, previous, source, corr, reason,
                      detail={"agent_told": told})
            for tid, agent, corr, previous, told in rows
        ],
    )  # fmt: skip
    if any(told for *_, told in rows):
        await notify_outbox(conn)
    return [r[0] for r in rows]


async def cancel_command(
    conn: Conn, correlation_id: str, *, force: bool = False, by: str | None = None
) -> tuple[list[Cancelled], list[str]]:
    """Cancel every unfinished task of one command (its correlation id): the tasks
    cancelled, and why the others were not (IN_PROGRESS without `force`)."""
    cur = await conn.execute(
        "SELECT task_id FROM tasks WHERE correlation_id = %s AND status <> ALL(%s)"
        " ORDER BY agent_id, task_id",
        (correlation_id, _states(*TERMINAL)),
    )
    done: list[Cancelled] = []
    refused: list[str] = []
    for (task_id,) in await cur.fetchall():
        try:
            done.append(await cancel_task(conn, task_id, force=force, by=by))
        except TaskError as exc:
            refused.append(str(exc))
    return done, refused


# --- server transitions: sweeps and the outbox ---------------------------------------

_TIMEOUT = """
WITH due AS (
    SELECT task_id, status FROM tasks
     WHERE status = ANY(%(from)b)
       AND CASE WHEN status = %(running)s
                THEN coalesce(started_at, assigned_at, updated_at)
                ELSE coalesce(assigned_at, updated_at) END
           + make_interval(secs => timeout_seconds) <= now()
     ORDER BY task_id
     FOR UPDATE SKIP LOCKED
)
UPDATE tasks t SET status = %(new)s, finished_at = now(), updated_at = now(),
       error = coalesce(t.error, 'no outcome within ' || t.timeout_seconds
                                 || ' s after it was ' || lower(due.status)),
       cancel_requested = true, next_publish_at = now()
  FROM due WHERE t.task_id = due.task_id
RETURNING t.task_id, t.agent_id, t.correlation_id, due.status, t.timeout_seconds
"""

_EXPIRE = f"""
WITH due AS (
    SELECT task_id FROM tasks t
     WHERE status = %(pending)s AND {_EXPIRES} <= now()
       AND (%(ids)b::uuid[] IS NULL OR task_id = ANY(%(ids)b::uuid[]))
     ORDER BY task_id
     FOR UPDATE SKIP LOCKED
)
UPDATE tasks t SET status = %(new)s, finished_at = now(), updated_at = now(),
       error = coalesce(t.error, 'not delivered before expires_at'), next_publish_at = NULL
  FROM due WHERE t.task_id = due.task_id
RETURNING t.task_id, t.agent_id, t.correlation_id
"""


async def time_out(conn: Conn) -> int:
    """TIMEOUT: IN_PROGRESS for longer than timeout_seconds since it started, or
    ASSIGNED that long since it arrived (the agent went silent). The agent is told to
    stop (a cancel through the outbox): whatever it still does no longer counts."""
    cur = await conn.execute(
        _TIMEOUT,
        {"from": _from(_S.TIMEOUT), "running": _S.IN_PROGRESS.value, "new": _S.TIMEOUT.value},
    )
    rows = await cur.fetchall()
    await record_events(
        conn,
        [
            TaskEvent(tid, agent, _S.TIMEOUT.value, previous, "server", corr,
                      f"timeout: {timeout_s} s")
            for tid, agent, corr, previous, timeout_s in rows
        ],
    )  # fmt: skip
    if rows:
        await notify_outbox(conn)  # the cancels are owed now
    return len(rows)


async def expire(conn: Conn, ids: Sequence[uuid.UUID] | None = None) -> int:
    """EXPIRED: still PENDING (never acknowledged by the agent) at expires_at; all such
    tasks, or only `ids`. Nothing is sent: the broker drops the queued copy at its
    message expiry, and an agent checks expires_at before it starts anything."""
    cur = await conn.execute(
        _EXPIRE,
        {"pending": _S.PENDING.value, "new": _S.EXPIRED.value, "ids": ids},
    )
    rows = await cur.fetchall()
    await record_events(
        conn,
        [
            TaskEvent(tid, agent, _S.EXPIRED.value, _S.PENDING.value, "server", corr,
                      "expired before delivery")
            for tid, agent, corr in rows
        ],
    )  # fmt: skip
    return len(rows)


async def sweep(conn: Conn) -> dict[str, int]:
    """One pass of both sweeps; counts per new status. With several bridges, rows are
    claimed with SKIP LOCKED and re-checked under the lock: each transition once."""
    counts = {_S.TIMEOUT.value: await time_out(conn), _S.EXPIRED.value: await expire(conn)}
    for status, n in counts.items():
        if n:
            metrics.TASKS_SWEPT.labels(status).inc(n)
    return counts


# A redelivery (attempts > 0) of a task command waits for the agent to be online; first
# publications go into the agent's persistent session, online or not, and so do cancels.
_CLAIM = f"""
SELECT t.task_id, t.agent_id, t.type, t.payload, t.status, t.timeout_seconds,
       {_EXPIRES} AS expires_at, t.correlation_id, t.deployment_id, t.created_at, t.attempts,
       t.cancel_requested, {_EXPIRES} <= now() AS expired,
       greatest(1, ceil(extract(epoch FROM {_EXPIRES} - now())))::bigint AS expiry_s,
       coalesce(a.broker_id, %(default_broker)s) AS broker_id
  FROM tasks t LEFT JOIN agents a ON a.agent_id = t.agent_id
 WHERE t.next_publish_at <= now()
   AND (%(brokers)b::integer[] IS NULL
        OR coalesce(a.broker_id, %(default_broker)s) = ANY(%(brokers)b::integer[]))
   AND (t.attempts = 0 OR t.cancel_requested OR t.status <> ALL(%(unstarted)s)
        OR (a.status = 'online' AND NOT a.stale))
 ORDER BY t.next_publish_at
 LIMIT %(limit)s
 FOR UPDATE OF t SKIP LOCKED
"""

_SENT = """
UPDATE tasks t SET
    attempts = t.attempts + CASE WHEN u.what = 'command' THEN 1 ELSE 0 END,
    published_at = CASE WHEN u.what = 'command' THEN clock_timestamp() ELSE t.published_at END,
    next_publish_at = CASE WHEN u.what = 'command' AND t.status = %(pending)s
                           THEN clock_timestamp() + make_interval(
                               secs => %(redelivery)s * power(2, least(t.attempts, 3))) END,
    updated_at = now()
  FROM unnest(%(ids)b::uuid[], %(what)b::text[]) AS u(id, what)
 WHERE t.task_id = u.id
"""


BACKLOG_CAP: Final = 100_000  # a bounded count stays cheap whatever the backlog


async def count_due(conn: Conn) -> int:
    """How many task messages are due now (the outbox's backlog), up to BACKLOG_CAP:
    an index range scan of tasks_outbox_idx."""
    cur = await conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE next_publish_at <= now() LIMIT %s) due",
        (BACKLOG_CAP,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def claim_due(
    conn: Conn, limit: int, brokers: list[int] | None = None, default_broker: int | None = None
) -> list[dict[str, Any]]:
    """Rows owed a message now, locked until the caller's transaction ends (another
    bridge skips them). `brokers`: only agents whose home broker is one of these (the
    links that are up; None: any); agents without a home count as `default_broker`'s,
    which is also the `broker_id` their rows carry."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        _CLAIM,
        {
            "limit": limit,
            "unstarted": _states(*UNSTARTED),
            "brokers": brokers,
            "default_broker": default_broker,
        },
    )
    return await cur.fetchall()


async def mark_sent(conn: Conn, sent: Sequence[tuple[uuid.UUID, str]], redelivery_s: float) -> None:
    """After the broker's PUBACK (or for rows owed nothing any more, `what` "skip"): a
    command counts an attempt and, while PENDING, is due again after the redelivery
    interval (doubling per attempt, up to 8 x); anything else is owed nothing."""
    if sent:
        await conn.execute(
            _SENT,
            {
                "ids": [tid for tid, _ in sent],
                "what": [what for _, what in sent],
                "redelivery": redelivery_s,
                "pending": _S.PENDING.value,
            },
        )


async def mark_unpublishable(conn: Conn, row: dict[str, Any], why: str) -> None:
    """Only a writer that bypassed the CLI's checks gets here (e.g. a payload over the
    size limit): say so in the task's history rather than retry forever."""
    reason = f"unpublishable: {' '.join(why.split())[:300]}"
    await record_events(
        conn,
        [
            TaskEvent(row["task_id"], row["agent_id"], row["status"], row["status"], "server",
                      row["correlation_id"], reason, accepted=False)
        ],
    )  # fmt: skip
    log.error("task cannot be published", extra={**task_log_fields(row), "why": why})


def task_log_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The ids a log line about a task row carries (SPEC "Logs")."""
    return {
        "agent_id": row["agent_id"],
        "task_id": str(row["task_id"]),
        "correlation_id": row.get("correlation_id"),
        "deployment_id": str(row["deployment_id"]) if row.get("deployment_id") else None,
    }


# What an agent that came back without its session is owed again: its open tasks that
# can still start, and the cancels of tasks that could still be running there (an
# agent stops a task itself at timeout_seconds).
_OWE_AGAIN = f"""
UPDATE tasks t SET next_publish_at = now()
 WHERE t.agent_id = ANY(%(agents)b)
   AND (t.next_publish_at IS NULL OR t.next_publish_at > now())
   AND ((t.status = ANY(%(unstarted)b) AND NOT t.cancel_requested AND {_EXPIRES} > now())
        OR (t.cancel_requested
            AND t.finished_at > now() - make_interval(secs => t.timeout_seconds)))
RETURNING t.agent_id
"""


async def owe_again(conn: Conn, agent_ids: Sequence[str]) -> dict[str, int]:
    """Owe these agents their open tasks again (they came back without their session):
    they are published on the outbox's next round. Returns the count per agent owed
    anything."""
    if not agent_ids:
        return {}
    cur = await conn.execute(
        _OWE_AGAIN, {"agents": sorted(set(agent_ids)), "unstarted": _states(*UNSTARTED)}
    )
    owed: dict[str, int] = {}
    for (agent_id,) in await cur.fetchall():
        owed[agent_id] = owed.get(agent_id, 0) + 1
    if owed:
        metrics.TASKS_OWED_AGAIN.inc(sum(owed.values()))
        await notify_outbox(conn)
    return owed


# --- agent reports -------------------------------------------------------------------

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
    if allowed(current, new, source="agent"):
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


# One statement per round of a batch's reports (round k: each task's k-th report that
# applies), so that no task appears twice in one UPDATE ... FROM.
_APPLY = """
UPDATE tasks t SET
    status = u.status,
    progress = CASE WHEN u.progress IS NOT NULL THEN u.progress
                    WHEN u.status = %(completed)s THEN 100 ELSE t.progress END,
    result = coalesce(u.result, t.result),
    error = coalesce(u.error, t.error),
    assigned_at = coalesce(t.assigned_at, clock_timestamp()),
    started_at = CASE WHEN u.status = %(running)s THEN coalesce(t.started_at, clock_timestamp())
                      ELSE t.started_at END,
    finished_at = CASE WHEN u.terminal THEN clock_timestamp() ELSE t.finished_at END,
    next_publish_at = NULL,
    updated_at = now()
  FROM unnest(%(ids)b::uuid[], %(statuses)b::text[], %(progress)b::smallint[],
              %(results)b::jsonb[], %(errors)b::text[], %(terminal)b::bool[])
       AS u(task_id, status, progress, result, error, terminal)
 WHERE t.task_id = u.task_id
"""

# Which reports were recorded already: a QoS 1 redelivery, or the same report handled
# by another bridge (plain subscriptions: each bridge gets every report).
_SEEN = """
SELECT u.n FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::text[])
       WITH ORDINALITY AS u(task_id, agent_id, status, agent_ts, n)
 WHERE EXISTS (
        SELECT 1 FROM task_events e
         WHERE e.task_id = u.task_id AND e.agent_id = u.agent_id AND e.status = u.status
           AND e.source = 'agent' AND e.detail->>'agent_ts' = u.agent_ts)
"""


@dataclass(frozen=True)
class ReportOutcome:
    outcome: str  # a Verdict outcome, or "repeat" / "foreign" / "unknown_task"
    task_id: uuid.UUID
    owner: str | None = None
    deployment_id: uuid.UUID | None = None
    status: TaskStatus | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _progress(value: float | None) -> int | None:
    return None if value is None else round(value)


async def apply_reports(
    conn: Conn, reports: Sequence[tuple[str, TaskStatusReport]]
) -> list[ReportOutcome]:
    """Apply agents' task-status reports (a batch's, in arrival order; each `agent_id`
    is its topic's: the broker's ACL bound it to the account), one outcome per report.
    A fixed number of statements however many there are: the tasks' rows are locked
    first (sorted), so the copies of a report that two bridges handle at once serialise
    and the second judges against the first one's result; then the reports already
    recorded are found in one query, every report is judged here against what the ones
    before it left, and the changes are written set-wise. A report on a task that does
    not exist gets the outcome "unknown_task" and writes nothing."""
    if not reports:
        return []
    cur = await conn.execute(
        "SELECT task_id, agent_id, status, progress, correlation_id, deployment_id FROM tasks"
        " WHERE task_id = ANY(%b) ORDER BY task_id FOR UPDATE",
        (sorted({r.task_id for _, r in reports}),),
    )
    tasks: dict[uuid.UUID, list[Any]] = {row[0]: list(row[1:]) for row in await cur.fetchall()}
    # A new statement after the locks: it sees what their holders committed.
    cur = await conn.execute(
        _SEEN,
        (
            [r.task_id for _, r in reports],
            [agent_id for agent_id, _ in reports],
            [r.status.value for _, r in reports],
            [r.ts.isoformat() for _, r in reports],
        ),
    )
    seen = {n - 1 for (n,) in await cur.fetchall()}
    recorded: set[tuple[uuid.UUID, str, str, str]] = set()
    outcomes: list[ReportOutcome] = []
    history: list[TaskEvent] = []
    foreign: list[tuple[str, dict[str, Any]]] = []
    ordered: list[NewEvent] = []  # the events of history and foreign, in order
    rounds: list[dict[uuid.UUID, TaskStatusReport]] = []  # see _APPLY
    applied_before: dict[uuid.UUID, int] = {}
    for i, (agent_id, report) in enumerate(reports):
        task = tasks.get(report.task_id)
        if task is None:
            metrics.TASK_REPORTS.labels("unknown_task").inc()
            outcomes.append(ReportOutcome("unknown_task", report.task_id))
            continue
        owner, current_text, current_progress, task_correlation, deployment_id = task
        agent_ts = report.ts.isoformat()
        key = (report.task_id, agent_id, report.status.value, agent_ts)
        if i in seen or key in recorded:
            metrics.TASK_REPORTS.labels("repeat").inc()
            outcomes.append(ReportOutcome("repeat", report.task_id, owner))
            continue
        recorded.add(key)
        current = TaskStatus(current_text)
        correlation = (report.model_extra or {}).get("correlation_id")
        detail: dict[str, Any] = {"agent_ts": agent_ts}
        if report.error is not None:
            detail["error"] = report.error[:1000]

        base = TaskEvent(
            report.task_id, agent_id, report.status.value, current.value, "agent",
            correlation if isinstance(correlation, str) else task_correlation,
            None, _progress(report.progress), detail,
        )  # fmt: skip

        fields = {"agent_id": agent_id, "task_id": report.task_id,
                  "correlation_id": task_correlation, "deployment_id": deployment_id}  # fmt: skip
        if owner != agent_id:
            # The ACL lets an agent publish only on its own topics, but nothing stops it
            # from naming another agent's task_id in the payload.
            metrics.TASK_REPORTS.labels("foreign").inc()
            reason = f"foreign: reported by {agent_id}, task of {owner}"
            history.append(replace(base, accepted=False, reason=reason))
            foreign.append((agent_id, {"task_id": str(report.task_id), "owner": owner,
                                       "status": report.status.value}))  # fmt: skip
            ordered += as_events("foreign_task_report", foreign[-1:])
            with logs.context(**fields):
                log.warning("an agent reported on another agent's task", extra={"owner": owner})
            outcomes.append(ReportOutcome("foreign", report.task_id, owner))
            continue

        verdict = judge_report(current, report.status, current_progress, report.progress)
        metrics.TASK_REPORTS.labels(verdict.outcome).inc()
        if verdict.applies:
            # The row as this report leaves it, for the reports after it in the batch.
            task[1] = report.status.value
            if report.progress is not None:
                task[2] = _progress(report.progress)
            elif report.status is _S.COMPLETED:
                task[2] = 100
            k = applied_before.get(report.task_id, 0)
            applied_before[report.task_id] = k + 1
            if k == len(rounds):
                rounds.append({})
            rounds[k][report.task_id] = report
        history.append(replace(base, accepted=verdict.applies, reason=verdict.reason))
        if verdict.applies:
            ordered.append(history[-1].event())
        # One line per task at INFO (its outcome); the steps before it at DEBUG.
        with logs.context(**fields):
            log.log(
                logging.INFO if verdict.applies and report.status in TERMINAL else logging.DEBUG,
                "task report",
                extra={"status": report.status.value, "outcome": verdict.outcome},
            )
        status = report.status if verdict.applies else None
        outcomes.append(
            ReportOutcome(verdict.outcome, report.task_id, owner, deployment_id, status)
        )
    for applied in rounds:
        ids = sorted(applied)
        await conn.execute(
            _APPLY,
            {
                "ids": ids,
                "statuses": [applied[t].status.value for t in ids],
                "progress": [_progress(applied[t].progress) for t in ids],
                "results": [
                    None if applied[t].result is None else Jsonb(applied[t].result) for t in ids
                ],
                "errors": [applied[t].error for t in ids],
                "terminal": [applied[t].status in TERMINAL for t in ids],
                "completed": _S.COMPLETED.value,
                "running": _S.IN_PROGRESS.value,
            },
        )
    await record_events(conn, history, events_too=False)
    await security_event_async(conn, "foreign_task_report", foreign, events_too=False)
    await events.record(conn, ordered)  # in the reports' order
    return outcomes
