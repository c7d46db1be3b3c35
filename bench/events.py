"""The event stream's cost and speed, in one run: what recording and relaying events add
to the bridge's work, how fast the relay forwards, and how soon a live reader sees an
event.

    python -m bench.events [--agents 500] [--rounds 3] [--relay-events 50000]
                           [--tail-rate 5000] [--tail-seconds 10]

Starts its own stack (broker, PostgreSQL, a nats-server with JetStream) in a temporary
folder and an in-process fleet of N agents (bench.tasks.Fleet) that acknowledge tasks.
Then, each round measuring the three modes one after the other on the same fleet:

- off: events not recorded. The product has no switch for that (every state change
  is an event), so the bench adds a rule to the events table that turns its INSERT
  into nothing (the numbering goes too); the statement is still sent.
- on: events recorded, no forwarding (EUCORA_EVENTS_URL unset).
- relay: events recorded and forwarded to JetStream by the bridge's relay.

and in each mode:
- fan-out: `eucora tasks create --platform linux` to the N agents until all are
  ASSIGNED in the database (bench.tasks.eucora);
- status: every agent reports offline then online with a new epoch (2 N accepted
  transitions) until the database shows all N online in the new epoch.

Then, with the relay on:
- relay rate: --relay-events events already in the table, a fresh stream: events/s
  from the first message stored until the last;
- live tail at --tail-rate events/s for --tail-seconds: a writer commits small
  transactions at that rate and notes each commit's time; `eucora events tail
  --follow --json` (PostgreSQL, the safe cursor) and a JetStream push consumer each
  note when every event arrives: p50/p99 of arrival - commit.

Prints a table with the medians and the ratios on/off and relay/off (goal: at most
1.3), and one JSON document with every figure (--json-out FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import psycopg

from bench.simulate import preprovision
from bench.tasks import TREE, Fleet, now
from bench.tasks import eucora as fan_out
from schemas.events import EventKind
from schemas.topics import Kind
from service.bridge import relay
from service.db.connect import connect
from service.domains import events
from service.stack.process import free_port, spawn, stop_pid, wait_for
from service.stack.stack import Stack

MODES = ("off", "on", "relay")
RULE_ON = "CREATE OR REPLACE RULE bench_events_off AS ON INSERT TO events DO INSTEAD NOTHING"
RULE_OFF = "DROP RULE IF EXISTS bench_events_off ON events"


# --- the bridge in each mode --------------------------------------------------------


class Bridge:
    """The stack's bridge, started by the bench with or without EUCORA_EVENTS_URL."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.pid: int | None = None

    def start(self, forward: bool) -> None:
        self.stop()
        env = os.environ | self.stack.bridge_env()
        env["EUCORA_EVENTS_URL"] = self.stack.nats().url() if forward else ""
        proc = spawn([sys.executable, "-m", "cli", "bridge", "run"], self.stack.bridge_log, env)
        self.pid = proc.pid
        wait_for(lambda: self.stack.bridge_ready() or proc.poll() is not None, 60, "the bridge")
        if proc.poll() is not None:
            tail = self.stack.bridge_log.read_text().splitlines()[-5:]
            raise RuntimeError("the bridge exited: " + " | ".join(tail))

    def stop(self) -> None:
        stop_pid(self.pid)
        self.pid = None


def set_mode(database_url: str, bridge: Bridge, mode: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(RULE_ON if mode == "off" else RULE_OFF)
    bridge.start(forward=mode == "relay")


# --- status handling ------------------------------------------------------------------


def status_storm(fleet: Fleet, database_url: str, epoch: int) -> float:
    """Each agent: offline in its current epoch (that session ends), then online in
    epoch + 1. Seconds until every agent is online in epoch + 1 in the database."""
    n = len(fleet.clients)

    def publish_all() -> None:
        for c in fleet.clients:
            agent_id = c.user_data_get()
            topic = TREE.agent(agent_id, Kind.STATUS)
            off = {"state": "offline", "epoch": epoch, "ts": now(), "reason": "bench"}
            on = {"state": "online", "epoch": epoch + 1, "ts": now()}
            c.publish(topic, orjson.dumps(off), qos=1, retain=True)
            c.publish(topic, orjson.dumps(on), qos=1, retain=True)

    with psycopg.connect(database_url, autocommit=True) as conn:
        t0 = time.monotonic()
        fleet.loop.call_soon_threadsafe(publish_all)
        wait_for(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM agents WHERE status = 'online' AND status_epoch = %s",
                    (epoch + 1,),
                ).fetchone()
                == (n,)
            ),
            300,
            "every agent online in the new epoch",
        )
        return time.monotonic() - t0


# --- the relay's rate -----------------------------------------------------------------


def fill(database_url: str, n: int, per_tx: int = 1000, agents: int = 100) -> None:
    with connect(database_url) as conn:
        for start in range(0, n, per_tx):
            batch = [
                events.NewEvent(
                    kind=EventKind.AGENT_CHANGED,
                    agent_id=f"bench-{i % agents}",
                    data={"field": "labels", "new_value": i},
                )
                for i in range(start, min(start + per_tx, n))
            ]
            with conn.transaction():
                events.record_sync(conn, batch)


async def _stream_count(url: str) -> int:
    nc = await nats.connect(url, connect_timeout=2)
    try:
        return int((await nc.jetstream().stream_info(relay.STREAM)).state.messages)
    finally:
        await nc.close()


async def _delete_stream(url: str) -> None:
    nc = await nats.connect(url, connect_timeout=2)
    try:
        await nc.jetstream().delete_stream(relay.STREAM)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


def relay_rate(stack: Stack, bridge: Bridge, n: int) -> dict[str, float]:
    """n events waiting in the table, a fresh stream and position: events/s relayed."""
    url, database = stack.nats().url(), stack.database_url()
    bridge.stop()
    asyncio.run(_delete_stream(url))
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(RULE_OFF)
        conn.execute("DELETE FROM event_relays")
        before = events.current_cursor_sync(conn)
    fill(database, n)
    with psycopg.connect(database, autocommit=True) as conn:
        # Start after what the earlier phases wrote: only the n events are relayed.
        conn.execute(
            "INSERT INTO event_relays (name, cursor_xid, cursor_id)"
            " VALUES (%s, %s::text::xid8, %s)",
            (relay.STREAM, str(before.xid), before.id),
        )
    bridge.start(forward=True)
    first: tuple[float, int] | None = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            count = asyncio.run(_stream_count(url))
        except (nats.errors.Error, OSError, TimeoutError):
            count = 0
        t = time.monotonic()
        if count and first is None:
            first = (t, count)
        if count >= n:
            assert first is not None
            seconds = t - first[0]
            return {"events": n, "seconds": round(seconds, 3), "per_s": (n - first[1]) / seconds}
        time.sleep(0.02)
    raise TimeoutError("the relay did not forward every event within 600 s")


# --- live tail ------------------------------------------------------------------------


class PacedWriter:
    """Commits `rate` events/s in small transactions for `seconds`; each event's data
    names its batch, whose commit time is noted."""

    def __init__(self, database_url: str, rate: int, seconds: float, per_tx: int = 50) -> None:
        self.database_url = database_url
        self.rate, self.seconds, self.per_tx = rate, seconds, per_tx
        self.committed: dict[int, float] = {}
        self.total = 0

    def run(self) -> None:
        with connect(self.database_url, autocommit=True) as conn:
            t0 = time.monotonic()
            batch = 0
            while time.monotonic() - t0 < self.seconds:
                new = [
                    events.NewEvent(
                        kind=EventKind.AGENT_CHANGED,
                        agent_id=f"tail-{(batch * self.per_tx + i) % 200}",
                        data={"field": "labels", "new_value": batch},
                    )
                    for i in range(self.per_tx)
                ]
                with conn.transaction():
                    events.record_sync(conn, new)
                self.committed[batch] = time.time()
                self.total += len(new)
                batch += 1
                ahead = self.total / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)


def tail_pg(proc: subprocess.Popen[bytes], arrivals: list[tuple[int, float]]) -> None:
    """Read `eucora events tail --follow --json`: when each event's line arrives."""
    assert proc.stdout is not None
    for line in proc.stdout:
        doc = orjson.loads(line)
        if doc["agent_id"] and doc["agent_id"].startswith("tail-"):
            arrivals.append((doc["data"]["new_value"], time.time()))


async def _tail_js(url: str, arrivals: list[tuple[int, float]], stop: threading.Event) -> None:
    nc = await nats.connect(url, connect_timeout=2)
    try:

        async def on_msg(msg: Any) -> None:
            doc = orjson.loads(msg.data)
            if doc["agent_id"] and doc["agent_id"].startswith("tail-"):
                arrivals.append((doc["data"]["new_value"], time.time()))

        js = nc.jetstream()
        sub = await js.subscribe(
            f"{relay.SUBJECT_PREFIX}.*.agent.changed", cb=on_msg, ordered_consumer=True,
            deliver_policy=nats.js.api.DeliverPolicy.NEW,
        )  # fmt: skip
        while not stop.is_set():  # noqa: ASYNC110 (a threading.Event, set by another thread)
            await asyncio.sleep(0.05)
        await sub.unsubscribe()
    finally:
        await nc.close()


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(latencies)
    return {
        "n": len(ordered),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
    }


def live_tail(stack: Stack, rate: int, seconds: float) -> dict[str, dict[str, float]]:
    database, url = stack.database_url(), stack.nats().url()
    stop = threading.Event()
    pg: list[tuple[int, float]] = []
    js: list[tuple[int, float]] = []
    tail = subprocess.Popen(
        [sys.executable, "-m", "cli", "events", "tail", "--follow", "--json"],
        stdout=subprocess.PIPE, env=os.environ | {"EUCORA_DATABASE_URL": database},
    )  # fmt: skip
    readers = [
        threading.Thread(target=tail_pg, args=(tail, pg), daemon=True),
        threading.Thread(target=lambda: asyncio.run(_tail_js(url, js, stop)), daemon=True),
    ]
    for r in readers:
        r.start()
    time.sleep(2)  # both readers subscribed and caught up
    writer = PacedWriter(database, rate, seconds)
    writer.run()
    expected = writer.total
    per_batch = writer.per_tx

    def done(got: list[tuple[int, float]]) -> Callable[[], bool]:
        return lambda: len(got) >= expected

    for got, what in ((pg, "the PostgreSQL tail"), (js, "the JetStream consumer")):
        wait_for(done(got), 60, f"{what} to see every event")
    stop.set()
    tail.terminate()  # Ctrl-C's signal would do too; the database is still up
    tail.wait(10)
    result = {}
    for name, got in (("postgresql", pg), ("jetstream", js)):
        # Each batch's events count once each against its commit time.
        latencies = [t - writer.committed[b] for b, t in got if b in writer.committed]
        result[name] = percentiles(latencies) | {"batches": len(got) // per_batch}
    result["written"] = {"events": expected, "per_s": round(expected / seconds)}
    return result


# --- the run --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.agents
    with tempfile.TemporaryDirectory(prefix="eucora-bench-events-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 (the broker, database and nats accounts walk through it)
        stack = Stack(Path(tmp) / "stack")
        stack.up(
            mqtt_port=free_port(), mqtts_port=free_port(), service_port=free_port(),
            db_port=free_port(), metrics_port=free_port(), durable=False, events="nats",
            bridge=False,
        )  # fmt: skip
        bridge = Bridge(stack)
        database = stack.database_url()
        passwords = orjson.loads(preprovision(stack, [n]).read_bytes())
        fleet = Fleet(stack.broker().port, passwords)
        try:
            bridge.start(forward=False)
            fleet.start()
            with psycopg.connect(database, autocommit=True) as conn:
                wait_for(
                    lambda: (
                        conn.execute(
                            "SELECT count(*) FROM agents"
                            " WHERE status = 'online' AND platform = 'linux'"
                        ).fetchone()
                        == (n,)
                    ),
                    120,
                    "every agent online and registered",
                )
            epoch = fleet.epoch
            rounds: list[dict[str, float]] = []
            for r in range(args.rounds):
                row: dict[str, float] = {"round": r + 1}
                for mode in MODES:
                    set_mode(database, bridge, mode)
                    row[f"fanout_{mode}_s"] = fan_out(fleet, stack, n)["assigned_s"]
                    row[f"status_{mode}_s"] = status_storm(fleet, database, epoch)
                    epoch += 1
                rounds.append({k: round(v, 3) for k, v in row.items()})
                print(orjson.dumps(rounds[-1]).decode(), file=sys.stderr, flush=True)
            rate = relay_rate(stack, bridge, args.relay_events)
            print(orjson.dumps({"relay": rate}).decode(), file=sys.stderr, flush=True)
            tail = live_tail(stack, args.tail_rate, args.tail_seconds)
        finally:
            fleet.stop()
            bridge.stop()
            stack.down()
    median = {
        k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0] if k != "round"
    }
    ratios = {
        f"{work}_{mode}_vs_off": round(median[f"{work}_{mode}_s"] / median[f"{work}_off_s"], 2)
        for work in ("fanout", "status")
        for mode in ("on", "relay")
    }
    return {
        "agents": n, "rounds": args.rounds, "cpus": os.cpu_count(), "median": median,
        "ratios": ratios, "relay": rate, "live_tail": tail, "each": rounds,
    }  # fmt: skip


def table(doc: dict[str, Any]) -> str:
    m, q = doc["median"], doc["ratios"]
    lines = [
        f"agents {doc['agents']}, {doc['rounds']} rounds, {doc['cpus']} CPUs (medians)",
        "",
        f"{'work':<22}{'off s':>9}{'on s':>9}{'relay s':>9}{'on/off':>8}{'relay/off':>11}",
    ]
    for work, label in (("fanout", "task fan-out"), ("status", "status (2 per agent)")):
        lines.append(
            f"{label:<22}{m[f'{work}_off_s']:>9.3f}{m[f'{work}_on_s']:>9.3f}"
            f"{m[f'{work}_relay_s']:>9.3f}{q[f'{work}_on_vs_off']:>8.2f}"
            f"{q[f'{work}_relay_vs_off']:>11.2f}"
        )
    rate, tail = doc["relay"], doc["live_tail"]
    lines += [
        "",
        f"relay: {rate['events']} events in {rate['seconds']} s = {rate['per_s']:,.0f} events/s",
        "",
        f"live tail at {tail['written']['per_s']} events/s ({tail['written']['events']} events)",
        f"{'reader':<14}{'p50 ms':>9}{'p99 ms':>9}",
    ]
    for name in ("postgresql", "jetstream"):
        lines.append(f"{name:<14}{tail[name]['p50_ms']:>9}{tail[name]['p99_ms']:>9}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--relay-events", type=int, default=50_000)
    parser.add_argument("--tail-rate", type=int, default=5000)
    parser.add_argument("--tail-seconds", type=float, default=10.0)
    parser.add_argument("--json-out", type=Path, help="also write every figure here")
    args = parser.parse_args()
    doc = run(args)
    print(table(doc))
    if args.json_out:
        args.json_out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
