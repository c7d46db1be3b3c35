"""Simulator load: CPU and memory of `eucora simulate` holding N agents, end to end.

    python -m bench.simulate [--agents 1000 2000 5000] [--seconds 60] [--telemetry-interval 10]

Starts its own stack (broker with the project's config, PostgreSQL, bridge) in a
temporary folder; for each N runs the simulator as a separate process, waits until
every agent is connected, lets it settle, then samples the simulator's CPU time and
RSS over `--seconds` (steady state: telemetry, heartbeats, keepalives), checks that
the database sees N agents online, and stops the fleet. Prints one JSON line per N.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg

from service.config import ADMIN_URL_ENV
from service.stack.process import free_port, wait_for
from service.stack.stack import Stack

SIMULATE = [sys.executable, "-c", "from cli.simulate import app; app()"]


def online(database_url: str, prefix: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM agents WHERE status = 'online' AND NOT stale"
            " AND agent_id LIKE %s",
            (f"{prefix}-%",),
        ).fetchone()
        return int(row[0]) if row else 0


def measure(stack: Stack, n: int, seconds: float, interval: float, log: Path) -> dict[str, Any]:
    env = os.environ | stack.env()
    prefix = f"bench{n}"
    started = time.monotonic()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*SIMULATE, "--agents", str(n), "--prefix", prefix,
             "--telemetry-interval", str(interval), "--connect-rate", "500"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    ps = psutil.Process(proc.pid)
    database = stack.database_url()
    try:
        wait_for(lambda: online(database, prefix) == n or proc.poll() is not None, 900, "online")
        if proc.poll() is not None:
            raise RuntimeError(f"simulator exited: {log.read_text()[-2000:]}")
        ready = time.monotonic() - started
        time.sleep(10)  # settle: the start-up burst (registrations, inventories) is over
        cpu0 = sum(ps.cpu_times()[:2])
        t0 = time.monotonic()
        rss = []
        while time.monotonic() - t0 < seconds:
            rss.append(ps.memory_info().rss)
            time.sleep(1)
        cpu = sum(ps.cpu_times()[:2]) - cpu0
        wall = time.monotonic() - t0
        still = online(database, prefix)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {
        "agents": n,
        "online_in_db": still,
        "seconds_to_all_online": round(ready, 1),
        "telemetry_interval_s": interval,
        "cpu_percent_of_one_core": round(100 * cpu / wall, 1),
        "rss_mib_max": round(max(rss) / 2**20, 1),
        "rss_kib_per_agent": round(max(rss) / 1024 / n, 1),
        "messages_per_s": round(n / interval + n / 60, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1000])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--telemetry-interval", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eucora-bench-sim-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 (the broker and database accounts must reach it)
        stack = Stack(Path(tmp) / "stack")
        stack.up(
            mqtt_port=free_port(), mqtts_port=free_port(), db_port=free_port(),
            metrics_port=free_port(), durable=False,
        )  # fmt: skip
        print(f"# stack up; {ADMIN_URL_ENV} set for the simulator", file=sys.stderr)
        try:
            for n in args.agents:
                log = Path(tmp) / f"simulate-{n}.log"
                result = measure(stack, n, args.seconds, args.telemetry_interval, log)
                print(orjson.dumps(result).decode(), flush=True)
        finally:
            stack.down()


if __name__ == "__main__":
    main()
