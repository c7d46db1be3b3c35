"""A whole fleet on broker shards: connect, page, storms, fan-out, telemetry at fleet rate.

    python -m bench.fleet [--agents 100000] [--brokers 7] [--telemetry-interval 60]
                          [--telemetry-window 600] [--skip storms fanout telemetry]

Starts its own stack in a temporary folder (`--brokers` Mosquittos from the project's
config, PostgreSQL, the bridge), then runs the real `eucora simulate` (which provisions
the fleet in bulk, each agent at its home broker, and spreads it over processes of at
most 15,000 agents) and measures, in one run:

1. connect: seconds until every agent is online in the database; `agents list --online
   --json` paged by --after counts exactly --agents; RSS of each broker, the bridge and
   the simulator (all its processes);
2. storms: broker 1 SIGKILLed and restarted under its agents, then every broker
   restarted at once: seconds until all are online again each time, status offlines
   recorded meanwhile, agents left offline at the end (must be 0: "false offlines"),
   the bridge's unacknowledged backlog at the end (must be 0);
3. fan-out: one HEALTHCHECK task to every agent (`eucora tasks create`): seconds until
   every task is published and until every agent acknowledged it (ASSIGNED); in the
   same run a raw publisher (paho, QoS 1, the bridge's account) sends the same number
   of task-sized messages to the same agents' task topics on their home brokers
   (cancels of unknown task ids, which agents ignore), timed until its last PUBACK;
   and, before anything else runs, seconds until every task finished (COMPLETED);
4. telemetry: samples stored per agent over a window of --telemetry-window seconds at
   the fleet's rate, the publish-to-commit lag (p50/p99 of received_at - ts), and at
   the end every sample the simulator sent stored exactly once.

Prints one JSON document (and progress on stderr). Figures in docs/scale.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import psutil
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from typer.testing import CliRunner

from cli.agents import app as agents_app
from cli.tasks import app as tasks_app
from schemas.states import TERMINAL
from schemas.topics import Kind, TopicTree
from service import identity
from service.stack.process import StackError, free_port, free_port_range, wait_for
from service.stack.stack import Stack

SIMULATE = [sys.executable, "-c", "from cli.simulate import app; app()"]
PREFIX = "fleet"


def say(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


# How often the database is asked while waiting: a poll every 50 ms of a count over
# 100,000 agents (a new connection each) kept a PostgreSQL backend at ~20% of a core,
# on the 2 cores being measured. Times are then known to within this.
POLL_S = 1.0


def wait_fleet(count: Callable[[], int], n: int, timeout: float, stall: float) -> None:
    """Until `count()` reaches n: a progress line a minute; give up after `timeout` s,
    or after `stall` s without one more agent online (a ramp that still moves is
    let finish: a 100,000-agent run on 2 cores was stopped at 3,600 s while it did)."""
    started = last_change = last_said = time.monotonic()
    best = -1
    while (k := count()) < n:
        now = time.monotonic()
        if k > best:
            best, last_change = k, now
        if now - last_said >= 60:
            say(f"{k} of {n} online after {now - started:.0f} s")
            last_said = now
        if now - started > timeout or now - last_change > stall:
            raise StackError(
                f"{k} of {n} agents online after {now - started:.0f} s"
                f" ({now - last_change:.0f} s without one more)"
            )
        time.sleep(POLL_S)


def scalar(database: str, sql: str, *args: Any) -> Any:
    with psycopg.connect(database, autocommit=True) as conn:
        row = conn.execute(sql, args).fetchone()
        return row[0] if row else None


def online(database: str) -> int:
    sql = "SELECT count(*) FROM agent_health WHERE state = 'online' AND agent_id LIKE %s"
    return int(scalar(database, sql, f"{PREFIX}-%"))


def rss_mib(pid: int | None) -> float | None:
    try:
        return round(psutil.Process(pid).memory_info().rss / 2**20, 1) if pid else None
    except psutil.Error:
        return None


def tree_rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return round(total / 2**20, 1)


def metric(stack: Stack, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(stack.metrics_url() + "/metrics", timeout=5) as resp:  # noqa: S310 (our own loopback URL)
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def page_count(database: str) -> tuple[int, int]:
    """`agents list --online --json`, 1,000 a page: (agents, pages)."""
    runner, after, total, pages = CliRunner(), None, 0, 0
    while True:
        args = ["list", "--online", "--json", "--limit", "1000", "--database-url", database]
        result = runner.invoke(agents_app, [*args, *(["--after", after] if after else [])])
        if result.exit_code != 0:
            raise RuntimeError(result.output)
        rows = orjson.loads(result.stdout)
        pages += 1
        total += sum(1 for r in rows if r["agent_id"].startswith(PREFIX))
        if len(rows) < 1000:
            return total, pages
        after = rows[-1]["agent_id"]


def wait_all_online(database: str, n: int, timeout: float) -> float:
    started = time.monotonic()
    wait_for(lambda: online(database) == n, timeout, f"{n} agents online", POLL_S)
    return round(time.monotonic() - started, 1)


# Seconds since the newest stored sample was taken: the bridge's backlog, roughly.
_NEWEST_AGE = (
    "SELECT extract(epoch FROM now() - max(time)) FROM telemetry"
    " WHERE time > now() - interval '10 minutes' AND agent_id LIKE %s"
)


def storms(stack: Stack, database: str, n: int, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    offline_sql = (
        "SELECT count(*) FROM agent_status_events WHERE state = 'offline' AND accepted"
        " AND time > %s AND agent_id LIKE %s"
    )
    # Back = online in a new session: a SIGKILLed broker publishes no will, so the
    # database says online throughout; what counts is every agent's next epoch.
    renewed_sql = (
        "SELECT count(*) FROM agents a JOIN agent_health h USING (agent_id)"
        " WHERE a.agent_id LIKE %s AND h.state = 'online' AND a.status_changed_at > %s"
        " AND coalesce(a.broker_id, 1) = ANY(%s)"
    )

    def storm(brokers: list[Any], kill: bool) -> dict[str, Any]:
        # The bridge caught up first (the newest stored sample is fresh): a broker
        # SIGKILLed with a backlog queued for the bridge loses that backlog (Mosquitto
        # keeps it in memory), which is the broker's durability, not the storm's cost.
        wait_for(lambda: float(scalar(database, _NEWEST_AGE, f"{PREFIX}-%") or 1e9) < 2.0,
                 timeout, "the bridge caught up before the storm", POLL_S)  # fmt: skip
        ids = [i + 1 for i, b in enumerate(stack.brokers()) if b in brokers]
        at_home = int(scalar(database, "SELECT count(*) FROM agents WHERE agent_id LIKE %s"
                                       " AND coalesce(broker_id, 1) = ANY(%s)",
                             f"{PREFIX}-%", ids))  # fmt: skip
        at = scalar(database, "SELECT now()")
        started = time.monotonic()
        for b in brokers:
            b.kill() if kill else b.stop()
        for b in brokers:
            b.start()
        wait_for(lambda: scalar(database, renewed_sql, f"{PREFIX}-%", at, ids) == at_home,
                 timeout, "every agent of the storm back in a new session", POLL_S)  # fmt: skip
        return {
            "agents": at_home,
            "seconds_to_all_back": round(time.monotonic() - started, 1),
            "offlines_recorded": int(scalar(database, offline_sql, at, f"{PREFIX}-%")),
        }

    brokers = stack.brokers()
    out["one_broker_killed"] = storm(brokers[:1], kill=True)
    say(f"broker 1 SIGKILLed and back: {out['one_broker_killed']}")
    out["all_brokers_restarted"] = storm(brokers, kill=False)
    say(f"every broker restarted: {out['all_brokers_restarted']}")
    time.sleep(5)  # whatever the reconnects sent is consumed
    out["false_offlines"] = n - online(database)
    # The gauge counts the batch being gathered too (live telemetry keeps arriving), so
    # one reading may catch a few; what must not happen is a window that never drains:
    # the lowest reading over up to 15 s, stopping at 0.
    lowest, deadline = float("inf"), time.monotonic() + 15
    while lowest > 0 and time.monotonic() < deadline:
        lowest = min(lowest, metric(stack, "eucora_unacked_in_flight"))
        time.sleep(0.05)
    out["bridge_unacked_after"] = lowest
    return out


class RawPublisher:
    """QoS 1 publishes on one broker's service listener, waiting for every PUBACK."""

    def __init__(self, url: str) -> None:
        from schemas.config import MqttUrl

        u = MqttUrl.parse(url)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4()}",
                                  protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
        self.client.username_pw_set(u.username, u.password)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.acked = 0
        self.lock = threading.Lock()
        self.client.on_publish = self._on_publish
        self.client.connect(u.host, u.port)
        self.client.loop_start()

    def _on_publish(self, *_a: Any) -> None:
        with self.lock:
            self.acked += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def fanout(stack: Stack, database: str, n: int, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    result = CliRunner().invoke(
        tasks_app,
        # Every simulated agent runs "linux" (--platform above), and the stack is ours alone.
        ["create", "--platform", "linux", "--type", "HEALTHCHECK", "--json",
         "--database-url", database],
    )  # fmt: skip
    if result.exit_code != 0:
        raise RuntimeError(result.output)
    created = round(time.monotonic() - started, 1)
    correlation = orjson.loads(result.stdout)[0]["correlation_id"]
    count = "SELECT count(*) FROM tasks WHERE correlation_id = %s AND "
    wait_for(lambda: scalar(database, count + "attempts > 0", correlation) == n, timeout,
             "every task published", 0.25)  # fmt: skip
    published = round(time.monotonic() - started, 1)
    wait_for(lambda: scalar(database, count + "status <> 'PENDING'", correlation) == n, timeout,
             "every task acknowledged", 0.25)  # fmt: skip
    assigned = round(time.monotonic() - started, 1)
    # And finished: what follows (a storm SIGKILLs a broker) must not meet the agents'
    # last reports still queued there, with samples among them (a killed broker loses
    # what it queued for the bridge: docs/scale.md).
    terminal = [s.value for s in TERMINAL]
    wait_for(lambda: scalar(database, count + "status = ANY(%s)", correlation, terminal) == n,
             timeout, "every task finished", 0.25)  # fmt: skip
    finished = round(time.monotonic() - started, 1)
    # The baseline: the same number of messages of the same size to the same topics.
    tree = TopicTree()
    with psycopg.connect(database) as conn:
        homes = conn.execute(
            "SELECT a.agent_id, b.url FROM agents a JOIN brokers b USING (broker_id)"
            " WHERE a.agent_id LIKE %s", (f"{PREFIX}-%",),
        ).fetchall()  # fmt: skip
        size = scalar(database, "SELECT avg(octet_length(payload::text) + 200)::int FROM tasks"
                                " WHERE correlation_id = %s", correlation)  # fmt: skip
    publishers = {b.service_endpoint: RawPublisher(b.url(identity.BRIDGE_USER))
                  for b in stack.brokers()}  # fmt: skip
    pad = "x" * max(0, int(size) - 60)
    started = time.monotonic()
    for agent_id, url in homes:
        body = orjson.dumps({"cancel": str(uuid.uuid4()), "correlation_id": pad})
        publishers[url].client.publish(tree.agent(agent_id, Kind.TASKS), body, qos=1)
    wait_for(lambda: sum(p.acked for p in publishers.values()) >= len(homes), timeout,
             "every raw PUBACK")  # fmt: skip
    raw = round(time.monotonic() - started, 1)
    for p in publishers.values():
        p.close()
    return {
        "tasks": n,
        "seconds_create": created,
        "seconds_to_all_published": published,
        "seconds_to_all_assigned": assigned,
        "seconds_to_all_finished": finished,
        "raw_publisher_seconds_to_all_pubacks": raw,
        "ratio_published_vs_raw": round(published / max(raw, 0.1), 2),
    }


def telemetry_window(database: str, n: int, interval: float, window: float) -> dict[str, Any]:
    start = scalar(database, "SELECT now()")
    time.sleep(window + 5)  # and the last samples' lag
    with psycopg.connect(database, autocommit=True) as conn:
        rows, p50, p99 = conn.execute(
            "SELECT count(*),"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - time)),"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM received_at - time))"
            " FROM telemetry WHERE time >= %s AND time < %s + make_interval(secs => %s)"
            " AND agent_id LIKE %s",
            (start, start, window, f"{PREFIX}-%"),
        ).fetchone()  # type: ignore[misc]
    return {
        "window_s": window,
        "samples_stored": rows,
        "samples_expected": round(n * window / interval),
        "rows_per_s": round(rows / window, 1),
        "lag_p50_s": round(p50 or 0, 3),
        "lag_p99_s": round(p99 or 0, 3),
    }


def main() -> None:
    # A stopped benchmark must stop its stack too: SIGTERM ends it through the `finally`
    # (by default it killed only this process and left 7 brokers, the bridge and
    # PostgreSQL running with a fleet's sessions).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--brokers", type=int, default=7)
    parser.add_argument("--telemetry-interval", type=float, default=60)
    parser.add_argument("--telemetry-window", type=float, default=600)
    parser.add_argument("--connect-rate", type=float, default=2000)
    parser.add_argument("--timeout", type=float, default=1800, help="longest wait of a phase, s")
    parser.add_argument("--stall", type=float, default=600, help="give up a ramp stuck this many s")
    parser.add_argument("--skip", nargs="*", default=[], choices=["storms", "fanout", "telemetry"])
    args = parser.parse_args()
    print(orjson.dumps(run(args)).decode(), flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.agents
    report: dict[str, Any] = {"agents": n, "brokers": args.brokers, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="eucora-bench-fleet-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 (the broker and database accounts must reach it)
        stack = Stack(Path(tmp) / "stack")
        stack.up(
            mqtt_port=free_port_range(args.brokers),
            service_port=free_port_range(args.brokers),
            db_port=free_port(), metrics_port=free_port(), durable=False, brokers=args.brokers,
        )  # fmt: skip
        database = stack.database_url()
        log = Path(tmp) / "simulate.log"
        env = os.environ | stack.env()
        command = [*SIMULATE, "--agents", str(n), "--prefix", PREFIX, "--platform", "linux",
                   "--telemetry-interval", str(args.telemetry_interval),
                   "--heartbeat-interval", "60", "--connect-rate", str(args.connect_rate),
                   "--json"]  # fmt: skip
        started = time.monotonic()
        with open(log, "ab") as out:
            # Its own process group: its worker processes go with it when killed.
            sim = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            wait_fleet(lambda: n if sim.poll() is not None else online(database), n,
                       args.timeout, args.stall)  # fmt: skip
            if sim.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            total, pages = page_count(database)
            report["connect"] = {
                "seconds_to_all_online": round(time.monotonic() - started, 1),
                "listed_online": total,
                "pages": pages,
                "rss_mib": {
                    "brokers": [rss_mib(b.pid) for b in stack.brokers()],
                    "bridge": rss_mib(stack.state().get("bridge_pid")),
                    "simulator": tree_rss_mib(sim.pid),
                },
            }
            say(f"connect: {report['connect']}")
            if "telemetry" not in args.skip:
                report["telemetry"] = telemetry_window(
                    database, n, args.telemetry_interval, args.telemetry_window
                )
                say(f"telemetry: {report['telemetry']}")
            if "fanout" not in args.skip:
                report["fanout"] = fanout(stack, database, n, args.timeout)
                say(f"fan-out: {report['fanout']}")
            if "storms" not in args.skip:
                report["storms"] = storms(stack, database, n, args.timeout)
                say(f"storms: {report['storms']}")
            sim.send_signal(signal.SIGTERM)
            sim.wait(600)
            text = log.read_text()
            summary = orjson.loads(text[text.rindex("\n{") :])
            sent = summary["telemetry_sent"] + summary["extra"]["telemetry_buffered_sent"]

            def stored_now() -> int:
                return int(scalar(database, "SELECT count(*) FROM telemetry"
                                            " WHERE agent_id LIKE %s", f"{PREFIX}-%"))  # fmt: skip

            # The bridge may still be working through a backlog: wait until what was
            # sent is stored, or until nothing more arrives for 30 s (then report).
            last, quiet_since = -1, time.monotonic()
            while (stored := stored_now()) < sent and time.monotonic() - quiet_since < 30:
                if stored != last:
                    last, quiet_since = stored, time.monotonic()
                time.sleep(1)
            report["telemetry_once"] = {"sent_by_simulator": sent, "stored": stored}
            report["simulator"] = {
                "processes": len(summary["extra"].get("processes", [])) or 1,
                "cpu_percent_of_one_core": summary["cpu_percent"],
            }
        finally:
            # The whole group: a SIGKILLed parent leaves its simulator processes running
            # (seen after a timed-out 100,000-agent run: 7 of them, a core's worth).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sim.pid, signal.SIGKILL)
            sim.wait(30)
            stack.down()
    return report


if __name__ == "__main__":
    main()
