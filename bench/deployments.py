"""A rollout to N agents with no rate limit (`eucora deployments create`), against the
same N DEPLOY tasks created with `eucora tasks create`, in the same run.

    python -m bench.deployments [--agents 10000] [--deploy-duration 2] [--rounds 1]

Starts its own stack (broker with the project's config, PostgreSQL, bridge) in a
temporary folder, with the agents' accounts provisioned in bulk up front
(bench/simulate.py `preprovision`).
The agents are the simulator's (agent.simulator.Fleet, one process, one thread, every
agent `linux`), so both paths are played by the same code: a DEPLOY runs for
`--deploy-duration` s (+-30 %) and succeeds; a deployment's DEPLOY also reports
PENDING, IN_PROGRESS and SUCCESS on deployment-status.

Per round, each measured from the start of the CLI process (its Python start-up
included) with the CPU time (user + system, /proc/PID/stat through psutil) of the
bridge, the broker, the simulator and the database (postmaster and live backends) over
the same span:
- tasks: `eucora tasks create --platform linux --type DEPLOY` until the database shows
  all N COMPLETED;
- deployment: `eucora deployments create --platform linux` (no --rate, no
  --max-in-flight) until every target is SUCCESS, and until the deployment is COMPLETED.
Prints one JSON document: every round, and the ratios deployment / tasks.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg

from agent.simulator import Fleet, FleetOptions
from bench.simulate import AGENT_URL_ENV, agent_env, preprovision
from schemas.config import MqttUrl
from schemas.states import Platform
from service.stack.process import free_port
from service.stack.stack import Stack

CLI = [sys.executable, "-m", "cli"]  # `eucora`, as installed
COMMAND = {"command": ["true"]}
POLL_S = 0.25


def child(args: argparse.Namespace) -> None:
    """The simulated fleet, until SIGTERM (a separate process: its own sockets)."""
    passwords = orjson.loads(Path(args.passwords).read_bytes())
    options = FleetOptions(
        agents=args.agents, prefix=f"pre{args.agents}", platform=Platform.LINUX,
        # Little besides the tasks: the measure is the tasks' cost.
        telemetry_interval=120, heartbeat_interval=120, connect_rate=500,
        deploy_duration=args.deploy_duration,
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


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float) -> None:
    """Poll `check` every `every` s (the database's share of 2 cores matters here)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def cpu_s(p: psutil.Process) -> float:
    """CPU seconds (user + system) of a process; for the database's postmaster, of it
    and its live backends (a backend that exited takes its share with it: the bridge's
    connections stay, so this misses only the CLI's own)."""
    procs = [p, *p.children(recursive=True)] if p.name().startswith("postgres") else [p]
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


class Probe:
    """The bridge's (and the other processes') CPU seconds over one measured span."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs
        self.t0 = time.monotonic()
        self.cpu0 = {name: cpu_s(p) for name, p in procs.items()}

    def read(self) -> dict[str, float]:
        out = {"seconds": time.monotonic() - self.t0}
        for name, p in self.procs.items():
            out[f"{name}_cpu_s"] = cpu_s(p) - self.cpu0[name]
        return out


def one(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def run_tasks(stack: Stack, conn: psycopg.Connection[Any], n: int, procs: Any) -> dict[str, Any]:
    env = os.environ | {"EUCORA_DATABASE_URL": stack.database_url()}
    corr = f"bench-{uuid.uuid4()}"  # the tasks of this command
    probe = Probe(procs)
    out = subprocess.run(
        [*CLI, "tasks", "create", "--platform", "linux", "--type", "DEPLOY",
         "--payload", orjson.dumps(COMMAND).decode(), "--correlation-id", corr, "--json"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    cli = time.monotonic() - probe.t0
    made = orjson.loads(out.stdout)
    assert len(made) == n, f"{len(made)} tasks for {n} agents"
    completed = "SELECT count(*) FROM tasks WHERE correlation_id = %s AND status = 'COMPLETED'"
    wait_for(lambda: one(conn, completed, corr) == n, 900, "every task COMPLETED", POLL_S)
    done = probe.read()
    return {"cli_s": cli, "all_completed_s": done.pop("seconds"), **done}


def run_deployment(
    stack: Stack, conn: psycopg.Connection[Any], n: int, procs: Any
) -> dict[str, Any]:
    env = os.environ | {"EUCORA_DATABASE_URL": stack.database_url()}
    probe = Probe(procs)
    out = subprocess.run(
        [*CLI, "deployments", "create", "--platform", "linux",
         "--payload", orjson.dumps(COMMAND).decode(), "--json"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    cli = time.monotonic() - probe.t0
    made = orjson.loads(out.stdout)
    assert made["targets"] == n, made
    did = made["deployment_id"]
    success = "SELECT count(*) FROM deployment_status WHERE deployment_id = %s AND status = %s"
    wait_for(lambda: one(conn, success, did, "SUCCESS") == n, 900, "every SUCCESS", POLL_S)
    at_success = probe.read()
    state = "SELECT status FROM deployments WHERE deployment_id = %s"
    wait_for(lambda: one(conn, state, did) == "COMPLETED", 300, "COMPLETED", POLL_S)
    at_completed = probe.read()
    tasks = one(conn, "SELECT count(*) FROM tasks WHERE deployment_id = %s", did)
    own = one(
        conn,
        "SELECT count(DISTINCT agent_id) FROM deployment_status_events WHERE"
        " deployment_id = %s AND source = 'agent' AND accepted AND status = 'SUCCESS'",
        did,
    )
    return {
        "cli_s": cli,
        "all_success_s": at_success.pop("seconds"),
        **at_success,
        "completed_s": at_completed["seconds"],
        "bridge_cpu_s_to_completed": at_completed["bridge_cpu_s"],
        "deploy_tasks": tasks,
        "success_reported_by_agents": own,
    }


def quiet(procs: dict[str, psutil.Process], below: float = 0.15, timeout: float = 120) -> None:
    """Wait until the bridge is idle again (under `below` of a core over a second)."""
    bridge = procs["bridge"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c0 = cpu_s(bridge)
        time.sleep(1)  # a measuring window, not a wait for a condition
        if cpu_s(bridge) - c0 < below:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--deploy-duration", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--passwords", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    n = args.agents
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="eucora-bench-deploy-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 (the broker and database accounts must reach it)
        stack = Stack(Path(tmp) / "stack")
        stack.up(
            mqtt_port=free_port(), mqtts_port=free_port(), service_port=free_port(),
            db_port=free_port(), metrics_port=free_port(), durable=False,
        )  # fmt: skip
        passwords = preprovision(stack, [n])
        log = Path(tmp) / "simulate.log"
        with open(log, "ab") as out:
            sim = subprocess.Popen(
                [sys.executable, "-m", "bench.deployments", "--child", "--agents", str(n),
                 "--passwords", str(passwords), "--deploy-duration", str(args.deploy_duration)],
                env=os.environ | agent_env(stack), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        status = stack.status()
        procs = {
            "bridge": psutil.Process(status["bridge"]["pid"]),
            "broker": psutil.Process(status["broker"]["pid"]),
            "simulator": psutil.Process(sim.pid),
            "database": psutil.Process(status["database"]["pid"]),
        }
        try:
            with psycopg.connect(stack.database_url(), autocommit=True) as conn:
                t0 = time.monotonic()
                online = "SELECT count(*) FROM agents WHERE status = 'online' AND platform = %s"
                wait_for(
                    lambda: one(conn, online, "linux") == n or sim.poll() is not None,
                    900,
                    "every agent online",
                    1.0,
                )
                if sim.poll() is not None:
                    raise RuntimeError(f"simulator exited: {log.read_text()[-2000:]}")
                print(f"# {n} agents online in {time.monotonic() - t0:.0f} s", file=sys.stderr)
                for r in range(args.rounds):
                    quiet(procs)
                    tasks = run_tasks(stack, conn, n, procs)
                    print(orjson.dumps({"round": r + 1, "tasks": tasks}).decode(),
                          file=sys.stderr, flush=True)  # fmt: skip
                    quiet(procs)
                    deployment = run_deployment(stack, conn, n, procs)
                    print(orjson.dumps({"round": r + 1, "deployment": deployment}).decode(),
                          file=sys.stderr, flush=True)  # fmt: skip
                    rounds.append({"round": r + 1, "tasks": tasks, "deployment": deployment})
        finally:
            sim.send_signal(signal.SIGTERM)
            try:
                sim.wait(120)
            except subprocess.TimeoutExpired:
                sim.kill()
            stack.down()

    def r3(doc: dict[str, Any]) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in doc.items()}

    last = rounds[-1]
    t, d = last["tasks"], last["deployment"]
    print(
        orjson.dumps(
            {
                "agents": n,
                "deploy_duration_s": args.deploy_duration,
                "cpus": os.cpu_count(),
                "rounds": [
                    {
                        "round": x["round"],
                        "tasks": r3(x["tasks"]),
                        "deployment": r3(x["deployment"]),
                    }
                    for x in rounds
                ],
                "ratio_time_all_success_vs_all_completed": round(
                    d["all_success_s"] / t["all_completed_s"], 2
                ),
                "ratio_bridge_cpu": round(d["bridge_cpu_s"] / t["bridge_cpu_s"], 2),
            },
            option=orjson.OPT_INDENT_2,
        ).decode()
    )


if __name__ == "__main__":
    main()
