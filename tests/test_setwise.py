"""A batch's status messages, registrations, inventories and task reports are applied
set-wise (service/domains/, docs/ingest.md): what the database holds afterwards must
be what the same messages leave when each is stored on its own, in the same order.

The same scenario is written twice into one database: for agents `a-*` as one batch
(one transaction), for agents `b-*` one message per batch. It has what makes a batch
harder than one message: several messages of one agent or task in the batch (a task
ASSIGNED, IN_PROGRESS twice, COMPLETED; offline then online again), a repeat within
the batch, older messages after newer ones, a foreign and an unknown task. Then every
table a user reads is compared, with the two prefixes and the task ids mapped away.
What must survive besides: the unknown task's report is a dead letter, nothing else
is refused. Real PostgreSQL; no broker (the store is driven directly).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest

from schemas.constants import WILL_REASON
from schemas.topics import Kind, TopicTree
from schemas.validate import parse
from service.bridge import store as store_module
from service.bridge.message import Inbound
from service.bridge.routes import default_routes
from service.bridge.store import Store

TREE = TopicTree()
T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def register(hostname: str, at: float, **extra: Any) -> dict[str, Any]:
    return {
        "hostname": hostname, "platform": "linux", "os_version": "Debian 12",
        "agent_version": "1.0.0", "ip_address": "10.0.0.1", "mac_address": "52:54:00:00:00:01",
        "hardware": {"cpu_count": 2, "memory_bytes": 2**31, "disk_bytes": 2**34},
        "tags": {"site": "fra1"}, "ts": ts(at), **extra,
    }  # fmt: skip


def software(*items: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": n, "version": v, "publisher": "Debian"} for n, v in items]


def report(task: str, status: str, at: float, **extra: Any) -> dict[str, Any]:
    return {"task_id": task, "status": status, "ts": ts(at), **extra}


def scenario(p: str, tasks: dict[str, str]) -> list[tuple[str, Kind, dict[str, Any]]]:
    """(agent, kind, payload) in arrival order; agents named p-1.., tasks by label."""
    one, two, three = f"{p}-1", f"{p}-2", f"{p}-3"
    status = Kind.STATUS
    return [
        (one, status, {"state": "online", "epoch": 100, "ts": ts(0), "session_present": True}),
        (two, status, {"state": "online", "epoch": 500, "ts": ts(0), "session_present": True}),
        (one, status, {"state": "offline", "epoch": 100, "ts": ts(1), "reason": WILL_REASON}),
        (two, status, {"state": "offline", "epoch": 400, "ts": ts(1), "reason": WILL_REASON}),
        (one, status, {"state": "online", "epoch": 200, "ts": ts(2), "session_present": False}),
        (two, status, {"state": "offline", "epoch": 400, "ts": ts(1), "reason": WILL_REASON}),
        (two, status, {"state": "online", "epoch": 500, "ts": ts(0), "session_present": True}),
        (three, status, {"state": "offline", "epoch": 300, "ts": ts(3), "reason": "shutdown"}),
        (one, Kind.REGISTER, register("host-1", 10)),
        (two, Kind.REGISTER, register("host-2", 10)),
        (one, Kind.REGISTER, register("host-1b", 20, tags={"site": "par1"})),
        (one, Kind.REGISTER, register("host-1-old", 5)),
        (two, Kind.REGISTER, register("host-2", 30)),
        (one, Kind.INVENTORY, {"ts": ts(10), "software": software(("a", "1"), ("b", "1"))}),
        (two, Kind.INVENTORY, {"ts": ts(10), "software": software(("x", "1"))}),
        (one, Kind.INVENTORY, {"ts": ts(20), "software": software(("a", "2"), ("c", "1"))}),
        (one, Kind.INVENTORY, {"ts": ts(5), "software": software(("old", "1"))}),
        (two, Kind.INVENTORY, {"ts": ts(30), "software": software(("x", "1"))}),
        (one, Kind.TASK_STATUS, report(tasks["t1"], "ASSIGNED", 40)),
        (one, Kind.TASK_STATUS, report(tasks["t2"], "ASSIGNED", 40)),
        (one, Kind.TASK_STATUS, report(tasks["t1"], "IN_PROGRESS", 41, progress=10)),
        (one, Kind.TASK_STATUS, report(tasks["t1"], "IN_PROGRESS", 42, progress=50)),
        (one, Kind.TASK_STATUS, report(tasks["t1"], "IN_PROGRESS", 42, progress=50)),  # repeat
        (one, Kind.TASK_STATUS, report(tasks["t1"], "IN_PROGRESS", 43, progress=30)),
        (one, Kind.TASK_STATUS, report(tasks["t2"], "FAILED", 44, error="exit 1")),
        (one, Kind.TASK_STATUS, report(tasks["t1"], "COMPLETED", 45, result={"ok": True})),
        (one, Kind.TASK_STATUS, report(tasks["t2"], "IN_PROGRESS", 46)),  # after terminal
        (one, Kind.TASK_STATUS, report(tasks["t3"], "ASSIGNED", 47)),  # foreign: two's task
        (two, Kind.TASK_STATUS, report(tasks["t3"], "ASSIGNED", 48)),
        (two, Kind.TASK_STATUS, report(tasks["unknown"], "ASSIGNED", 49)),  # unknown task
    ]


def inbound(mid: int, agent: str, kind: Kind, doc: dict[str, Any]) -> Inbound:
    payload = orjson.dumps(doc)
    item = Inbound(mid, 1, 0, TREE.agent(agent, kind), agent, kind, payload=payload)
    item.accept(parse(kind, agent, payload))
    return item


def make_tasks(conn: psycopg.Connection[Any], p: str) -> dict[str, str]:
    """t1, t2 for p-1 (owed later than now: the session-less online must owe them
    again), t3 for p-2; and an id of no task."""
    made = {}
    for label, agent in (("t1", f"{p}-1"), ("t2", f"{p}-1"), ("t3", f"{p}-2")):
        conn.execute("INSERT INTO agents (agent_id) VALUES (%s) ON CONFLICT DO NOTHING", (agent,))
        row = conn.execute(
            "INSERT INTO tasks (agent_id, type, next_publish_at, expires_at, created_by)"
            " VALUES (%s, 'HEALTHCHECK', now() + interval '1 hour', now() + interval '1 day',"
            " %s) RETURNING task_id",
            (agent, label),
        ).fetchone()
        assert row is not None
        made[label] = str(row[0])
    made["unknown"] = str(uuid.uuid4())  # no such task
    return made


def store_all(database: str, batches: Sequence[Sequence[Inbound]]) -> None:
    async def run() -> None:
        store = Store(database, default_routes())
        await store.open()
        try:
            for batch in batches:
                await store.flush(batch)
        finally:
            await store.close()

    asyncio.run(run())


def snapshot(conn: psycopg.Connection[Any], p: str, tasks: dict[str, str]) -> dict[str, Any]:
    """What a user reads about the scenario's agents and tasks, with the prefix and the
    task ids replaced by labels. Change rows are sorted by content: their `time` is the
    transaction's, so one batch gives them all one time."""
    label = {v: k for k, v in tasks.items()}

    def norm(value: Any) -> Any:
        text = re.sub(rf"(?<![\w-]){p}-(?=\d)", "X-", orjson.dumps(value, default=str).decode())
        for task_id, name in label.items():
            text = text.replace(task_id, name)
        return orjson.loads(text)

    def q(sql: str) -> Any:
        return norm(conn.execute(sql, (f"{p}-%",)).fetchall())

    return {
        "agents": q(
            "SELECT agent_id, status, status_epoch, status_reason, session_present, hostname,"
            " tags, registration_ts, registered_at IS NOT NULL, inventory_ts,"
            " inventory_updated_at IS NOT NULL, stale FROM agents WHERE agent_id LIKE %s"
            " ORDER BY agent_id"
        ),
        "status_events": q(
            "SELECT agent_id, state, epoch, reason, source, session_present, accepted"
            " FROM agent_status_events WHERE agent_id LIKE %s ORDER BY agent_id, time"
        ),
        "agent_changes": q(
            "SELECT agent_id, field, old_value, new_value FROM agent_changes"
            " WHERE agent_id LIKE %s ORDER BY agent_id, field, time"
        ),
        "inventory": q(
            "SELECT agent_id, name, version, publisher FROM inventory WHERE agent_id LIKE %s"
            " ORDER BY agent_id, name"
        ),
        "inventory_changes": q(
            "SELECT agent_id, name, change, old_version, new_version FROM inventory_changes"
            " WHERE agent_id LIKE %s ORDER BY agent_id, name, change, old_version NULLS FIRST"
        ),
        "tasks": q(
            "SELECT created_by, status, progress, result, error, assigned_at IS NOT NULL,"
            " started_at IS NOT NULL, finished_at IS NOT NULL, next_publish_at IS NULL"
            " FROM tasks WHERE agent_id LIKE %s ORDER BY created_by"
        ),
        "task_events": q(
            "SELECT e.task_id, e.agent_id, e.status, e.previous_status, e.accepted, e.reason,"
            " e.progress, e.detail FROM task_events e JOIN tasks t USING (task_id)"
            " WHERE t.agent_id LIKE %s ORDER BY t.created_by, e.time"
        ),
        "events": q(
            "SELECT agent_id, agent_seq, kind, data - 'epoch' FROM events"
            " WHERE agent_id LIKE %s ORDER BY agent_id, agent_seq"
        ),
        "security_events": q(
            "SELECT agent_id, event, count(*) FROM security_events WHERE agent_id LIKE %s"
            " GROUP BY 1, 2 ORDER BY 1, 2"
        ),
        "dead_letters": q(
            "SELECT agent_id, kind, reason FROM dead_letters WHERE agent_id LIKE %s"
            " ORDER BY agent_id"
        ),
    }


def test_a_batch_is_stored_as_its_messages_one_by_one(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        tasks = {p: make_tasks(conn, p) for p in ("a", "b")}
    items = {
        p: [inbound(i, *m) for i, m in enumerate(scenario(p, tasks[p]), 1)] for p in ("a", "b")
    }
    store_all(database, [items["a"]])  # one batch, one transaction
    store_all(database, [[item] for item in items["b"]])  # one message per batch

    with psycopg.connect(database, autocommit=True) as conn:
        batched, single = snapshot(conn, "a", tasks["a"]), snapshot(conn, "b", tasks["b"])
    for table in batched:
        assert batched[table] == single[table], table

    # And the scenario is what it says (so the comparison compares something).
    agents = {row[0]: row for row in batched["agents"]}
    assert agents["X-1"][1:5] == ["online", 200, None, False]
    assert agents["X-1"][5:7] == ["host-1b", {"site": "par1"}]
    assert agents["X-2"][1:3] == ["online", 500]
    assert [r[6] for r in batched["status_events"] if r[0] == "X-2"] == [True, False]
    assert batched["inventory"] == [
        ["X-1", "a", "2", "Debian"], ["X-1", "c", "1", "Debian"], ["X-2", "x", "1", "Debian"]
    ]  # fmt: skip
    assert batched["tasks"] == [
        ["t1", "COMPLETED", 100, {"ok": True}, None, True, True, True, True],
        ["t2", "FAILED", None, None, "exit 1", True, False, True, True],
        ["t3", "ASSIGNED", None, None, None, True, False, False, True],
    ]
    outcomes = [(r[0], r[2], r[4], r[5]) for r in batched["task_events"]]
    assert ("t1", "IN_PROGRESS", False, "progress 30 after 50") in outcomes
    assert ("t2", "IN_PROGRESS", False, "IN_PROGRESS after terminal FAILED") in outcomes
    assert sum(1 for o in outcomes if o[0] == "t1" and o[1] == "IN_PROGRESS") == 3  # not the repeat
    assert ["X-1", "foreign_task_report", 1] in batched["security_events"]
    assert batched["dead_letters"] == [["X-2", "task-status", "unknown_task"]]


class CountingCursor(psycopg.AsyncCursor[Any]):
    """Counts the statements the store sends (COPY aside)."""

    statements = 0

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        CountingCursor.statements += 1
        return await super().execute(*args, **kwargs)


def test_a_fleets_batch_takes_a_fixed_number_of_statements(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a fleet coming online (status, registration, inventory) and answering a
    task (ASSIGNED, COMPLETED) sends: 5 messages per agent. Stored message by message
    that was about 5 statements per message; set-wise it must not grow with the batch."""

    async def connect(url: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(url, cursor_factory=CountingCursor)

    monkeypatch.setattr(store_module, "connect_async", connect)

    def statements(n: int) -> int:
        p = f"n{n}"
        with psycopg.connect(database, autocommit=True) as conn:
            tasks = {}
            for i in range(n):
                conn.execute("INSERT INTO agents (agent_id) VALUES (%s)", (f"{p}-{i}",))
                row = conn.execute(
                    "INSERT INTO tasks (agent_id, type, expires_at, created_by) VALUES"
                    " (%s, 'HEALTHCHECK', now() + interval '1 day', 'x') RETURNING task_id",
                    (f"{p}-{i}",),
                ).fetchone()
                assert row is not None
                tasks[i] = str(row[0])
        online = {"state": "online", "epoch": 1, "ts": ts(0), "session_present": True}
        batch: list[Inbound] = []
        for i in range(n):
            agent = f"{p}-{i}"
            docs = [
                (Kind.STATUS, online),
                (Kind.REGISTER, register(f"host-{i}", 1)),
                (Kind.INVENTORY, {"ts": ts(1), "software": software(("a", "1"), ("b", "2"))}),
                (Kind.TASK_STATUS, report(tasks[i], "ASSIGNED", 2)),
                (Kind.TASK_STATUS, report(tasks[i], "COMPLETED", 3, result={"ok": True})),
            ]
            batch += [inbound(len(batch) + 1, agent, kind, doc) for kind, doc in docs]
        before = CountingCursor.statements
        store_all(database, [batch])
        with psycopg.connect(database) as conn:
            done = conn.execute(
                "SELECT count(*) FROM tasks WHERE agent_id LIKE %s AND status = 'COMPLETED'",
                (f"{p}-%",),
            ).fetchone()
        assert done == (n,)  # stored, not skipped
        return CountingCursor.statements - before

    small, large = statements(10), statements(200)
    assert large == small, (small, large)
    assert large < 40, large  # one by one: ~5 statements per message, 5,000 here
