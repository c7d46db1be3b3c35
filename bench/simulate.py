"""Simulator load: CPU and memory of `eucora simulate` holding N agents, end to end.

    python -m bench.simulate [--agents 1000 2000 5000] [--seconds 60] [--telemetry-interval 10]
    python -m bench.simulate --preprovisioned --agents 5000 10000


Starts its own stack (broker with the project's config, PostgreSQL, bridge) in a
temporary folder; for each N runs the simulator as a separate process, waits until
every agent is connected, lets it settle, then samples the simulator's CPU time and
RSS over `--seconds` (steady state: telemetry, heartbeats, keepalives), checks that
the database sees N agents online, and stops the fleet. Prints one JSON line per N.

`--preprovisioned` provisions every fleet's accounts up front (registry and password
file, as `eucora agents provision` does) and runs the fleet (the same
agent.simulator.Fleet) in a child process without `eucora simulate`, to measure what
the simulator itself holds.
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

from agent.simulator import Fleet, FleetOptions
from cli.access import provision_fleet
from schemas.config import MqttUrl
from service import identity
from service.db.connect import connect
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


# What a pre-provisioned fleet's child process connects to: the plain agent listener.
AGENT_URL_ENV = "EUCORA_BENCH_AGENT_URL"


def preprovision(stack: Stack, counts: list[int]) -> Path:
    """Accounts for every fleet, in bulk, on the running stack; returns a JSON file of
    their passwords (agent_id -> password)."""
    passwords = {f"pre{n}-{i:05d}": identity.new_password() for n in counts for i in range(n)}
    with connect(stack.database_url()) as conn:
        provision_fleet(conn, identity.AuthDir(stack.auth_dir), passwords)
    out = stack.dir / "passwords.json"
    out.write_bytes(orjson.dumps(passwords))
    return out


def agent_env(stack: Stack) -> dict[str, str]:
    return stack.env() | {AGENT_URL_ENV: f"mqtt://127.0.0.1:{stack.broker().port}"}


def child(args: argparse.Namespace) -> None:
    """Run one pre-provisioned fleet until SIGTERM (a separate process, measured)."""
    passwords = orjson.loads(Path(args.passwords).read_bytes())
    options = FleetOptions(
        agents=args.agents[0], prefix=f"pre{args.agents[0]}",
        telemetry_interval=args.telemetry_interval, connect_rate=500,
    )  # fmt: skip
    fleet = Fleet(options, MqttUrl.parse(os.environ[AGENT_URL_ENV]), passwords,
                  on_progress=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
    stopping = False

    def stop(_s: int, _f: object) -> None:
        nonlocal stopping
        stopping = True
        fleet.loop.call_soon_threadsafe(fleet.stop)

    signal.signal(signal.SIGTERM, stop)
    fleet.start()
    fleet.loop.run(until=lambda: stopping and fleet.all_stopped())


def measure(
    stack: Stack,
    n: int,
    seconds: float,
    interval: float,
    log: Path,
    passwords: Path | None = None,
) -> dict[str, Any]:
    env = os.environ | agent_env(stack)
    prefix = f"pre{n}" if passwords else f"bench{n}"
    started = time.monotonic()
    if passwords:
        command = [sys.executable, "-m", "bench.simulate", "--child", "--agents", str(n),
                   "--passwords", str(passwords),
                   "--telemetry-interval", str(interval)]  # fmt: skip
    else:
        command = [*SIMULATE, "--agents", str(n), "--prefix", prefix,
                   "--telemetry-interval", str(interval), "--connect-rate", "500"]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
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
        "provisioned": "up front, in bulk" if passwords else "by eucora simulate",
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
    parser.add_argument("--preprovisioned", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--passwords", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="eucora-bench-sim-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 (the broker and database accounts must reach it)
        stack = Stack(Path(tmp) / "stack")
        stack.up(
            mqtt_port=free_port(), mqtts_port=free_port(), service_port=free_port(),
            db_port=free_port(), metrics_port=free_port(), durable=False,
        )  # fmt: skip
        passwords = preprovision(stack, args.agents) if args.preprovisioned else None
        print("# stack up; its `stack env` set for the simulator", file=sys.stderr)
        try:
            for n in args.agents:
                log = Path(tmp) / f"simulate-{n}.log"
                result = measure(stack, n, args.seconds, args.telemetry_interval, log, passwords)
                print(orjson.dumps(result).decode(), flush=True)
        finally:
            stack.down()


if __name__ == "__main__":
    main()
