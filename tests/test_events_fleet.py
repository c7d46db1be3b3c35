"""Every state change of a scripted fleet is exactly one event: real broker, bridge
process and database (docs/events.md).

Three agents are provisioned, connect and register, report inventory, re-register
with a change, run a task, take part in a rollout where one fails, send a message
that is dead-lettered, go offline and stale, and one is revoked. The events are then
compared with the state-history tables row for row, not with counts written here.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import jsonschema
import orjson
import psycopg
from typer.testing import CliRunner

from cli.access import provision_fleet
from cli.main import app as eucora
from schemas.events import EventKind
from schemas.generate import SCHEMA_DIR
from schemas.topics import Kind
from service import identity
from service.db.connect import connect
from service.domains import accounts, events
from service.stack.broker import Broker
from tests.fix_services import BridgeProcess, register_broker
from tests.test_deployments import FAST, DeployAgent, create, wait_state
from tests.test_tasks import Db, db, now, wait_online

__all__ = ["db"]  # fixture

AGENTS = ["ev-a1", "ev-a2", "ev-a3"]
PRESENCE = (EventKind.AGENT_ONLINE, EventKind.AGENT_OFFLINE, EventKind.AGENT_STALE)


def _software(*items: tuple[str, str]) -> bytes:
    return orjson.dumps({"ts": now(), "software": [{"name": n, "version": v} for n, v in items]})


def _all_events(database: str) -> list[Any]:
    """The whole stream through the safe cursor, in pages of 7."""
    got: list[Any] = []
    cursor = events.START
    with psycopg.connect(database, autocommit=True) as conn:
        while True:
            page, cursor = events.read_after_sync(conn, cursor, limit=7)
            if not page:
                return got
            got.extend(page)


def _script(broker: Broker, bridge_factory: Any, database: str, db: Db) -> BridgeProcess:
    register_broker(broker, database)
    passwords = {a: identity.new_password() for a in AGENTS}
    with connect(database) as conn:
        provision_fleet(conn, broker.auth, passwords)
    bridge = bridge_factory(broker, database, EUCORA_OFFLINE_AFTER="2", **FAST)
    fleet = {a: DeployAgent(broker, a, passwords[a], fail=a == "ev-a3") for a in AGENTS}
    try:
        for agent in fleet.values():
            agent.connect()
        wait_online(db, len(AGENTS))
        a1, a2 = fleet["ev-a1"], fleet["ev-a2"]
        # Inventory: a first list, then a change; a message the bridge must dead-letter.
        a1.client.publish(a1.topic(Kind.INVENTORY), _software(("curl", "8.5"), ("zsh", "5.9")), 1)
        db.wait("SELECT count(*) FROM inventory WHERE agent_id = 'ev-a1'", 2)
        a1.client.publish(a1.topic(Kind.INVENTORY), _software(("curl", "8.6")), 1)
        db.wait("SELECT count(*) FROM inventory WHERE agent_id = 'ev-a1'", 1)
        a2.client.publish(a2.topic(Kind.TELEMETRY), b"not json", 1)
        db.wait("SELECT count(*) FROM dead_letters", 1)
        # A re-registration with a change (tags), on a new session.
        a2.tags = {"site": "paris"}
        a2.connect()
        db.wait("SELECT count(*) FROM agent_changes WHERE agent_id = 'ev-a2'", 1)
        # A task's whole lifecycle.
        result = CliRunner().invoke(
            eucora,
            ["tasks", "create", "--agent", "ev-a1", "--type", "HEALTHCHECK", "--json"],
            env={"EUCORA_DATABASE_URL": database},
        )
        assert result.exit_code == 0, result.output
        db.wait("SELECT status FROM tasks WHERE type = 'HEALTHCHECK'", "COMPLETED")
        # A rollout where one agent fails.
        deployment_id = create(database, "--agent", "ev-a1", "--agent", "ev-a2", "--agent", "ev-a3")
        wait_state(db, deployment_id, "COMPLETED")
        db.wait(
            "SELECT count(*) FROM deployment_status WHERE deployment_id = %s AND failed",
            1,
            30,
            deployment_id,
        )
        # Offline (a clean stop), stale (silence), a revoke.
        a2.disconnect()
        db.wait("SELECT status FROM agents WHERE agent_id = 'ev-a2'", "offline")
        db.wait("SELECT count(*) > 0 FROM agent_status_events WHERE state = 'stale'", True)
        with connect(database) as conn, conn.transaction():
            accounts.revoke(conn, "ev-a3")
            identity.remove_agents(broker.auth, ["ev-a3"])
    finally:
        for agent in fleet.values():
            agent.close()
    return bridge  # type: ignore[no-any-return]


def _rows(database: str, sql: str) -> Counter[tuple[Any, ...]]:
    with psycopg.connect(database) as conn:
        return Counter(tuple(str(v) for v in r) for r in conn.execute(sql).fetchall())


def _events(stream: list[Any], *kinds: EventKind) -> list[Any]:
    return [e for e in stream if e.kind in {k.value for k in kinds}]


def test_a_scripted_fleet_yields_one_event_per_recorded_change(
    broker: Broker, bridge_factory: Any, database: str, db: Db
) -> None:
    bridge = _script(broker, bridge_factory, database, db)
    assert bridge.stop() == 0  # nothing writes while the two sides are compared
    stream = _all_events(database)
    total = db.one("SELECT count(*) FROM events")

    # Presence: every accepted row of agent_status_events.
    assert _rows(
        database,
        "SELECT agent_id, state, epoch, source FROM agent_status_events WHERE accepted",
    ) == Counter(
        (e.agent_id, e.kind.split(".")[1], str(e.data["epoch"]), e.data["source"])
        for e in _events(
            stream, EventKind.AGENT_ONLINE, EventKind.AGENT_OFFLINE, EventKind.AGENT_STALE
        )
    )
    # Tasks: every accepted row of task_events (created, and each later status).
    assert _rows(
        database,
        "SELECT task_id, agent_id, status, previous_status, source FROM task_events WHERE accepted",
    ) == Counter(
        (e.data["task_id"], e.agent_id, e.data["status"], str(e.data["previous_status"]),
         e.data["source"])
        for e in _events(stream, EventKind.TASK_CREATED, EventKind.TASK_STATUS)
    )  # fmt: skip
    # Per-agent deployment states: every accepted row of deployment_status_events.
    assert _rows(
        database,
        "SELECT deployment_id, agent_id, status, previous_status, source"
        " FROM deployment_status_events WHERE accepted",
    ) == Counter(
        (e.data["deployment_id"], e.agent_id, e.data["status"], str(e.data["previous_status"]),
         e.data["source"])
        for e in _events(stream, EventKind.DEPLOYMENT_AGENT)
    )  # fmt: skip
    # Deployments: created once each, and a chain of states ending in the stored one.
    deployments = _rows(database, "SELECT deployment_id, status FROM deployments")
    created = _events(stream, EventKind.DEPLOYMENT_CREATED)
    assert sorted(e.data["deployment_id"] for e in created) == sorted(d for d, _ in deployments)
    for deployment_id, status in deployments:
        chain = [
            e.data for e in _events(stream, EventKind.DEPLOYMENT_STATUS)
            if e.data["deployment_id"] == deployment_id
        ]  # fmt: skip
        assert [c["previous_status"] for c in chain] == ["PENDING"] + [
            c["status"] for c in chain[:-1]
        ]
        assert chain[-1]["status"] == status
    # Registration changes, security events, dead letters: row for row.
    assert _rows(database, "SELECT agent_id, field FROM agent_changes") == Counter(
        (e.agent_id, e.data["field"]) for e in _events(stream, EventKind.AGENT_CHANGED)
    )
    assert _rows(database, "SELECT agent_id, event FROM security_events") == Counter(
        (e.agent_id, e.data["event"]) for e in _events(stream, EventKind.SECURITY)
    )
    assert _rows(database, "SELECT agent_id, reason, topic FROM dead_letters") == Counter(
        (e.agent_id, e.data["reason"], e.data["topic"])
        for e in _events(stream, EventKind.DEAD_LETTER)
    )
    # Inventory: one event per applied list that changed something, listing its rows.
    assert _rows(
        database, "SELECT agent_id, name, change, old_version, new_version FROM inventory_changes"
    ) == Counter(
        (e.agent_id, c["name"], c["change"], str(c.get("old_version")), str(c.get("new_version")))
        for e in _events(stream, EventKind.INVENTORY_CHANGED)
        for c in e.data["changes"]
    )
    assert len(_events(stream, EventKind.INVENTORY_CHANGED)) == len(
        _rows(database, "SELECT DISTINCT agent_id, time FROM inventory_changes")
    )
    # Registered: once per agent.
    assert sorted(e.agent_id for e in _events(stream, EventKind.AGENT_REGISTERED)) == sorted(
        a for (a,) in _rows(database, "SELECT agent_id FROM agents WHERE registered_at IS NOT NULL")
    )
    # The script went through every kind (so each comparison above compared something).
    assert {e.kind for e in stream} == {k.value for k in EventKind}
    # Nothing else, nothing twice, and the stream holds every row of the table.
    assert len(stream) == total == len({e.event_id for e in stream})
    # agent_seq: 1, 2, 3... per agent in stream order, as far as event_seqs says.
    seqs: dict[str, list[int]] = defaultdict(list)
    for e in stream:
        if e.agent_id is not None:
            seqs[e.agent_id].append(e.agent_seq)
    last = dict(db.all("SELECT agent_id, last_seq FROM event_seqs"))
    assert set(AGENTS) <= seqs.keys()
    for agent_id, s in seqs.items():
        assert s == list(range(1, len(s) + 1)), agent_id
        assert last[agent_id] == len(s)
    # Every event is valid against its kind's JSON Schema.
    for e in stream:
        schema = json.loads((SCHEMA_DIR / f"event-{e.kind}.schema.json").read_text())
        jsonschema.Draft202012Validator(schema).validate(e.document())

    # `eucora events tail --from-start --json` prints the same stream, one line each.
    result = CliRunner().invoke(
        eucora, ["events", "tail", "--from-start", "--json"], env={"EUCORA_DATABASE_URL": database}
    )
    assert result.exit_code == 0, result.output
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [line["event_id"] for line in lines] == [str(e.event_id) for e in stream]
    assert set(lines[0]) == {
        "event_id", "cursor", "agent_id", "agent_seq", "kind", "ts", "correlation_id", "data",
    }  # fmt: skip
    only = CliRunner().invoke(
        eucora,
        ["events", "tail", "--after", lines[0]["cursor"], "--agent", "ev-a1", "--kind",
         "task.status", "--json"],
        env={"EUCORA_DATABASE_URL": database},
    )  # fmt: skip
    assert only.exit_code == 0, only.output
    mine = [orjson.loads(line) for line in only.stdout.splitlines()]
    assert mine and all(m["agent_id"] == "ev-a1" and m["kind"] == "task.status" for m in mine)
