"""Provisioning benchmark: broker accounts for a fleet, and what they cost the broker.

    python -m bench.provision [--agents 10000] [--chunks 1,20,200] [--adaptive 0.5]
                              [--no-offline] [--no-acl-file]

Each run starts a fresh broker from the project's config (service.stack.broker) and
gives it `--agents` agents through BrokerAdmin.provision_many: with the product's
adaptive message size (`--adaptive`: each $CONTROL message should keep the broker
busy about that many seconds) and with any fixed sizes given by `--chunks`. Mosquitto
2.0.11's plugin rewrites its whole JSON file after every command and the broker
serves nobody meanwhile, so each run also reports the slowest PUBACK a probe client
got during provisioning. Reported per run: the time, the broker's RSS (VmRSS/VmHWM
from /proc/PID/status) before and after, the plugin file's size, then, with the fleet
in place: the latency of one more provision and one revoke (what `eucora agents
provision/revoke` cost), a restart (the plugin loads its file), and a sample of agents
connecting with their passwords. The offline path (Broker.seed_agents: the fleet
written into the file while the broker is stopped) is measured too.

The alternative, the classic password_file + acl_file with `pattern` lines and
`use_username_as_clientid`, is measured for comparison: the same fleet written as
files, and the time from adding one agent until it can connect (a SIGHUP reload).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas.config import MqttUrl
from schemas.topics import Kind, TopicTree
from service import dynsec
from service.broker_admin import MAX_STALL_S as ADAPTIVE_STALL_S
from service.broker_admin import BrokerAdmin
from service.stack.broker import Broker, find_mosquitto
from service.stack.process import free_port, port_open, spawn, wait_for

TREE = TopicTree()


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


@contextmanager
def fresh_broker(extra: str = "") -> Iterator[Broker]:
    root = Path(tempfile.mkdtemp(prefix="eucora-bench-"))
    os.chmod(root, 0o755)  # noqa: S103 (the broker may run as the mosquitto account)
    users = (dynsec.ADMIN_USER, dynsec.BRIDGE_USER, dynsec.OPERATOR_USER)
    broker = Broker(
        data_dir=root / "mosquitto",
        port=free_port(),
        passwords={u: dynsec.new_password() for u in users},
        extra=extra,
    )
    try:
        broker.start()
        yield broker
    finally:
        broker.kill()
        shutil.rmtree(root, ignore_errors=True)


def can_connect(port: int, username: str, password: str, client_id: str) -> bool:
    result: list[bool] = []
    done = threading.Event()
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    c.username_pw_set(username, password)

    def on_connect(cl: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result.append(not reason.is_failure)
        cl.disconnect()
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(10)
    c.loop_stop()
    return bool(result and result[0])


class StallProbe:
    """Publishes at QoS 1 every 20 ms on the bridge account and records the slowest
    PUBACK: how long the broker served nobody while it ran the admin's commands."""

    def __init__(self, broker: Broker):
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id="stall-probe",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set(dynsec.BRIDGE_USER, broker.passwords[dynsec.BRIDGE_USER])
        connected = threading.Event()
        self.client.on_connect = lambda *_: connected.set()
        self.client.connect("127.0.0.1", broker.port, keepalive=300)
        self.client.loop_start()
        assert connected.wait(10), "the stall probe could not connect"
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        topic = TREE.agent("stall-probe", Kind.TASKS)
        while not self._stop.wait(0.02):  # pacing of the probe, not a wait on a condition
            t0 = time.perf_counter()
            self.client.publish(topic, b"{}", qos=1).wait_for_publish(600)
            self.worst = max(self.worst, time.perf_counter() - t0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.client.disconnect()
        self.client.loop_stop()
        return self.worst


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_dynsec(n: int, chunk: int, max_stall: float | None, samples: int = 20) -> dict[str, Any]:
    passwords = {f"agent-{i:06d}": dynsec.new_password() for i in range(n)}
    with fresh_broker() as broker:
        assert broker.pid is not None
        admin_url = MqttUrl.parse(broker.url(dynsec.ADMIN_USER))
        before = rss_kib(broker.pid)
        with BrokerAdmin(admin_url, timeout=600) as admin:
            messages = 0

            def run() -> None:
                nonlocal messages
                messages = admin.provision_many(passwords, chunk=chunk, max_stall=max_stall)

            probe = StallProbe(broker)
            seconds = timed(run)
            worst_stall = probe.stop()
            after = rss_kib(broker.pid)
            # One more agent, as `eucora agents provision` does it (lookup + create),
            # and one revoke, with the whole fleet in the plugin's file.
            one: list[float] = []
            gone: list[float] = []
            for i in range(samples):
                agent_id = f"extra-{i}"

                def provision_one(agent_id: str = agent_id) -> None:
                    admin.is_agent(agent_id)
                    admin.provision(agent_id, dynsec.new_password())

                one.append(timed(provision_one))
                gone.append(timed(lambda a=agent_id: admin.revoke(a)))
        file_bytes = (broker.data_dir / "dynamic-security.json").stat().st_size
        broker.stop()
        restart = timed(broker.start)
        assert broker.pid is not None
        after_restart = rss_kib(broker.pid)
        sample = list(passwords.items())[:: max(1, n // samples)][:samples]
        connected = sum(can_connect(broker.port, a, p, a) for a, p in sample)
    return {
        "mechanism": "dynsec",
        "agents": n,
        "chunk": chunk,
        "max_stall_s": max_stall,
        "messages": messages,
        "worst_puback_s": round(worst_stall, 2),
        "seconds": round(seconds, 2),
        "agents_per_s": round(n / seconds),
        "rss_before_mib": round(before["VmRSS"] / 1024, 1),
        "rss_after_mib": round(after["VmRSS"] / 1024, 1),
        "hwm_after_mib": round(after["VmHWM"] / 1024, 1),
        "file_mib": round(file_bytes / 2**20, 1),
        "one_provision_ms": round(statistics.median(one) * 1000, 1),
        "one_revoke_ms": round(statistics.median(gone) * 1000, 1),
        "restart_s": round(restart, 2),
        "rss_after_restart_mib": round(after_restart["VmRSS"] / 1024, 1),
        "sample_connected": f"{connected}/{len(sample)}",
    }


def bench_dynsec_offline(n: int) -> dict[str, Any]:
    """The bulk path: the fleet written into the plugin's file while the broker is down."""
    passwords = {f"agent-{i:06d}": dynsec.new_password() for i in range(n)}
    with fresh_broker() as broker:
        broker.stop()
        seconds = timed(lambda: broker.seed_agents(passwords))
        start = timed(broker.start)
        assert broker.pid is not None
        rss = rss_kib(broker.pid)
        sample = list(passwords.items())[:: max(1, n // 20)][:20]
        connected = sum(can_connect(broker.port, a, p, a) for a, p in sample)
    return {
        "mechanism": "dynsec-offline",
        "agents": n,
        "seconds": round(seconds, 2),
        "start_s": round(start, 2),
        "rss_after_mib": round(rss["VmRSS"] / 1024, 1),
        "sample_connected": f"{connected}/{len(sample)}",
    }


# --- the alternative: password_file + acl_file patterns ------------------------------


def password_line(username: str, password: str) -> str:
    """mosquitto_passwd's format: $7$ = PBKDF2-SHA512, with the same 101 iterations."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, dynsec.ITERATIONS)
    b64 = base64.b64encode
    return f"{username}:$7${dynsec.ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}\n"


def acl_text() -> str:
    lines = [f"user {dynsec.BRIDGE_USER}", f"topic read {TREE.root}/agents/#"]
    lines += [f"topic write {TREE.wildcard(Kind.TASKS)}", ""]
    for kind in dynsec.AGENT_PUBLISH_KINDS:
        lines.append(f"pattern write {TREE.root}/agents/%u/{kind.value}")
    for kind in dynsec.AGENT_READ_KINDS:
        lines.append(f"pattern read {TREE.root}/agents/%u/{kind.value}")
    return "\n".join(lines) + "\n"


def bench_acl_file(n: int) -> dict[str, Any]:
    with fresh_broker() as broker:
        broker.kill()
        d = broker.data_dir
        passwords = {f"agent-{i:06d}": dynsec.new_password() for i in range(n)}
        passwords[dynsec.BRIDGE_USER] = broker.passwords[dynsec.BRIDGE_USER]

        def write_files() -> None:
            with open(d / "passwd", "w") as f:
                f.writelines(password_line(u, p) for u, p in passwords.items())
            (d / "acl").write_text(acl_text())

        seconds = timed(write_files)
        conf = broker.config_file.read_text()
        conf = conf.replace("plugin ", "#plugin ").replace("plugin_opt_", "#plugin_opt_")
        conf += (
            f"\npassword_file {d / 'passwd'}\nacl_file {d / 'acl'}\nuse_username_as_clientid true\n"
        )
        broker.config_file.write_text(conf)
        if os.geteuid() == 0:
            shutil.chown(d / "passwd", "mosquitto")
            shutil.chown(d / "acl", "mosquitto")
        proc = spawn([find_mosquitto(), "-c", str(broker.config_file)], d / "stdout.log")
        broker.pid_file.write_text(str(proc.pid))
        wait_for(lambda: port_open("127.0.0.1", broker.port), 30, "mosquitto")
        rss = rss_kib(proc.pid)
        # One more agent: append it, SIGHUP, and wait until it can connect.
        new_pw = dynsec.new_password()
        t0 = time.perf_counter()
        with open(d / "passwd", "a") as f:
            f.write(password_line("extra-0", new_pw))
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: can_connect(broker.port, "extra-0", new_pw, "x"), 30, "reload")
        reload_s = time.perf_counter() - t0
    return {
        "mechanism": "acl_file",
        "agents": n,
        "seconds": round(seconds, 2),
        "rss_after_mib": round(rss["VmRSS"] / 1024, 1),
        "one_provision_ms": round(reload_s * 1000, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=10_000)
    ap.add_argument(
        "--chunks",
        default="",
        help="also runs with these fixed numbers of agents per $CONTROL message, e.g. 1,20,200",
    )
    ap.add_argument(
        "--adaptive",
        type=float,
        default=ADAPTIVE_STALL_S,
        help="also a run with the product's adaptive chunk, aiming at this stall (0: skip)",
    )
    ap.add_argument("--no-acl-file", action="store_true", help="skip the acl_file comparison")
    ap.add_argument("--no-offline", action="store_true", help="skip the offline bulk seeding")
    args = ap.parse_args()
    results = []
    if not args.no_offline:
        r = bench_dynsec_offline(args.agents)
        print(json.dumps(r), file=sys.stderr)
        results.append(r)
    runs: list[tuple[int, float | None]] = [(int(c), None) for c in args.chunks.split(",") if c]
    if args.adaptive:
        runs.append((10, args.adaptive))
    for chunk, max_stall in runs:
        r = bench_dynsec(args.agents, chunk, max_stall)
        print(json.dumps(r), file=sys.stderr)
        results.append(r)
    if not args.no_acl_file:
        r = bench_acl_file(args.agents)
        print(json.dumps(r), file=sys.stderr)
        results.append(r)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
