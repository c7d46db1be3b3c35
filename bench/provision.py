"""Provisioning benchmark: a fleet's broker accounts at scale, on sharded brokers.

    python -m bench.provision [--agents 100000] [--brokers 2]

Starts its own stack (`--brokers` Mosquittos from the project's config sharing one
auth folder, PostgreSQL, no bridge) in a temporary folder and measures, through the
real `eucora` commands (a separate process each, Python start-up included):

1. `eucora agents provision --from-file F --json` for `--agents` agents (hashing,
   one COPY into the registry, one append to the password file, one SIGHUP per
   broker, printing every config); against a baseline in the same run: the
   same number of mosquitto `$7$` lines hashed and written by one Python loop
   (the least any file-based provisioning costs).
2. One more agent with the fleet in place: the command's time and the time from its
   start until the agent's first connection succeeds, both as a process and run
   in-process (the same Typer app through CliRunner: what the command costs after
   Python's start-up, which `eucora --version` measures alone); baseline:
   `mosquitto_passwd -b` adding one user to a copy of the same file.
3. `eucora agents revoke` of an agent at home on the last broker and connected to
   every broker (as a process, and in-process for a second one): the time until all
   its connections are dropped, and until every broker refuses a new one.
4. Each broker's RSS (VmRSS from /proc) with the fleet's file loaded.

Prints one JSON document. Speed depends on the machine: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas.config import MqttUrl
from service import identity
from service.stack.process import free_port, free_port_range
from service.stack.stack import Stack


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def in_process(env: dict[str, str], *args: str) -> tuple[float, str]:
    """The same command through the Typer app in this process (no interpreter start)."""
    from typer.testing import CliRunner

    from cli.main import app

    t0 = time.perf_counter()
    result = CliRunner().invoke(app, list(args), env=env)
    took = time.perf_counter() - t0
    if result.exit_code != 0:
        raise RuntimeError(f"eucora {' '.join(args)}: {result.output.strip()}")
    return took, result.stdout


def eucora(env: dict[str, str], *args: str, stdin: str | None = None) -> tuple[float, str]:
    """Run a real `eucora` command; its wall time and stdout."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=os.environ | env, input=stdin, capture_output=True, text=True, check=False,
    )  # fmt: skip
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"eucora {' '.join(args)}: {done.stderr.strip()}")
    return took, done.stdout


class Client:
    """One agent connection; `connect()` says whether the broker accepted it."""

    def __init__(self, url: str, username: str, password: str, ca_file: str | None) -> None:
        target = MqttUrl.parse(url)
        self.target = target
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=username, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.username_pw_set(username, password)
        if target.tls:
            self.client.tls_set(ca_certs=ca_file)
        self.answer = threading.Event()
        self.accepted = False
        self.dropped = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.dropped.set()

    def _on_connect(self, c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.accepted = not reason.is_failure
        if reason.is_failure:
            c.disconnect()
        self.answer.set()

    def connect(self, timeout: float = 10) -> bool:
        self.client.connect(self.target.host, self.target.port, keepalive=60)
        self.client.loop_start()
        if not self.answer.wait(timeout):
            raise TimeoutError("no CONNACK")
        return self.accepted

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def attempt(url: str, doc: dict[str, Any]) -> bool:
    c = Client(url, doc["username"], doc["password"], doc["ca_file"])
    try:
        return c.connect()
    finally:
        c.close()


def poll(check: Any, timeout: float = 60) -> float:
    """Seconds until check() holds (polled without pause: the latency is the point)."""
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("condition not reached")
    return time.perf_counter() - t0


def revocation(
    stack: Stack, env: dict[str, str], doc: dict[str, Any], run: Any
) -> tuple[float, float, float]:
    """The agent connected to every broker, then revoked: the command's time, the time
    until every connection is dropped, and until every broker refuses a new one."""
    clients = [Client(b.agent_url, doc["username"], doc["password"], doc["ca_file"])
               for b in stack.brokers()]  # fmt: skip
    assert all(c.connect() for c in clients), "the agent could not connect"
    t0 = time.perf_counter()
    command_s, _ = run(env, "agents", "revoke", doc["agent_id"])
    for c in clients:
        c.dropped.wait(60)
    dropped_s = time.perf_counter() - t0
    for b in stack.brokers():
        poll(lambda b=b: not attempt(b.agent_url, doc))
    refused_s = time.perf_counter() - t0
    for c in clients:
        c.close()
    return command_s, dropped_s, refused_s


def baseline_write(n: int, path: Path) -> float:
    """Hash n passwords and write their lines: the floor of any file-based way."""
    t0 = time.perf_counter()
    hashes = {f"base-{i:06d}": identity.hash_password(identity.new_password()) for i in range(n)}
    path.write_text(identity.password_lines(hashes))
    return time.perf_counter() - t0


def baseline_passwd(agents_file: Path, tmp: Path) -> float:
    copy = tmp / "passwd-copy"
    shutil.copy(agents_file, copy)
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    t0 = time.perf_counter()
    subprocess.run([tool, "-b", str(copy), "extra-base", identity.new_password()], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=100_000)
    ap.add_argument("--brokers", type=int, default=2)
    args = ap.parse_args()
    n = args.agents
    with tempfile.TemporaryDirectory(prefix="eucora-bench-prov-") as tmp:
        os.chmod(tmp, 0o755)  # noqa: S103 (the broker and database accounts must reach it)
        root = Path(tmp)
        stack = Stack(root / "stack")
        stack.up(
            mqtt_port=free_port_range(args.brokers), service_port=free_port_range(args.brokers),
            db_port=free_port(), metrics_port=free_port(), durable=False, bridge=False,
            brokers=args.brokers,
        )  # fmt: skip
        env = stack.env()
        try:
            ids = root / "fleet.txt"
            ids.write_text("".join(f"agent-{i:06d}\n" for i in range(n)))
            fleet_s, out = eucora(env, "agents", "provision", "--from-file", str(ids), "--json")
            docs = json.loads(out)
            base_s = baseline_write(n, root / "baseline.passwd")

            one_t0 = time.perf_counter()
            one_s, out = eucora(env, "agents", "provision", "extra-1", "--json")
            extra = json.loads(out)
            poll(lambda: attempt(extra["mqtt_url"], extra))
            usable_s = time.perf_counter() - one_t0
            passwd_s = baseline_passwd(stack.auth_dir / "agents.passwd", root)
            start_s = min(eucora(env, "--version")[0] for _ in range(3))
            in_process(env, "agents", "provision", "warm-up", "--json")  # imports loaded
            two_t0 = time.perf_counter()
            two_s, out = in_process(env, "agents", "provision", "extra-2", "--json")
            extra2 = json.loads(out)
            poll(lambda: attempt(extra2["mqtt_url"], extra2))
            usable2_s = time.perf_counter() - two_t0

            last = stack.brokers()[-1].agent_url
            victims = [d for d in docs if d["mqtt_url"] == last]
            revoke_s, dropped_s, refused_s = revocation(stack, env, victims[0], eucora)
            revoke2_s, dropped2_s, refused2_s = revocation(stack, env, victims[-1], in_process)
            result = {
                "agents": n,
                "brokers": args.brokers,
                "provision_fleet_s": round(fleet_s, 2),
                "baseline_hash_and_write_s": round(base_s, 2),
                "fleet_vs_baseline": round(fleet_s / base_s, 2),
                "python_start_eucora_version_ms": round(start_s * 1000),
                "one_more_command_ms": round(one_s * 1000),
                "one_more_until_it_connects_ms": round(usable_s * 1000),
                "one_more_in_process_ms": round(two_s * 1000),
                "one_more_in_process_until_it_connects_ms": round(usable2_s * 1000),
                "baseline_mosquitto_passwd_ms": round(passwd_s * 1000),
                "revoke_command_ms": round(revoke_s * 1000),
                "revoke_until_dropped_everywhere_ms": round(dropped_s * 1000),
                "revoke_until_refused_everywhere_ms": round(refused_s * 1000),
                "revoke_in_process_ms": round(revoke2_s * 1000),
                "revoke_in_process_until_dropped_everywhere_ms": round(dropped2_s * 1000),
                "revoke_in_process_until_refused_everywhere_ms": round(refused2_s * 1000),
                "broker_rss_mib": [rss_mib(b.pid) for b in stack.brokers()],
                "password_file_mib": round(
                    (stack.auth_dir / "agents.passwd").stat().st_size / 2**20, 1
                ),
            }
        finally:
            stack.down()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
