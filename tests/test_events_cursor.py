"""The event stream's safe cursor, against a real PostgreSQL (docs/events.md).

Concurrent writers commit out of id order (some of their transactions wait before
COMMIT, some roll back); a reader following live must still get every committed
event once, in agent_seq order per agent, also when it is SIGKILLed and resumed
from the cursor it saved.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from cli.common import EXIT_CURSOR_TOO_OLD
from cli.main import app as eucora
from schemas.events import EventKind
from service.db import chunks, migrate
from service.domains import events
from service.domains.events import NewEvent, Position

WRITERS = 4
TOTAL = 50_000
AGENTS = [f"agent-{i:02d}" for i in range(24)]

# The reader: follows the stream from the cursor saved in its file (or the start) and
# appends one line per page, {"cursor", "events"}, in one write: a SIGKILL leaves the
# file at a page boundary (a torn last line is ignored on resume).
READER = r"""
import json, os, sys, time
import psycopg
from service.domains import events

url, path = sys.argv[1], sys.argv[2]
cursor = events.START
if os.path.exists(path):
    for line in open(path, encoding="utf-8"):
        try:
            cursor = events.parse_cursor(json.loads(line)["cursor"])
        except ValueError:
            pass
with psycopg.connect(url, autocommit=True) as conn, open(path, "a", encoding="utf-8") as out:
    while True:
        page, cursor = events.read_after_sync(conn, cursor, limit=500)
        if page:
            line = json.dumps({"cursor": str(cursor), "events": [
                [e.agent_id, e.agent_seq, e.data["w"], e.data["n"]] for e in page]})
            os.write(out.fileno(), (line + "\n").encode())
        else:
            time.sleep(0.01)
"""


def _pages(path: Path) -> list[dict[str, object]]:
    pages = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                pages.append(json.loads(line))
            except ValueError:
                continue  # torn by the SIGKILL: its cursor was not saved either
    return pages


def _read(path: Path) -> list[list[object]]:
    return [e for p in _pages(path) for e in p["events"]]  # type: ignore[attr-defined]


def _wait(what: str, condition: Callable[[], bool], timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _writer(url: str, w: int, quota: int, committed: list[tuple[int, int]]) -> None:
    rng = random.Random(w)
    n = 0
    with psycopg.connect(url) as conn:
        while n < quota:
            size = min(rng.randint(1, 25), quota - n)
            batch = [
                NewEvent(EventKind.SECURITY, rng.choice(AGENTS), {"w": w, "n": n + i})
                for i in range(size)
            ]
            events.record_sync(conn, batch)
            if rng.random() < 0.05:
                conn.rollback()  # numbers given back: agent_seq must stay gap-free
                continue
            if rng.random() < 0.1:
                time.sleep(rng.uniform(0.002, 0.02))  # commit after younger writers
            conn.commit()
            committed.extend((w, n + i) for i in range(size))
            n += size


def prune(database: str, **options: Any) -> int:
    """One retention run, as the bridge's sweep makes it: in a transaction."""

    async def run() -> int:
        async with (
            await psycopg.AsyncConnection.connect(database) as aconn,
            aconn.transaction(),
        ):
            return await events.prune(aconn, **options)

    return asyncio.run(run())


def backdate(conn: psycopg.Connection[Any], age: str, where: str = "true") -> None:
    """Make the events matching `where` `age` older. Not an UPDATE of ts: under
    TimescaleDB that would move rows to another chunk, which a hypertable refuses; they
    are deleted and inserted again, with the same id and position."""
    conn.execute(
        f"WITH old AS (DELETE FROM events WHERE {where} RETURNING *)"
        " INSERT INTO events OVERRIDING SYSTEM VALUE"
        " SELECT id, xid, event_id, agent_id, agent_seq, kind, ts - %s::interval,"
        " correlation_id, data FROM old",
        (age,),
    )


def make_chunks_ahead(database: str) -> None:
    """What a running bridge has done (service/db/chunks.py). Without it, under
    TimescaleDB, the transaction that records the day's first event holds back every
    other event writer until it ends: the tests below would wait on themselves."""

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await chunks.make_ahead(conn, datetime.now(UTC))

    asyncio.run(run())


def test_concurrent_writers_and_a_killed_reader_lose_and_repeat_nothing(
    database: str, tmp_path: Path
) -> None:
    out = tmp_path / "reader.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def start_reader() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", READER, database, str(out)], env=env)

    reader = start_reader()
    committed: list[list[tuple[int, int]]] = [[] for _ in range(WRITERS)]
    threads = [
        threading.Thread(target=_writer, args=(database, w, TOTAL // WRITERS, committed[w]))
        for w in range(WRITERS)
    ]
    try:
        for t in threads:
            t.start()
        _wait("the reader to get a third of the events", lambda: len(_read(out)) >= TOTAL // 3)
        reader.send_signal(signal.SIGKILL)
        reader.wait()
        reader = start_reader()  # resumes from its saved cursor
        for t in threads:
            t.join()
        _wait("the reader to get every event", lambda: len(_read(out)) >= TOTAL)
    finally:
        reader.kill()
        reader.wait()
        for t in threads:
            t.join()

    got = _read(out)
    keys = [(w, n) for _, _, w, n in got]
    expected = {k for c in committed for k in c}
    assert len(expected) == TOTAL
    assert len(keys) - len(set(keys)) == 0, "duplicates"
    assert len(expected - set(keys)) == 0, "missed"
    assert set(keys) == expected
    # Per agent: 1, 2, 3... in the order the reader got them (no gap from rollbacks,
    # no inversion between transactions).
    seqs: dict[str, list[int]] = defaultdict(list)
    for agent, seq, _, _ in got:
        seqs[str(agent)].append(int(seq))  # type: ignore[call-overload]
    for agent, s in seqs.items():
        assert s == list(range(1, len(s) + 1)), agent


def test_an_agents_events_come_in_agent_seq_order_whatever_the_xids(database: str) -> None:
    """An older transaction numbering an agent's event after a younger one committed
    the previous one: the stream still gives seq 1 before seq 2."""
    make_chunks_ahead(database)
    with psycopg.connect(database) as old, psycopg.connect(database) as young:
        events.record_sync(old, [NewEvent(EventKind.DEPLOYMENT_STATUS, None, {"n": 0})])
        events.record_sync(young, [NewEvent(EventKind.AGENT_ONLINE, "a1", {"n": 1})])
        young.commit()
        events.record_sync(old, [NewEvent(EventKind.AGENT_OFFLINE, "a1", {"n": 2})])
        old.commit()
        page, _ = events.read_after_sync(old, events.START)
    mine = [(e.agent_seq, e.data["n"]) for e in page if e.agent_id == "a1"]
    assert mine == [(1, 1), (2, 2)]


def test_a_running_transaction_holds_back_what_commits_after_it(database: str) -> None:
    make_chunks_ahead(database)
    with (
        psycopg.connect(database) as slow,
        psycopg.connect(database) as fast,
        psycopg.connect(database, autocommit=True) as reader,
    ):
        events.record_sync(slow, [NewEvent(EventKind.AGENT_ONLINE, "slow", {})])
        events.record_sync(fast, [NewEvent(EventKind.AGENT_ONLINE, "fast", {})])
        fast.commit()
        page, cursor = events.read_after_sync(reader, events.START)
        assert page == []  # "fast" committed, but "slow" may still land before it
        slow.commit()
        page, cursor = events.read_after_sync(reader, cursor)
        assert [e.agent_id for e in page] == ["slow", "fast"]
        again, _ = events.read_after_sync(reader, cursor)
        assert again == []


def test_filters_and_cursor_format(database: str) -> None:
    with psycopg.connect(database) as conn:
        events.record_sync(
            conn,
            [
                NewEvent(EventKind.AGENT_ONLINE, "a1", {}),
                NewEvent(EventKind.AGENT_OFFLINE, "a1", {}),
                NewEvent(EventKind.AGENT_ONLINE, "a2", {}, correlation_id="c-1"),
            ],
        )
        conn.commit()
        page, after = events.read_after_sync(conn, "0.0", kinds=["agent.online"])
        assert [(e.agent_id, e.kind) for e in page] == [
            ("a1", "agent.online"),
            ("a2", "agent.online"),
        ]
        assert page[1].correlation_id == "c-1"
        only, _ = events.read_after_sync(conn, events.START, agent_id="a1")
        assert [e.agent_seq for e in only] == [1, 2]
        first, at = events.read_after_sync(conn, events.START, limit=1)
        assert len(first) == 1 and str(at) == first[0].cursor
        rest, _ = events.read_after_sync(conn, at)
        assert [e.event_id for e in first + rest] == [
            e.event_id for e in events.read_after_sync(conn, events.START)[0]
        ]
        # Nothing new: the cursor still moves past what a filter skipped.
        assert after >= events.parse_cursor(page[-1].cursor)
    for bad in ("", "12", "a.b", "1.-2", "1.2.3"):
        with pytest.raises(events.BadCursor):
            events.parse_cursor(bad)


def test_retention_deletes_old_events_and_says_when_a_cursor_is_too_old(database: str) -> None:
    with psycopg.connect(database) as conn:
        events.record_sync(
            conn, [NewEvent(EventKind.AGENT_ONLINE, "a1", {"n": i}) for i in range(3)]
        )
        conn.commit()
        old, _ = events.read_after_sync(conn, events.START)
        events.record_sync(conn, [NewEvent(EventKind.AGENT_OFFLINE, "a1", {"n": 3})])
        conn.commit()
        backdate(conn, "3 days", "(data->>'n')::int < 2")
        events.set_retention_sync(conn, 2)
        conn.commit()

    assert prune(database) == 2
    with psycopg.connect(database, autocommit=True) as conn:
        oldest = events.oldest_cursor_sync(conn)
        assert str(oldest) == old[1].cursor
        with pytest.raises(events.CursorTooOld) as caught:
            events.read_after_sync(conn, events.parse_cursor(old[0].cursor))
        assert caught.value.oldest == oldest and caught.value.days == 2
        kept, _ = events.read_after_sync(conn, oldest)
        assert [e.data["n"] for e in kept] == [2, 3]
        assert events.retention_days_sync(conn) == 2
        # A cursor from before the stream began is as old as any.
        with pytest.raises(events.CursorTooOld):
            events.read_after_sync(conn, Position(0, 0))


def test_retention_in_batches_keeps_what_it_has_not_deleted_yet(
    empty_database: str, db_mode: migrate.Mode
) -> None:
    """A backlog past retention larger than a batch: what the first batch left is still
    there to read (under TimescaleDB its chunk is not dropped with the batch), and the
    next batch deletes it, emptied chunks and all."""
    migrate.upgrade(empty_database, mode=db_mode)
    with psycopg.connect(empty_database) as conn:
        events.record_sync(
            conn, [NewEvent(EventKind.AGENT_ONLINE, "a1", {"n": i}) for i in range(4)]
        )
        conn.commit()
        backdate(conn, "3 days")
        events.record_sync(conn, [NewEvent(EventKind.AGENT_OFFLINE, "a1", {"n": 4})])
        events.set_retention_sync(conn, 2)
        conn.commit()

    def chunks_of_events(conn: psycopg.Connection[Any]) -> int | None:
        if db_mode != "timescaledb":
            return None
        row = conn.execute("SELECT count(*) FROM show_chunks('events')").fetchone()
        return None if row is None else int(row[0])

    assert prune(empty_database, batch=2) == 2
    with psycopg.connect(empty_database, autocommit=True) as conn:
        kept, _ = events.read_after_sync(conn, events.oldest_cursor_sync(conn))
        assert [e.data["n"] for e in kept] == [2, 3, 4]
        assert chunks_of_events(conn) == (2 if db_mode == "timescaledb" else None)
    assert prune(empty_database, batch=2) == 2
    with psycopg.connect(empty_database, autocommit=True) as conn:
        kept, _ = events.read_after_sync(conn, events.oldest_cursor_sync(conn))
        assert [e.data["n"] for e in kept] == [4]
        assert chunks_of_events(conn) == (1 if db_mode == "timescaledb" else None)
    assert prune(empty_database, batch=2) == 0


def _tail(database: str, *args: str) -> Any:
    return CliRunner().invoke(
        eucora, ["events", "tail", *args], env={"EUCORA_DATABASE_URL": database}
    )


def test_tail_starts_now_and_says_when_a_cursor_is_too_old(database: str) -> None:
    with psycopg.connect(database) as conn:
        events.record_sync(conn, [NewEvent(EventKind.AGENT_ONLINE, "t1", {"n": 0})])
        conn.commit()
    assert _tail(database, "--json").stdout == ""  # only what comes from now on
    first = _tail(database, "--from-start", "--json")
    assert first.exit_code == 0, first.output
    (line,) = [json.loads(x) for x in first.stdout.splitlines()]
    assert (line["agent_id"], line["agent_seq"], line["kind"]) == ("t1", 1, "agent.online")
    table = _tail(database, "--from-start")
    assert "agent.online" in table.stdout
    next_cursor = events.parse_cursor(table.stderr.removeprefix("next: --after "))
    assert next_cursor >= events.parse_cursor(line["cursor"])
    with psycopg.connect(database) as conn:
        backdate(conn, "40 days")
        events.record_sync(conn, [NewEvent(EventKind.AGENT_OFFLINE, "t1", {"n": 1})])
        conn.commit()

    assert prune(database) == 1
    old = _tail(database, "--after", "0.0")
    assert old.exit_code == EXIT_CURSOR_TOO_OLD
    assert old.stderr.startswith("error: cursor 0.0 is older than the events kept")
    assert len(old.stderr.splitlines()) == 1
    for args in (["--after", "x"], ["--after", "1.2", "--from-start"], ["--kind", "nope"]):
        bad = _tail(database, *args)
        assert bad.exit_code == 2 and bad.stderr.startswith("error: "), (args, bad.output)


def test_tail_follow_prints_new_events_and_stops_on_ctrl_c(database: str) -> None:
    env = {**os.environ, "EUCORA_DATABASE_URL": database}
    with psycopg.connect(database, autocommit=True) as conn:
        start = events.current_cursor_sync(conn)
        command = [sys.executable, "-m", "cli", "events", "tail", "--follow", "--json",
                   "--agent", "f1", "--after", str(start)]  # fmt: skip
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as proc:
            try:
                with conn.transaction():
                    events.record_sync(
                        conn, [NewEvent(EventKind.AGENT_ONLINE, a, {}) for a in ("f1", "f2", "f1")]
                    )
                assert proc.stdout is not None and proc.stderr is not None
                lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
                assert [(x["agent_id"], x["agent_seq"]) for x in lines] == [("f1", 1), ("f1", 2)]
                proc.send_signal(signal.SIGINT)
                assert proc.wait(10) == 0
                assert b"Traceback" not in proc.stderr.read()
            finally:
                proc.kill()
