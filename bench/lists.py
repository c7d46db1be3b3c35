"""Listings at fleet scale: `agents list` and `tasks list` over 100,000 agents and
300,000 tasks, each against a bare query of the same page in the same run.

    python -m bench.lists [--agents 100000] [--tasks 300000] [--rounds 5]

Starts its own PostgreSQL cluster (TimescaleDB when installed, as the stack does) in a
temporary folder, migrates it, and seeds with COPY a mix the filters tell apart: agents
connected and healthy, connected but quiet, stale, offline, never connected and
revoked; three platforms, 50 sites, a few versions (one rare), operator labels on one
agent in ten; tasks over 30 days in every state. Then, per listing, the median of
`--rounds` runs through the real command (the Typer app in-process, the way `eucora`
runs it: option parsing, its own connection, the query, the models, the output):
the first page, a page deep in the fleet (--after), each filter, --json; and beside
it the baseline: a new connection that runs `SELECT <the same columns> FROM agents
ORDER BY agent_id LIMIT <same>` (or the tasks equivalent) and fetches the rows.
Prints one JSON document; docs/agents.md ("At scale") has the figures.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
from typer.testing import CliRunner

from cli.agents import app as agents_app
from cli.tasks import app as tasks_app
from service import identity
from service.db import migrate
from service.stack.database import Cluster
from service.stack.process import free_port

PLATFORMS = ("windows", "windows", "linux", "macos")
TASK_STATES = ("COMPLETED",) * 8 + ("FAILED", "PENDING", "EXPIRED", "CANCELLED")
TASK_TYPES = ("DEPLOY", "REMEDIATE", "COLLECT", "UPDATE", "HEALTHCHECK")


def agent_id(i: int) -> str:
    return f"host-{i:06d}"


def seed_agents(conn: psycopg.Connection[Any], n: int, rng: random.Random) -> None:
    now = datetime.now(UTC)
    cols = (
        "agent_id, hostname, platform, agent_version, tags, labels, status, status_epoch,"
        " stale, last_seen, last_heartbeat_at, last_telemetry_at, revoked_at, hardware"
    )
    with conn.cursor() as cur, cur.copy(f"COPY agents ({cols}) FROM STDIN") as copy:
        for i in range(n):
            p = rng.random()
            recent, quiet, old = (
                now - timedelta(seconds=20),
                now - timedelta(minutes=4),
                (now - timedelta(hours=2)),
            )
            # 80 % healthy, 5 % quiet (unhealthy), 3 % stale, 7 % offline, 3 % never
            # connected, 2 % revoked.
            status, stale, seen, revoked = "online", False, recent, None
            if p >= 0.80:
                seen = quiet
            if p >= 0.85:
                stale, seen = True, old
            if p >= 0.88:
                status, stale = "offline", False
            if p >= 0.95:
                status, seen = "unknown", None
            if p >= 0.98:
                status, seen, revoked = "online", recent, now
            version = "3.0.0-rc1" if i % 997 == 0 else ("2.4.1" if i % 3 else "2.3.0")
            tags = {"site": f"site-{i % 50:02d}", "env": "prod" if i % 4 else "staging"}
            labels = {"owner": f"team-{i % 7}"} if i % 10 == 0 else {}
            copy.write_row(
                (
                    agent_id(i), f"{agent_id(i)}.example", PLATFORMS[i % 4], version,
                    orjson.dumps(tags).decode(), orjson.dumps(labels).decode(), status,
                    None if status == "unknown" else 1_700_000_000_000 + i, stale, seen, seen,
                    seen, revoked, '{"cpu_count": 4}',
                )
            )  # fmt: skip


def seed_tasks(conn: psycopg.Connection[Any], n: int, agents: int, rng: random.Random) -> None:
    now = datetime.now(UTC)
    cols = "agent_id, type, status, created_at, updated_at, next_publish_at"
    with conn.cursor() as cur, cur.copy(f"COPY tasks ({cols}) FROM STDIN") as copy:
        for _ in range(n):
            created = now - timedelta(seconds=rng.uniform(0, 30 * 86400))
            status = rng.choice(TASK_STATES)
            copy.write_row(
                (
                    agent_id(rng.randrange(agents)), rng.choice(TASK_TYPES), status, created,
                    created, created if status == "PENDING" else None,
                )
            )  # fmt: skip


def timed(fn: Callable[[], Any], rounds: int) -> float:
    fn()  # warm: the first run pays for imports and plans
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def command(app: Any, url: str, args: list[str]) -> Callable[[], Any]:
    runner = CliRunner()

    def run() -> Any:
        result = runner.invoke(app, [*args, "--database-url", url])
        if result.exit_code != 0:
            raise SystemExit(f"{args}: exit {result.exit_code}: {result.output}")
        return result

    return run


def bare(url: str, sql: str) -> Callable[[], Any]:
    def run() -> Any:
        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute(sql).fetchall()  # type: ignore[arg-type]

    return run


AGENT_COLS = "agent_id, hostname, platform, tags, labels, agent_version, last_seen, status_epoch"
TASK_COLS = (
    "task_id, agent_id, type, status, progress, attempts, correlation_id, created_at,"
    " updated_at, finished_at"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=100_000)
    ap.add_argument("--tasks", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    deep = agent_id(int(args.agents * 0.9))

    with tempfile.TemporaryDirectory(prefix="eucora-bench-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # noqa: S103 (the database account walks through it)
        cluster = Cluster(root=root / "pg", port=free_port(), password=identity.new_password())
        cluster.start()
        try:
            url = cluster.url
            migrate.upgrade(url)
            t0 = time.perf_counter()
            with psycopg.connect(url) as conn:
                seed_agents(conn, args.agents, rng)
                seed_tasks(conn, args.tasks, args.agents, rng)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE agents")
                conn.execute("VACUUM ANALYZE tasks")
                row = conn.execute(
                    "SELECT task_id FROM tasks ORDER BY created_at DESC, task_id DESC"
                    " OFFSET %s LIMIT 1",
                    (int(args.tasks * 0.9),),
                ).fetchone()
                assert row is not None
                deep_task = str(row[0])
                mode = migrate.database_mode(conn)
            seeded_s = time.perf_counter() - t0
            print(f"seeded in {seeded_s:.1f} s ({mode})", file=sys.stderr, flush=True)

            agents_page = f"SELECT {AGENT_COLS} FROM agents ORDER BY agent_id LIMIT %d"
            listings: list[tuple[str, Any, list[str], str]] = [
                ("agents list", agents_app, ["list"], agents_page % 101),
                ("agents list --after (90 % deep)", agents_app, ["list", "--after", deep],
                 f"SELECT {AGENT_COLS} FROM agents WHERE agent_id > '{deep}'"
                 " ORDER BY agent_id LIMIT 101"),
                ("agents list --json", agents_app, ["list", "--json"], agents_page % 1001),
                ("agents list --json --after (90 % deep)", agents_app,
                 ["list", "--json", "--after", deep],
                 f"SELECT {AGENT_COLS} FROM agents WHERE agent_id > '{deep}'"
                 " ORDER BY agent_id LIMIT 1001"),
                ("agents list --platform linux", agents_app, ["list", "--platform", "linux"],
                 agents_page % 101),
                ("agents list --online", agents_app, ["list", "--online"], agents_page % 101),
                ("agents list --offline", agents_app, ["list", "--offline"], agents_page % 101),
                ("agents list --stale", agents_app, ["list", "--stale"], agents_page % 101),
                ("agents list --unhealthy", agents_app, ["list", "--unhealthy"],
                 agents_page % 101),
                ("agents list --tag site=site-07 (tag)", agents_app,
                 ["list", "--tag", "site=site-07"], agents_page % 101),
                ("agents list --tag owner=team-3 (label)", agents_app,
                 ["list", "--tag", "owner=team-3"], agents_page % 101),
                ("agents list --version 3.0.0-rc1 (rare)", agents_app,
                 ["list", "--version", "3.0.0-rc1"], agents_page % 101),
                ("agents list --online --unhealthy --platform windows --tag env=staging",
                 agents_app, ["list", "--online", "--unhealthy", "--platform", "windows",
                              "--tag", "env=staging"], agents_page % 101),
                ("tasks list", tasks_app, ["list"],
                 f"SELECT {TASK_COLS} FROM tasks ORDER BY created_at DESC, task_id DESC"
                 " LIMIT 101"),
                ("tasks list --after (90 % deep)", tasks_app, ["list", "--after", deep_task],
                 f"SELECT {TASK_COLS} FROM tasks ORDER BY created_at DESC, task_id DESC"
                 " LIMIT 101"),
                ("tasks list --json --since 1h", tasks_app, ["list", "--json", "--since", "1h"],
                 f"SELECT {TASK_COLS} FROM tasks ORDER BY created_at DESC, task_id DESC"
                 " LIMIT 101"),
                ("tasks list --status FAILED", tasks_app, ["list", "--status", "FAILED"],
                 f"SELECT {TASK_COLS} FROM tasks ORDER BY created_at DESC, task_id DESC"
                 " LIMIT 101"),
            ]  # fmt: skip
            results = []
            for name, app, argv, baseline_sql in listings:
                cli_s = timed(command(app, url, argv), args.rounds)
                base_s = timed(bare(url, baseline_sql), args.rounds)
                row_doc = {
                    "listing": name,
                    "eucora_ms": round(cli_s * 1000, 1),
                    "baseline_ms": round(base_s * 1000, 1),
                    "ratio": round(cli_s / base_s, 1),
                }
                results.append(row_doc)
                print(orjson.dumps(row_doc).decode(), file=sys.stderr, flush=True)
            # What the dashboards count, over the whole fleet.
            panels = {
                "dashboard: connected/stale/total": "SELECT count(*) FILTER (WHERE connected),"
                " count(*) FILTER (WHERE stale), count(*) FROM agent_health",
                "dashboard: healthy": "SELECT count(*) FILTER (WHERE healthy) FROM agent_health",
            }
            for name, sql in panels.items():
                results.append(
                    {
                        "listing": name,
                        "query_ms": round(timed(bare(url, sql), args.rounds) * 1000, 1),
                    }
                )
        finally:
            cluster.stop()
    print(
        orjson.dumps(
            {
                "agents": args.agents,
                "tasks": args.tasks,
                "rounds": args.rounds,
                "cpus": os.cpu_count(),
                "database": mode,
                "seed_s": round(seeded_s, 1),
                "median": results,
                "ran_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
            option=orjson.OPT_INDENT_2,
        ).decode()
    )


if __name__ == "__main__":
    main()
