"""Provisioning benchmark: a fleet's broker accounts at scale, on sharded brokers.

    python -m bench.provision [--agents 100000] [--brokers 2] [--cert]

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

With `--cert`, in the same run and stack, the same for certificate identities
(`agents provision --cert`, docs/broker.md "Certificate identities"): `--agents`
more agents provisioned with certificates (`--from-file F --cert --output DIR`), one
more agent at that fleet (the command, the CliRunner call, and the provision
function called alone: no interpreter start-up, no Typer; each until the agent's
first connection on the certificate listener), and the revocation of a certificate
agent connected to every broker (CRL, reload, takeover). The password path's one
more agent is measured the same three ways beside it.

Prints one JSON document. Speed depends on the machine: compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import ssl
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


def called(args: dict[str, Any]) -> tuple[float, str]:
    """`access.provision` called as a function: no interpreter start-up, no Typer (its
    command tree, built by every CliRunner call, costs 50-150 ms here)."""
    from cli import access

    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        access.provision(**args)
    return time.perf_counter() - t0, out.getvalue()


def provision_args(env: dict[str, str], agent_id: str, **more: Any) -> dict[str, Any]:
    return {
        "agent_ids": [agent_id], "from_file": None, "rotate": False, "output": None,
        "cert": False, "json": True, "database_url": env["EUCORA_DATABASE_URL"],
        "auth_dir": Path(env["EUCORA_AUTH_DIR"]), "ca_file": Path(env["EUCORA_CA_FILE"]),
        "ca_key": Path(env["EUCORA_CA_KEY"]),
    } | more  # fmt: skip


class Client:
    """One agent connection; `connect()` says whether the broker accepted it."""

    def __init__(
        self, url: str, username: str, password: str | None, ca_file: str | None,
        cert: tuple[str, str] | None = None,
    ) -> None:  # fmt: skip
        target = MqttUrl.parse(url)
        self.target = target
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=username, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.username_pw_set(username, password)
        if target.tls:
            context = ssl.create_default_context(cafile=ca_file)
            if cert:
                context.load_cert_chain(*cert)
            self.client.tls_set_context(context)
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


def cert_of(doc: dict[str, Any]) -> tuple[str, str] | None:
    return (doc["cert_file"], doc["key_file"]) if doc.get("cert_file") else None


# An MQTT 3.1.1 CONNECT (client id "probe": the broker uses the certificate's CN).
CONNECT = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05probe"


def cert_attempt(url: str, doc: dict[str, Any]) -> bool:
    """A certificate agent's connection on the certificate listener: accepted (CONNACK
    0) or refused (a failed handshake: with TLS 1.3 it shows at the first read, which
    paho would wait out for its CONNACK timeout)."""
    target = MqttUrl.parse(url)
    context = ssl.create_default_context(cafile=doc["ca_file"])
    context.load_cert_chain(doc["cert_file"], doc["key_file"])
    with socket.create_connection((target.host, target.port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=target.host) as tls:
                tls.sendall(CONNECT)
                return tls.recv(4) == b"\x20\x02\x00\x00"
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return False


def attempt(url: str, doc: dict[str, Any]) -> bool:
    if cert_of(doc):
        return cert_attempt(url, doc)
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
    cert = cert_of(doc)
    urls = [str(b.cert_agent_url) if cert else b.agent_url for b in stack.brokers()]
    clients = [Client(u, doc["username"], doc["password"], doc["ca_file"], cert) for u in urls]
    assert all(c.connect() for c in clients), "the agent could not connect"
    t0 = time.perf_counter()
    command_s, _ = run(env, "agents", "revoke", doc["agent_id"])
    for c in clients:
        c.dropped.wait(60)
    dropped_s = time.perf_counter() - t0
    for u in urls:
        poll(lambda u=u: not attempt(u, doc))
    refused_s = time.perf_counter() - t0
    for c in clients:
        c.close()
    return command_s, dropped_s, refused_s


def certificates(stack: Stack, env: dict[str, str], root: Path, n: int) -> dict[str, Any]:
    """The certificate identity's numbers, in the stack that holds the password fleet."""
    out = root / "certs"
    out.mkdir()
    ids = root / "cert-fleet.txt"
    ids.write_text("".join(f"cert-{i:06d}\n" for i in range(n)))
    fleet_s, text = eucora(env, "agents", "provision", "--from-file", str(ids), "--cert",
                           "--output", str(out), "--json")  # fmt: skip
    docs = {d["agent_id"]: d for d in json.loads(text)}
    saved = lambda a: json.loads((out / f"{a}.json").read_text())  # noqa: E731
    result: dict[str, Any] = {"agents": n, "provision_fleet_s": round(fleet_s, 2)}
    runs = [
        ("command", lambda a: eucora(env, "agents", "provision", a, "--cert", "-o", str(out))),
        ("in_process", lambda a: in_process(env, "agents", "provision", a, "--cert", "-o",
                                            str(out))),
        ("function", lambda a: called(provision_args(env, a, cert=True, output=out))),
    ]  # fmt: skip
    runs[1][1]("cert-warm-1")
    runs[2][1]("cert-warm-2")
    for name, run in runs:
        agent_id = f"cert-extra-{name}"
        t0 = time.perf_counter()
        took, _ = run(agent_id)
        doc = saved(agent_id)
        poll(lambda doc=doc: attempt(doc["mqtt_url"], doc))
        result[f"one_more_{name}_ms"] = round(took * 1000)
        result[f"one_more_{name}_until_it_connects_ms"] = round((time.perf_counter() - t0) * 1000)
    last = str(stack.brokers()[-1].cert_agent_url)
    victims = [d for d in docs.values() if d["mqtt_url"] == last][-2:]
    for name, run in (("command", eucora), ("in_process", in_process)):
        revoke_s, dropped_s, refused_s = revocation(stack, env, victims.pop(), run)
        result[f"revoke_{name}_ms"] = round(revoke_s * 1000)
        result[f"revoke_{name}_until_dropped_everywhere_ms"] = round(dropped_s * 1000)
        result[f"revoke_{name}_until_refused_everywhere_ms"] = round(refused_s * 1000)
    result["crl_bytes"] = (stack.auth_dir / "agents.crl").stat().st_size
    return result


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
    ap.add_argument("--cert", action="store_true", help="certificate identities too")
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

            called(provision_args(env, "warm-up-2"))
            three_t0 = time.perf_counter()
            three_s, out = called(provision_args(env, "extra-3"))
            extra3 = json.loads(out)
            poll(lambda: attempt(extra3["mqtt_url"], extra3))
            usable3_s = time.perf_counter() - three_t0

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
                "one_more_function_ms": round(three_s * 1000),
                "one_more_function_until_it_connects_ms": round(usable3_s * 1000),
            }
            if args.cert:
                result["certificates"] = certificates(stack, env, root, n)
        finally:
            stack.down()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
