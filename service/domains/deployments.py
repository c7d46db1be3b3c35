"""The deployment domain: rollouts of one software change to a fixed set of agents.

docs/deployments.md has the rules; the state machines are schemas.states'
(`deployment_transition_allowed`, `deployment_agent_transition_allowed`). Everything
here runs in the caller's transaction:

- `create` (CLI): the deployment and one PENDING row per target, fixed from now on.
- `step` (the bridge's rollout engine, with the deployment's row locked): settles the
  targets whose DEPLOY task ended, aborts past the threshold, starts the next agents
  within the rate and the in-flight cap, completes.
- `apply_report` (the deployment-status route): an agent's own report.
- `abort`, `rollback` (CLI): an operator's decision.

Each target gets at most one DEPLOY task and one rollback task (a unique index on
tasks backs this up), whatever the bridges and restarts in between: a target is
started in the same transaction that records its task, under the deployment's lock.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel

from schemas.constants import (
    DEPLOYMENT_ABORT_MIN_FINISHED,
    DEPLOYMENTS_CHANNEL,
    TASK_DEFAULT_EXPIRES_IN_S,
    TASK_DEFAULT_TIMEOUT_S,
)
from schemas.events import EventKind
from schemas.payloads import DeploymentStatusReport
from schemas.states import (
    DEPLOYMENT_AGENT_FINISHED,
    DEPLOYMENT_TERMINAL,
    TERMINAL,
    DeploymentAgentStatus,
    DeploymentState,
    Platform,
    TaskStatus,
    TaskType,
    deployment_agent_transition_allowed,
    deployment_transition_allowed,
)
from service import metrics
from service.domains import events, tasks
from service.domains.events import NewEvent
from service.domains.targets import Target, target_where

log = logging.getLogger("eucora.deployments")

Conn = psycopg.AsyncConnection[Any]
Source = Literal["agent", "server", "operator"]
_A = DeploymentAgentStatus
_D = DeploymentState
_T = TaskStatus

ACTIVE: Final = (_D.PENDING, _D.RUNNING, _D.ROLLING_BACK)
# The rate's credit: a deployment never starts more than this many seconds' worth of
# agents at once after a pause (the cap was full, the bridge was down).
CREDIT_S: Final = 1.0


class DeploymentError(Exception):
    """A request that cannot be done (unknown deployment, nothing matches...)."""


class UnknownDeployment(Exception):
    """A report naming a deployment that does not exist, or an agent it does not target."""


def _values(*states: Any) -> list[str]:
    return [s.value for s in states]


async def notify(conn: Conn) -> None:
    """Wake the rollout engine at commit (it polls besides)."""
    await conn.execute("SELECT pg_notify(%s, '')", (DEPLOYMENTS_CHANNEL,))


# --- history -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentEvent:
    deployment_id: uuid.UUID
    agent_id: str
    status: str
    previous: str | None
    source: Source
    progress: int | None = None
    message: str | None = None
    accepted: bool = True
    reason: str | None = None
    agent_ts: datetime | None = None

    def event(self) -> NewEvent:
        return NewEvent(
            EventKind.DEPLOYMENT_AGENT,
            self.agent_id,
            {
                "deployment_id": str(self.deployment_id),
                "status": self.status,
                "previous_status": self.previous,
                "source": self.source,
                "progress": self.progress,
                "message": self.message,
                "reason": self.reason,
            },
        )


_RECORD = """
INSERT INTO deployment_status_events (time, deployment_id, agent_id, status, previous_status,
                                      source, progress, message, accepted, reason, agent_ts)
SELECT clock_timestamp(), e.* FROM unnest(
    %s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::smallint[], %s::text[],
    %s::bool[], %s::text[], %s::timestamptz[]) AS e
"""


async def record_events(conn: Conn, history: Sequence[AgentEvent]) -> None:
    """The one writer of deployment_status_events; each accepted row is also one event."""
    if not history:
        return
    await conn.execute(
        _RECORD,
        (
            [e.deployment_id for e in history],
            [e.agent_id for e in history],
            [e.status for e in history],
            [e.previous for e in history],
            [e.source for e in history],
            [e.progress for e in history],
            [e.message for e in history],
            [e.accepted for e in history],
            [e.reason for e in history],
            [e.agent_ts for e in history],
        ),
    )
    await events.record(conn, [e.event() for e in history if e.accepted])


_SET = """
UPDATE deployment_status ds SET
    status = u.status,
    progress = CASE WHEN u.status IN ('SUCCESS', 'ROLLBACK') THEN 100 ELSE ds.progress END,
    finished_at = CASE WHEN u.finished THEN coalesce(ds.finished_at, now()) END,
    failed = ds.failed OR u.failed,
    reason = coalesce(u.reason, ds.reason),
    updated_at = now()
  FROM unnest(%s::text[], %s::text[], %s::bool[], %s::bool[], %s::text[])
       AS u(agent_id, status, finished, failed, reason)
 WHERE ds.deployment_id = %s AND ds.agent_id = u.agent_id
"""


async def _settle(
    conn: Conn,
    deployment_id: uuid.UUID,
    moves: Sequence[tuple[str, str, DeploymentAgentStatus, bool, str]],
    source: Source,
) -> None:
    """Server-side per-target transitions: (agent, previous, new, failed, reason)."""
    if not moves:
        return
    await conn.execute(
        _SET,
        (
            [m[0] for m in moves],
            [m[2].value for m in moves],
            [m[2] in DEPLOYMENT_AGENT_FINISHED for m in moves],
            [m[3] for m in moves],
            [m[4] for m in moves],
            deployment_id,
        ),
    )
    await record_events(
        conn,
        [
            AgentEvent(deployment_id, a, new.value, prev, source, reason=why)
            for a, prev, new, _, why in moves
        ],
    )
    for _, _, new, _, _ in moves:
        metrics.DEPLOYMENT_AGENTS.labels(new.value).inc()


# --- create --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """How a deployment proceeds (None: no limit)."""

    rate_per_minute: int | None = None
    max_in_flight: int | None = None
    abort_after_count: int | None = None
    abort_after_percent: float | None = None
    abort_min_finished: int = DEPLOYMENT_ABORT_MIN_FINISHED
    expires_in_s: int = TASK_DEFAULT_EXPIRES_IN_S


async def create(
    conn: Conn,
    *,
    payload: dict[str, Any],
    agents: list[str] | None = None,
    tags: dict[str, str] | None = None,
    platform: Platform | None = None,
    rollout: Rollout = Rollout(),
    intent_id: str | None = None,
    created_by: str | None = None,
) -> dict[str, Any]:
    """The deployment and its fixed target set (PENDING rows); the engine starts it."""
    chosen = Target(agents or [], tags or {}, platform)
    if chosen.empty:
        raise ValueError("no target")
    where, target_params = target_where(chosen)
    target = {"agents": agents, "tags": tags, "platform": platform.value if platform else None}
    cur = await conn.execute(
        """
        INSERT INTO deployments (payload, target, rate_per_minute, max_in_flight,
                                 abort_after_count, abort_after_percent, abort_min_finished,
                                 expires_in_s, intent_id, created_by)
        VALUES (%(payload)s, %(target)s, %(rate)s, %(cap)s, %(count)s, %(percent)s,
                %(min_finished)s, %(expires)s, %(intent)s, %(by)s)
        RETURNING deployment_id, status, correlation_id
        """,
        {
            "payload": Jsonb(payload),
            "target": Jsonb({k: v for k, v in target.items() if v}),
            "rate": rollout.rate_per_minute,
            "cap": rollout.max_in_flight,
            "count": rollout.abort_after_count,
            "percent": rollout.abort_after_percent,
            "min_finished": rollout.abort_min_finished,
            "expires": rollout.expires_in_s,
            "intent": intent_id,
            "by": created_by,
        },
    )
    row = await cur.fetchone()
    assert row is not None
    deployment_id, status, correlation_id = row
    cur = await conn.execute(
        f"""
        INSERT INTO deployment_status (deployment_id, agent_id, status)
        SELECT %(id)s, agent_id, %(pending)s FROM agents a WHERE {where}
        RETURNING agent_id
        """,
        {"id": deployment_id, "pending": _A.PENDING.value, **target_params},
    )
    targets = sorted(r[0] for r in await cur.fetchall())
    missing = sorted(set(agents or []) - set(targets))
    if missing:
        raise DeploymentError(f"unknown agent(s): {', '.join(missing)}; no deployment created")
    if not targets:
        raise DeploymentError("no agent matches; no deployment created")
    await conn.execute(
        "UPDATE deployments SET targets = %s WHERE deployment_id = %s",
        (len(targets), deployment_id),
    )
    created = {
        "deployment_id": str(deployment_id),
        "intent_id": intent_id,
        "status": status,
        "targets": len(targets),
        "created_by": created_by,
    }
    await events.record(
        conn, [NewEvent(EventKind.DEPLOYMENT_CREATED, None, created, correlation_id)]
    )
    await notify(conn)
    return {"deployment_id": str(deployment_id), "status": status, "targets": len(targets)}


# --- the rollout engine's step -------------------------------------------------------

# Targets whose DEPLOY (or rollback) task ended while the target is still open.
_ENDED = """
SELECT ds.agent_id, ds.status, t.status AS task_status, t.error, false AS rollback,
       t.expires_at <= coalesce(t.finished_at, now()) AS expired
  FROM deployment_status ds JOIN tasks t ON t.task_id = ds.task_id
 WHERE ds.deployment_id = %(id)s AND ds.finished_at IS NULL AND t.status = ANY(%(terminal)s)
UNION ALL
SELECT ds.agent_id, ds.status, t.status, t.error, true, false
  FROM deployment_status ds JOIN tasks t ON t.task_id = ds.rollback_task_id
 WHERE ds.deployment_id = %(id)s AND ds.status = %(success)s AND t.status = ANY(%(terminal)s)
"""

_COUNTS = """
SELECT count(*) FILTER (WHERE finished_at IS NOT NULL) AS finished,
       count(*) FILTER (WHERE failed) AS failed,
       count(*) FILTER (WHERE started_at IS NOT NULL AND finished_at IS NULL) AS in_flight,
       count(*) FILTER (WHERE started_at IS NULL AND finished_at IS NULL) AS unstarted,
       count(*) FILTER (WHERE rollback_task_id IS NOT NULL AND status = %(success)s)
           AS rolling_back,
       count(*) AS targets
  FROM deployment_status WHERE deployment_id = %(id)s
"""


def _outcome(
    task_status: TaskStatus, current: DeploymentAgentStatus, expired: bool = False
) -> tuple[_A, bool]:
    """What a target becomes when its DEPLOY task ended without the agent saying.
    `expired`: the task's expires_at had passed when it ended."""
    if task_status is _T.COMPLETED:
        return _A.SUCCESS, False
    never_started = task_status in (_T.EXPIRED, _T.CANCELLED) or (
        # The agent got it after expires_at, before the server's sweep, and refused it:
        # the same "never started" as EXPIRED, not a failure of the deployment.
        task_status is _T.REJECTED and expired
    )
    if never_started and current is _A.PENDING:
        return _A.SKIPPED, False
    return _A.FAILED, True


async def _reconcile(conn: Conn, deployment_id: uuid.UUID) -> None:
    cur = await conn.execute(
        _ENDED,
        {"id": deployment_id, "terminal": _values(*TERMINAL), "success": _A.SUCCESS.value},
    )
    moves: list[tuple[str, str, DeploymentAgentStatus, bool, str]] = []
    for agent_id, status, task_status, error, rollback, expired in await cur.fetchall():
        current, ended = _A(status), _T(task_status)
        if rollback:
            new, failed = (_A.ROLLBACK, False) if ended is _T.COMPLETED else (_A.FAILED, True)
            why = f"rollback task {ended.value}"
        else:
            new, failed = _outcome(ended, current, bool(expired))
            why = f"DEPLOY task {ended.value}" + (f": {error[:200]}" if error else "")
        if deployment_agent_transition_allowed(current, new):
            moves.append((agent_id, current.value, new, failed, why))
    await _settle(conn, deployment_id, moves, "server")


@dataclass(frozen=True)
class Counts:
    finished: int
    failed: int
    in_flight: int
    unstarted: int
    rolling_back: int
    targets: int


async def counts(conn: Conn, deployment_id: uuid.UUID) -> Counts:
    cur = await conn.execute(_COUNTS, {"id": deployment_id, "success": _A.SUCCESS.value})
    row = await cur.fetchone()
    assert row is not None
    return Counts(*row)


def threshold_passed(d: dict[str, Any], c: Counts) -> str | None:
    """Why the deployment must abort now, or None (pure)."""
    if d["abort_after_count"] is not None and c.failed >= d["abort_after_count"]:
        return f"{c.failed} failures (abort after {d['abort_after_count']})"
    pct = d["abort_after_percent"]
    if (
        pct is not None
        and c.finished >= max(1, d["abort_min_finished"])
        and c.failed * 100 > pct * c.finished
    ):
        return (
            f"{c.failed} of {c.finished} finished agents failed"
            f" ({c.failed * 100 / c.finished:.1f}% > {pct:g}%)"
        )
    return None


def starts_allowed(d: dict[str, Any], c: Counts, now: datetime) -> tuple[int, datetime | None]:
    """How many targets may start now, and the rate's next start time (pure).

    The cap: never more than max_in_flight started and unfinished. The rate: one start
    every 60/rate s, from `next_start_at`; credit for a pause is kept to CREDIT_S s."""
    n = c.unstarted
    if d["max_in_flight"] is not None:
        n = min(n, max(0, d["max_in_flight"] - c.in_flight))
    rate = d["rate_per_minute"]
    if rate is None or n <= 0:
        return max(n, 0), d["next_start_at"]
    interval = 60.0 / rate
    credit = max(CREDIT_S, interval)
    base = max(d["next_start_at"] or now, now - timedelta(seconds=credit))
    if base > now:
        return 0, d["next_start_at"]
    budget = math.floor((now - base).total_seconds() / interval) + 1
    n = min(n, budget)
    return n, base + timedelta(seconds=n * interval)


async def _start(conn: Conn, d: dict[str, Any], n: int) -> int:
    deployment_id = d["deployment_id"]
    cur = await conn.execute(
        "SELECT agent_id FROM deployment_status WHERE deployment_id = %s"
        " AND started_at IS NULL AND finished_at IS NULL ORDER BY agent_id LIMIT %s",
        (deployment_id, n),
    )
    chosen = [r[0] for r in await cur.fetchall()]
    if not chosen:
        return 0
    made = await tasks.create_tasks(
        conn,
        type_=TaskType.DEPLOY,
        payload=d["payload"] | {"deployment_id": str(deployment_id)},
        agents=chosen,
        expires_in=d["expires_in_s"],
        correlation_id=d["correlation_id"],
        created_by=d["created_by"],
        deployment_id=deployment_id,
    )
    by_agent = {m["agent_id"]: uuid.UUID(m["task_id"]) for m in made}
    await conn.execute(
        """
        UPDATE deployment_status ds SET task_id = u.task_id, started_at = now(), updated_at = now()
          FROM unnest(%s::text[], %s::uuid[]) AS u(agent_id, task_id)
         WHERE ds.deployment_id = %s AND ds.agent_id = u.agent_id
        """,
        (list(by_agent), list(by_agent.values()), deployment_id),
    )
    gone = [a for a in chosen if a not in by_agent]  # deleted since the deployment was made
    skipped = [(a, _A.PENDING.value, _A.SKIPPED, False, "agent deleted") for a in gone]
    await _settle(conn, deployment_id, skipped, "server")
    metrics.DEPLOYMENT_STARTS.inc(len(by_agent))
    return len(by_agent)


async def _set_state(
    conn: Conn, deployment_id: uuid.UUID, current: DeploymentState, new: DeploymentState, why: str
) -> None:
    assert deployment_transition_allowed(current, new), (current, new)
    cur = await conn.execute(
        """
        UPDATE deployments SET status = %(new)s, status_reason = %(why)s, updated_at = now(),
               started_at = CASE WHEN %(new)s = %(running)s THEN now() ELSE started_at END,
               finished_at = CASE WHEN %(final)s THEN now() ELSE finished_at END
         WHERE deployment_id = %(id)s
        RETURNING intent_id, correlation_id
        """,
        {
            "id": deployment_id,
            "new": new.value,
            "why": why,
            "running": _D.RUNNING.value,
            "final": new in DEPLOYMENT_TERMINAL,
        },
    )
    row = await cur.fetchone()
    assert row is not None
    data = {
        "deployment_id": str(deployment_id),
        "intent_id": row[0],
        "status": new.value,
        "previous_status": current.value,
        "reason": why,
    }
    await events.record(conn, [NewEvent(EventKind.DEPLOYMENT_STATUS, None, data, row[1])])
    metrics.DEPLOYMENTS.labels(new.value).inc()
    log.info(
        "deployment state",
        extra={"deployment_id": str(deployment_id), "status": new.value, "why": why},
    )


async def claim_active(conn: Conn, skip: Sequence[uuid.UUID]) -> dict[str, Any] | None:
    """One active deployment, locked for this transaction (another bridge skips it)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        # An ABORTED one too while agents are still at work: their outcome is settled.
        "SELECT *, clock_timestamp() AS db_now FROM deployments d"
        " WHERE (status = ANY(%s) OR (status = %s AND EXISTS (SELECT 1 FROM deployment_status s"
        "        WHERE s.deployment_id = d.deployment_id AND s.finished_at IS NULL)))"
        " AND deployment_id <> ALL(%s)"
        " ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        (_values(*ACTIVE), _D.ABORTED.value, list(skip)),
    )
    return await cur.fetchone()


async def step(conn: Conn, d: dict[str, Any], now: datetime) -> Counts:
    """One step of a locked, active deployment (see the module's docstring)."""
    deployment_id = d["deployment_id"]
    state = _D(d["status"])
    if state is _D.PENDING:
        await _set_state(conn, deployment_id, state, _D.RUNNING, "started")
        state = _D.RUNNING
        d = d | {"next_start_at": None}
    await _reconcile(conn, deployment_id)
    c = await counts(conn, deployment_id)
    if state is _D.ABORTED:
        return c  # nothing starts; the agents still at work are settled above
    if state is _D.ROLLING_BACK:
        if c.rolling_back == 0:
            await _set_state(conn, deployment_id, state, _D.ROLLED_BACK, "rollback finished")
        return c
    why = threshold_passed(d, c)
    if why is not None:
        await _abort(conn, deployment_id, state, why, "server")
        return await counts(conn, deployment_id)
    n, next_start = starts_allowed(d, c, now)
    if n:
        started = await _start(conn, d, n)
        await conn.execute(
            "UPDATE deployments SET next_start_at = %s, updated_at = now()"
            " WHERE deployment_id = %s",
            (next_start, deployment_id),
        )
        c = await counts(conn, deployment_id)
        log.debug("agents started", extra={"deployment_id": str(deployment_id), "n": started})
    if c.finished == c.targets:
        await _set_state(conn, deployment_id, state, _D.COMPLETED, "every target finished")
    return c


# --- operator decisions --------------------------------------------------------------


async def _lock(conn: Conn, deployment_id: uuid.UUID) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT * FROM deployments WHERE deployment_id = %s FOR UPDATE", (deployment_id,)
    )
    d = await cur.fetchone()
    if d is None:
        raise DeploymentError(f"no deployment {deployment_id}")
    return d


async def _abort(
    conn: Conn, deployment_id: uuid.UUID, state: DeploymentState, why: str, source: Source
) -> None:
    """ABORTED: nobody new starts; unstarted DEPLOY tasks are CANCELLED and their targets
    SKIPPED, like the targets never started; agents already at work finish."""
    await _set_state(conn, deployment_id, state, _D.ABORTED, why)
    # Targets the agent has not said it started (PENDING): their task, if the agent has
    # not started it either, is cancelled.
    cur = await conn.execute(
        "SELECT task_id FROM deployment_status WHERE deployment_id = %s"
        " AND finished_at IS NULL AND task_id IS NOT NULL AND status = %s",
        (deployment_id, _A.PENDING.value),
    )
    cancelled = await tasks.cancel_unstarted(
        conn,
        [r[0] for r in await cur.fetchall()],
        reason=f"deployment aborted: {why}",
        source=source,
    )
    cur = await conn.execute(
        "SELECT agent_id, status FROM deployment_status WHERE deployment_id = %s"
        " AND finished_at IS NULL AND status = %s AND (started_at IS NULL OR task_id = ANY(%s))",
        (deployment_id, _A.PENDING.value, cancelled),
    )
    await _settle(
        conn, deployment_id,
        [(a, s, _A.SKIPPED, False, "deployment aborted") for a, s in await cur.fetchall()],
        source,
    )  # fmt: skip


async def abort(conn: Conn, deployment_id: uuid.UUID, *, by: str | None = None) -> str:
    d = await _lock(conn, deployment_id)
    state = _D(d["status"])
    if not deployment_transition_allowed(state, _D.ABORTED):
        raise DeploymentError(f"deployment {deployment_id} is {state.value}: nothing to abort")
    await _abort(conn, deployment_id, state, f"aborted by {by or 'an operator'}", "operator")
    await notify(conn)
    return state.value


async def rollback(conn: Conn, deployment_id: uuid.UUID, *, by: str | None = None) -> int:
    """Every target that reported SUCCESS gets a DEPLOY task with "rollback": true;
    returns how many."""
    d = await _lock(conn, deployment_id)
    state = _D(d["status"])
    if not deployment_transition_allowed(state, _D.ROLLING_BACK):
        hint = " (abort it first)" if state is _D.RUNNING else ""
        raise DeploymentError(
            f"deployment {deployment_id} is {state.value}: cannot roll back{hint}"
        )
    cur = await conn.execute(
        "SELECT agent_id FROM deployment_status WHERE deployment_id = %s AND status = %s"
        " AND rollback_task_id IS NULL ORDER BY agent_id",
        (deployment_id, _A.SUCCESS.value),
    )
    agents = [r[0] for r in await cur.fetchall()]
    if not agents:
        raise DeploymentError(f"deployment {deployment_id}: no agent reported SUCCESS")
    made = await tasks.create_tasks(
        conn,
        type_=TaskType.DEPLOY,
        payload=d["payload"] | {"deployment_id": str(deployment_id), "rollback": True},
        agents=agents,
        timeout=TASK_DEFAULT_TIMEOUT_S,
        expires_in=d["expires_in_s"],
        correlation_id=d["correlation_id"],
        created_by=by,
        deployment_id=deployment_id,
    )
    await conn.execute(
        """
        UPDATE deployment_status ds SET rollback_task_id = u.task_id, updated_at = now()
          FROM unnest(%s::text[], %s::uuid[]) AS u(agent_id, task_id)
         WHERE ds.deployment_id = %s AND ds.agent_id = u.agent_id
        """,
        ([m["agent_id"] for m in made], [uuid.UUID(m["task_id"]) for m in made], deployment_id),
    )
    await _set_state(
        conn, deployment_id, state, _D.ROLLING_BACK, f"rollback by {by or 'an operator'}"
    )
    await notify(conn)
    return len(made)


# --- agent reports -------------------------------------------------------------------


@dataclass(frozen=True)
class ReportOutcome:
    # accepted, received, progress, repeat, duplicate, illegal, after_final, not_started
    outcome: str
    reason: str | None = None


def judge(
    current: DeploymentAgentStatus,
    new: DeploymentAgentStatus,
    *,
    started: bool,
    current_progress: float,
    new_progress: float,
) -> ReportOutcome:
    """What an agent's report does to its target (pure)."""
    if not started:
        return ReportOutcome("not_started", "no DEPLOY task was sent to this agent yet")
    if new == current:
        if new is _A.IN_PROGRESS and new_progress > current_progress:
            return ReportOutcome("progress")
        if new is _A.PENDING:
            return ReportOutcome("received")  # the agent's "got it, queued": kept as news
        return ReportOutcome("duplicate", f"duplicate {new.value}")
    if deployment_agent_transition_allowed(current, new):
        return ReportOutcome("accepted")
    if current in (_A.ROLLBACK, _A.SKIPPED) or (current in DEPLOYMENT_AGENT_FINISHED):
        return ReportOutcome("after_final", f"{new.value} after {current.value}")
    return ReportOutcome("illegal", f"{new.value} is not allowed from {current.value}")


async def apply_report(conn: Conn, agent_id: str, report: DeploymentStatusReport) -> ReportOutcome:
    """Apply an agent's deployment-status report (`agent_id` is the topic's). Raises
    UnknownDeployment for a deployment that does not exist or does not target it."""
    cur = await conn.execute(
        "SELECT ds.status, ds.progress, ds.started_at IS NOT NULL, d.status"
        "  FROM deployment_status ds JOIN deployments d USING (deployment_id)"
        " WHERE ds.deployment_id = %s AND ds.agent_id = %s FOR UPDATE OF ds",
        (report.deployment_id, agent_id),
    )
    row = await cur.fetchone()
    if row is None:
        metrics.DEPLOYMENT_REPORTS.labels("unknown").inc()
        raise UnknownDeployment(
            f"deployment-status: {report.deployment_id} does not target {agent_id}"
        )
    status, progress, started, deployment_state = row
    current = _A(status)
    cur = await conn.execute(
        "SELECT 1 FROM deployment_status_events WHERE deployment_id = %s AND agent_id = %s"
        " AND status = %s AND source = 'agent' AND agent_ts = %s LIMIT 1",
        (report.deployment_id, agent_id, report.status.value, report.ts),
    )
    if await cur.fetchone() is not None:  # a QoS 1 redelivery, or another bridge's copy
        metrics.DEPLOYMENT_REPORTS.labels("repeat").inc()
        return ReportOutcome("repeat")
    verdict = judge(
        current, report.status, started=started, current_progress=progress,
        new_progress=report.progress,
    )  # fmt: skip
    metrics.DEPLOYMENT_REPORTS.labels(verdict.outcome).inc()
    applies = verdict.outcome in ("accepted", "received", "progress")
    new_progress = round(report.progress)
    if applies:
        new = report.status
        # A rollback the agent did on its own, during the rollout, is a failed deployment.
        failed = new is _A.FAILED or (
            new is _A.ROLLBACK and deployment_state != _D.ROLLING_BACK.value
        )
        await conn.execute(
            """
            UPDATE deployment_status SET status = %(status)s, progress = %(progress)s,
                   message = coalesce(%(message)s, message), reported_at = %(ts)s,
                   finished_at = CASE WHEN %(finished)s THEN coalesce(finished_at, now()) END,
                   failed = failed OR %(failed)s, updated_at = now()
             WHERE deployment_id = %(id)s AND agent_id = %(agent)s
            """,
            {
                "status": new.value,
                "progress": new_progress,
                "message": report.message,
                "ts": report.ts,
                "finished": new in DEPLOYMENT_AGENT_FINISHED,
                "failed": failed,
                "id": report.deployment_id,
                "agent": agent_id,
            },
        )
        if new is not current:
            metrics.DEPLOYMENT_AGENTS.labels(new.value).inc()
            await notify(conn)
    await record_events(
        conn,
        [
            AgentEvent(
                report.deployment_id, agent_id, report.status.value, current.value, "agent",
                new_progress, report.message, applies, verdict.reason, report.ts,
            )
        ],
    )  # fmt: skip
    return verdict


# --- what operators read -------------------------------------------------------------


class TargetView(BaseModel):
    agent_id: str
    status: str
    progress: int
    task_id: uuid.UUID | None
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    message: str | None = None
    reason: str | None = None
    rollback_task_id: uuid.UUID | None = None


class DeploymentView(BaseModel):
    """`eucora deployments show`: SPEC's fields first, then the rollout's settings."""

    deployment_id: uuid.UUID
    intent_id: str | None
    status: str
    targets: int
    counts: dict[str, int]
    progress: float  # finished targets, percent
    agents: list[TargetView] = []
    status_reason: str | None = None
    in_flight: int = 0
    failed: int = 0
    payload: dict[str, Any] = {}
    target: dict[str, Any] = {}
    rate_per_minute: int | None = None
    max_in_flight: int | None = None
    abort_after_count: int | None = None
    abort_after_percent: float | None = None
    abort_min_finished: int = DEPLOYMENT_ABORT_MIN_FINISHED
    correlation_id: str = ""
    created_by: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def settled(self) -> bool:
        """Terminal, with nobody at work any more (what `--wait` waits for)."""
        return (
            _D(self.status) in DEPLOYMENT_TERMINAL
            and self.in_flight == 0
            and not (self.counts.get(_A.SUCCESS.value, 0) and self.status == _D.ROLLING_BACK.value)
        )


_VIEW_COUNTS = """
SELECT status, count(*) FROM deployment_status WHERE deployment_id = %s GROUP BY status
"""


async def describe(
    conn: Conn, deployment_id: uuid.UUID, *, with_agents: bool = True
) -> DeploymentView | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT * FROM deployments WHERE deployment_id = %s", (deployment_id,))
    d = await cur.fetchone()
    if d is None:
        return None
    c = await counts(conn, deployment_id)
    per_state = {s.value: 0 for s in DeploymentAgentStatus}
    for status, n in await (await conn.execute(_VIEW_COUNTS, (deployment_id,))).fetchall():
        per_state[status] = n
    agents: list[TargetView] = []
    if with_agents:
        await cur.execute(
            "SELECT agent_id, status, progress, task_id, updated_at, started_at, finished_at,"
            " message, reason, rollback_task_id FROM deployment_status"
            " WHERE deployment_id = %s ORDER BY agent_id",
            (deployment_id,),
        )
        agents = [TargetView.model_validate(r) for r in await cur.fetchall()]
    return DeploymentView.model_validate(
        d
        | {
            "counts": per_state,
            "progress": round(100.0 * c.finished / c.targets, 1) if c.targets else 100.0,
            "agents": agents,
            "in_flight": c.in_flight,
            "failed": c.failed,
            "targets": c.targets,
        }
    )


async def listing(conn: Conn, *, limit: int = 100) -> list[DeploymentView]:
    cur = await conn.execute(
        "SELECT deployment_id FROM deployments ORDER BY created_at DESC LIMIT %s", (limit,)
    )
    views = [await describe(conn, r[0], with_agents=False) for r in await cur.fetchall()]
    return [v for v in views if v is not None]
