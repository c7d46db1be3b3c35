"""The fleet registry as an operator reads it: `agents list` pages and filters, each
state shows as migration 0008 defines it, operator labels are set, removed and
targeted, `tasks list` pages (docs/agents.md, docs/tasks.md). Real database; times are
the database's clock, as the bridge writes them."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
import pytest
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from cli.agents import app as agents_app
from cli.deployments import app as deployments_app
from cli.tasks import app as tasks_app
from schemas.states import AgentRegistryState

# The kinds of agent the definitions tell apart, and what each must show:
# (status, stale flag, heartbeat/telemetry age in s or None, revoked) -> (state,
# connected, stale, healthy).
KINDS: dict[str, tuple[tuple[str, bool, int | None, bool], tuple[str, bool, bool, bool]]] = {
    "healthy": (("online", False, 10, False), ("online", True, False, True)),
    "unhealthy": (("online", False, 400, False), ("online", True, False, False)),
    "stale": (("online", True, 900, False), ("online", False, True, False)),
    "offline": (("offline", True, 10, False), ("offline", False, False, False)),
    "never": (("unknown", False, None, False), ("never_connected", False, False, False)),
    "revoked": (("online", False, 10, True), ("revoked", False, False, False)),
}
PLATFORMS = ("linux", "windows", "macos")


@dataclass(frozen=True)
class Seeded:
    agent_id: str
    kind: str
    platform: str
    version: str
    tags: dict[str, str]
    labels: dict[str, str]

    @property
    def expected(self) -> tuple[str, bool, bool, bool]:
        return KINDS[self.kind][1]


def seed(n: int) -> list[Seeded]:
    kinds = list(KINDS)
    return [
        Seeded(
            agent_id=f"ag-{i:03d}",
            kind=kinds[i % len(kinds)],
            platform=PLATFORMS[i % 3],
            version="2.0" if i % 4 == 0 else "1.0",
            tags={"site": "paris" if i % 5 else "lon", "role": "web"},
            # Labels live apart: some agents carry site=lyon only as a label.
            labels={"owner": "ops"} if i % 7 == 0 else ({"site": "lyon"} if i % 11 == 0 else {}),
        )
        for i in range(n)
    ]


@pytest.fixture
def fleet(database: str) -> tuple[str, list[Seeded]]:
    agents = seed(66)
    with psycopg.connect(database, autocommit=True) as conn:
        for a in agents:
            status, stale, age, revoked = KINDS[a.kind][0]
            conn.execute(
                "INSERT INTO agents (agent_id, hostname, platform, agent_version, tags, labels,"
                " status, status_epoch, stale, last_seen, last_heartbeat_at, last_telemetry_at,"
                " revoked_at) VALUES (%(id)s, %(id)s, %(platform)s, %(version)s, %(tags)s,"
                " %(labels)s, %(status)s, CASE WHEN %(status)s <> 'unknown' THEN 1 END,"
                " %(stale)s, now() - %(age)s * interval '1 second',"
                " now() - %(age)s * interval '1 second', now() - %(age)s * interval '1 second',"
                " CASE WHEN %(revoked)s THEN now() END)",
                {
                    "id": a.agent_id, "platform": a.platform, "version": a.version,
                    "tags": Jsonb(a.tags), "labels": Jsonb(a.labels),
                    "status": status, "stale": stale, "age": age, "revoked": revoked,
                },
            )  # fmt: skip
    return database, agents


def run(app: Any, database: str, *args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--database-url", database])


def listed(database: str, *args: str) -> list[dict[str, Any]]:
    result = run(agents_app, database, "list", "--json", *args)
    assert result.exit_code == 0, result.output
    doc: list[dict[str, Any]] = orjson.loads(result.stdout)
    return doc


def test_each_state_shows_as_defined(fleet: tuple[str, list[Seeded]]) -> None:
    database, agents = fleet
    rows = {r["agent_id"]: r for r in listed(database)}
    assert {a: (r["state"], r["connected"], r["stale"], r["healthy"]) for a, r in rows.items()} == {
        a.agent_id: a.expected for a in agents
    }
    assert {r["state"] for r in rows.values()} == set(AgentRegistryState)
    one = rows["ag-007"]
    assert one["labels"] == {"owner": "ops"} and one["tags"] == {"site": "paris", "role": "web"}
    assert one["agent_version"] == "1.0" and one["hostname"] == "ag-007"
    # The health window is the reader's: a wide one makes the quiet agents healthy.
    wide = {r["agent_id"]: r["healthy"] for r in listed(database, "--healthy-within", "3600")}
    assert {a.agent_id for a in agents if wide[a.agent_id]} == {
        a.agent_id for a in agents if a.kind in ("healthy", "unhealthy")
    }
    shown = run(agents_app, database, "show", "ag-005", "--json")
    assert shown.exit_code == 0, shown.output
    doc = orjson.loads(shown.stdout)
    assert (doc["state"], doc["connected"], doc["revoked_at"] is not None) == (
        "revoked", False, True,
    )  # fmt: skip


# Each filter of `agents list`, and the agents it must return.
FILTERS: list[tuple[list[str], Any]] = [
    ([], lambda a: True),
    (["--platform", "windows"], lambda a: a.platform == "windows"),
    (["--online"], lambda a: a.expected[1]),
    (["--offline"], lambda a: not a.expected[1]),
    (["--stale"], lambda a: a.expected[2]),
    (["--unhealthy"], lambda a: not a.expected[3]),
    (["--tag", "site=lon"], lambda a: a.tags["site"] == "lon"),
    (["--tag", "site=lyon"], lambda a: a.labels.get("site") == "lyon"),  # a label only
    (["--tag", "owner=ops", "--tag", "role=web"], lambda a: a.labels.get("owner") == "ops"),
    (["--version", "2.0"], lambda a: a.version == "2.0"),
    (
        ["--online", "--unhealthy", "--platform", "windows"],
        lambda a: a.kind == "unhealthy" and a.platform == "windows",
    ),
]


@pytest.mark.parametrize(("args", "keep"), FILTERS, ids=[" ".join(f) or "all" for f, _ in FILTERS])
def test_paging_returns_every_agent_once(
    fleet: tuple[str, list[Seeded]], args: list[str], keep: Any
) -> None:
    """A script pages as docs/agents.md says: --after the last agent_id until a page
    comes back shorter than --limit."""
    database, agents = fleet
    expected = sorted(a.agent_id for a in agents if keep(a))
    assert expected, "every filter matches someone here"
    seen: list[str] = []
    after: list[str] = []
    while True:
        page = [r["agent_id"] for r in listed(database, *args, "--limit", "4", *after)]
        seen += page
        if len(page) < 4:
            break
        after = ["--after", page[-1]]
    assert seen == expected


def test_table_says_how_many_more(fleet: tuple[str, list[Seeded]]) -> None:
    database, agents = fleet
    first = run(agents_app, database, "list", "--limit", "10")
    assert first.exit_code == 0, first.output
    lines = first.stdout.splitlines()
    assert lines[0].split()[:5] == ["AGENT", "HOSTNAME", "PLATFORM", "VERSION", "STATE"]
    assert [x.split()[0] for x in lines[1:11]] == [a.agent_id for a in agents[:10]]
    assert first.stderr.strip() == f"{len(agents) - 10} more not shown: --after ag-009"
    last = run(agents_app, database, "list", "--after", "ag-059")
    assert [x.split()[0] for x in last.stdout.splitlines()[1:-1]] == [
        a.agent_id for a in agents[60:]
    ]
    assert last.stderr == ""  # the end: nothing more
    default = listed(database)
    assert len(default) == len(agents)  # under --json's default limit (1,000)
    bad = run(agents_app, database, "list", "--limit", "0")
    assert bad.exit_code == 2


def test_labels_are_set_removed_shown_and_targeted(fleet: tuple[str, list[Seeded]]) -> None:
    database, _ = fleet
    done = run(agents_app, database, "label", "ag-001", "team=db", "tier=gold", "--json")
    assert done.exit_code == 0, done.output
    labels = {"team": "db", "tier": "gold"}
    assert orjson.loads(done.stdout) == {"agent_id": "ag-001", "labels": labels}
    again = run(agents_app, database, "label", "ag-001", "--remove", "tier", "--remove", "x")
    assert again.exit_code == 0 and again.stdout.strip() == "ag-001 labels: team=db"
    shown = orjson.loads(run(agents_app, database, "show", "ag-001", "--json").stdout)
    assert shown["labels"] == {"team": "db"}
    assert shown["tags"] == {"site": "paris", "role": "web"}  # the agent's own, untouched
    assert [c["field"] for c in shown["changes"]] == ["labels", "labels"]
    text = run(agents_app, database, "show", "ag-001").stdout
    assert "labels    team=db" in text and "tags      role=web, site=paris" in text

    # --tag matches a label: tasks create and deployments create target ag-001 alone.
    made = run(tasks_app, database, "create", "--tag", "team=db", "--type", "HEALTHCHECK",
               "--json")  # fmt: skip
    assert made.exit_code == 0, made.output
    assert [t["agent_id"] for t in orjson.loads(made.stdout)] == ["ag-001"]
    rollout = run(deployments_app, database, "create", "--tag", "team=db", "--payload",
                  '{"command": ["true"]}', "--json")  # fmt: skip
    assert rollout.exit_code == 0, rollout.output
    with psycopg.connect(database) as conn:
        targets = conn.execute(
            "SELECT agent_id FROM deployment_status WHERE deployment_id = %s",
            (orjson.loads(rollout.stdout)["deployment_id"],),
        ).fetchall()
    assert targets == [("ag-001",)]
    # A tag and a label together: each pair in either place.
    both = listed(database, "--tag", "team=db", "--tag", "site=paris")
    assert [r["agent_id"] for r in both] == ["ag-001"]

    missing = run(agents_app, database, "label", "nobody", "team=db")
    assert missing.exit_code == 1 and missing.stderr == "error: agent 'nobody' not found\n"
    for bad in (["ag-001"], ["ag-001", "no-equals"], ["ag-001", "bad key=1"]):
        refused = run(agents_app, database, "label", *bad)
        assert refused.exit_code == 2 and refused.stderr.startswith("error: "), bad
        assert len(refused.stderr.splitlines()) == 1
    shown = orjson.loads(run(agents_app, database, "show", "ag-001", "--json").stdout)
    assert shown["labels"] == {"team": "db"}  # refusals changed nothing


@pytest.fixture
def task_history(fleet: tuple[str, list[Seeded]]) -> tuple[str, list[str]]:
    """30 tasks: one a minute for 25 minutes, then 5 created in one statement (one
    created_at), newest first as `tasks list` shows them."""
    database, _ = fleet
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasks (agent_id, type, created_at) SELECT 'ag-000', 'COLLECT',"
            " now() - i * interval '1 minute' FROM generate_series(1, 25) i"
        )
        conn.execute(
            "INSERT INTO tasks (agent_id, type) SELECT 'ag-001', 'HEALTHCHECK'"
            " FROM generate_series(1, 5)"
        )
        ids = [
            str(r[0])
            for r in conn.execute(
                "SELECT task_id FROM tasks ORDER BY created_at DESC, task_id DESC"
            ).fetchall()
        ]
    return database, ids


def test_tasks_list_pages_newest_first(task_history: tuple[str, list[str]]) -> None:
    database, ids = task_history

    def ids_of(*args: str) -> list[str]:
        result = run(tasks_app, database, "list", "--json", *args)
        assert result.exit_code == 0, result.output
        return [t["task_id"] for t in orjson.loads(result.stdout)]

    seen: list[str] = []
    after: list[str] = []
    while True:
        page = ids_of("--limit", "4", *after)
        seen += page
        if len(page) < 4:
            break
        after = ["--after", page[-1]]
    assert seen == ids  # every task once, in order, across the tie of five
    # --since: the five just made and those 1..9 minutes old.
    assert ids_of("--since", "570s") == ids[:14]
    assert ids_of("--since", "10m", "--type", "COLLECT", "--limit", "3") == ids[5:8]
    assert ids_of("--since", "1h", "--after", ids[27]) == ids[28:]

    table = run(tasks_app, database, "list", "--limit", "12")
    assert table.exit_code == 0
    assert table.stderr.strip() == f"18 more not shown: --after {ids[11]}"
    assert run(tasks_app, database, "list", "--after", ids[-1]).stdout.strip() == "no tasks match"
    unknown = run(tasks_app, database, "list", "--after", str(uuid.uuid4()))
    assert unknown.exit_code == 1 and re.match(r"error: --after: task .* not found", unknown.stderr)
    bad = run(tasks_app, database, "list", "--since", "soon")
    assert bad.exit_code == 2 and "duration" in bad.stderr


def test_stale_sweep_marks_connected_agents_only(database: str) -> None:
    """The sweep's candidates are agent_connected(): a silent online agent becomes
    stale (and lists so), a revoked one does not."""
    import asyncio

    from service.domains import agents

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO agents (agent_id, status, last_seen, revoked_at) VALUES"
            " ('silent', 'online', now() - interval '1 hour', NULL),"
            " ('gone', 'online', now() - interval '1 hour', now()),"
            " ('busy', 'online', now(), NULL)"
        )

    async def sweep() -> int:
        async with await psycopg.AsyncConnection.connect(database) as conn:
            return await agents.mark_stale(conn, 300)

    assert asyncio.run(sweep()) == 1
    rows = {r["agent_id"]: (r["state"], r["stale"]) for r in listed(database)}
    assert rows == {
        "busy": ("online", False),
        "gone": ("revoked", False),
        "silent": ("online", True),
    }
    assert [r["agent_id"] for r in listed(database, "--stale")] == ["silent"]
