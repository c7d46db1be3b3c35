"""Ingest benchmark: our bridge against a C subscriber, a naive bridge and bare paho, in one run.

    python -m bench.ingest [--messages 200000] [--rounds 3] [--publishers 4] [--skip-naive]

Starts its own broker (the project's config) and PostgreSQL cluster, then for each
round publishes the same telemetry from several publisher processes at QoS 1 and
measures, from the moment the publishers start until the last message is consumed:
  (a) `mosquitto_sub -q 1` discarding everything (the broker's delivery ceiling here),
  (b) a naive bridge: one INSERT per message, autocommit,
  (c) our bridge, end to end: published until committed in the database,
  (d) a bare paho-mqtt consumer, no database: the most any paho-based bridge could do,
and reports medians, the ratios c/a, c/b and c/d (the bridge's own cost: validation,
batching, COPY, commit, ack after commit), lost and duplicate rows, the bridge's peak
RSS, and a run where each message carries a batch of 50 samples (rows/s).

(d) is measured like (c): its own process (a fresh interpreter, started and subscribed
before the publishers), timed from the publishers' start until it has consumed the
last message. It is built with the bridge's own `service.mqtt.make_client`, i.e. the
BufferedClient (buffered socket reads), and connects as the bridge does: MQTT 5,
clean_start False with the bridge's session expiry, manual_ack=True and the same
Receive Maximum (min(EUCORA_INGEST_MAX_PENDING, 65535)), paho's network thread
(loop_start). Per message it does `orjson.loads(payload)` and `client.ack(mid, qos)`,
nothing else. Using the bridge's client rather than a plain `paho.Client` is what
makes c/d fair: both sides share the same MQTT layer, so the ratio is the cost of
what the bridge adds on top of it, not of the socket buffering it already has.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
import psycopg

from schemas.config import MqttUrl
from schemas.topics import Kind, TopicTree
from service import identity
from service.config import Settings
from service.db import migrate
from service.stack.broker import Broker
from service.stack.database import Cluster
from service.stack.process import free_port, wait_for
from tests.publishers import sample

TREE = TopicTree()


# --- publishers -------------------------------------------------------------------
# C publishers (mosquitto_pub -l: one message per stdin line) so that publishing costs
# the two cores as little as possible and the consumers are what is measured.
# mosquitto_pub -l at QoS 1 stops after 65,535 lines (measured): each gets fewer.
MAX_LINES = 65_000


def make_payloads(n: int, batch: int, offset: int) -> list[bytes]:
    if batch == 1:
        return [orjson.dumps(sample(offset + i)) for i in range(n)]
    return [
        orjson.dumps({"samples": [sample(offset + i * batch + j) for j in range(batch)]})
        for i in range(n)
    ]


def publish(
    port: int, creds: dict[str, str], messages: int, batch: int = 1, round_no: int = 0
) -> tuple[Callable[[], float], Callable[[], None]]:
    """Prepare publisher inputs; returns (go, join). go() starts them and returns the time."""
    per = messages // len(creds)
    assert per <= MAX_LINES, f"use more publishers: {per} messages each is over {MAX_LINES}"
    files = []
    for agent in creds:
        path = Path(tempfile.mkstemp(prefix=f"bench-{agent}-")[1])
        # Distinct sample times per round, so no round's rows collide with another's.
        path.write_bytes(b"\n".join(make_payloads(per, batch, round_no * 10_000_000)) + b"\n")
        files.append((agent, path))
    procs: list[subprocess.Popen[bytes]] = []

    def go() -> float:
        t = time.perf_counter()
        for agent, path in files:
            with open(path, "rb") as stdin:
                procs.append(subprocess.Popen(
                    ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "5",
                     "-i", agent, "-u", agent, "-P", creds[agent], "-q", "1", "-M", "1000",
                     "-t", TREE.agent(agent, Kind.TELEMETRY), "-l"],
                    stdin=stdin, stderr=subprocess.PIPE,
                ))  # fmt: skip
        return t

    def join() -> None:
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"mosquitto_pub failed: {err.decode()[-300:]}"
        for _, path in files:
            path.unlink()

    return go, join


# --- consumers --------------------------------------------------------------------
def run_c_subscriber(broker: Broker, creds: dict[str, str], n: int, round_no: int) -> float:
    """Messages/s a C subscriber takes at QoS 1 (it only discards)."""
    pw = broker.passwords[identity.BRIDGE_USER]
    base = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.service_port),
            "-u", identity.BRIDGE_USER,
            "-P", pw, "-q", "1", "-V", "5", "-x", "600", "-i", f"bench-c-sub-{round_no}",
            "-t", TREE.wildcard(Kind.TELEMETRY)]  # fmt: skip
    # -c -E: subscribe in a persistent session, wait for the SUBACK, exit. The session
    # keeps the subscription, so nothing published from now on is missed: no race.
    subprocess.run([*base, "-c", "-E"], check=True, timeout=30, stdout=subprocess.DEVNULL)
    go, join = publish(broker.port, creds, n)
    sub = subprocess.Popen(
        [*base, "-c", "-C", str(n)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    t0 = go()
    sub.wait(600)
    elapsed = time.perf_counter() - t0
    join()
    # A clean start discards the session, or the broker would queue every later
    # message of the benchmark for it.
    subprocess.run([*base, "-E"], check=True, timeout=30, stdout=subprocess.DEVNULL)
    return n / elapsed


def naive_bridge_main(url: str, db: str, n: int, ready: Any) -> None:
    """One INSERT per message, autocommit: what a first bridge looks like."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    mqtt = MqttUrl.parse(url)
    conn = psycopg.connect(db, autocommit=True)
    got = 0
    done = mp.Event()

    def on_message(c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        nonlocal got
        s = orjson.loads(msg.payload)
        conn.execute(
            "INSERT INTO telemetry (time, agent_id, cpu_percent, memory_percent, disk_percent,"
            " net_rx_bytes, net_tx_bytes) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (
                s["ts"],
                msg.topic.split("/")[3],
                s["cpu_percent"],
                s["memory_percent"],
                s["disk_percent"],
                s["net_rx_bytes"],
                s["net_tx_bytes"],
            ),
        )
        got += 1
        if got >= n:
            done.set()

    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="naive-bridge", protocol=MQTTProtocolVersion.MQTTv5
    )
    c.username_pw_set(mqtt.username, mqtt.password)
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.release()
    c.connect(mqtt.host, mqtt.port)
    c.subscribe(TREE.wildcard(Kind.TELEMETRY), qos=1)
    c.loop_start()
    done.wait(900)
    c.loop_stop()


def run_naive(broker: Broker, db: str, creds: dict[str, str], n: int) -> float:
    truncate(db)
    ctx = mp.get_context("fork")
    ready = ctx.Semaphore(0)
    p = ctx.Process(target=naive_bridge_main, args=(broker.url(identity.BRIDGE_USER), db, n, ready))
    p.start()
    assert ready.acquire(timeout=30), "naive bridge did not subscribe"
    go, join = publish(broker.port, creds, n)
    t0 = go()
    rows = wait_count(db, n, 900, last_samples(creds, n))
    elapsed = time.perf_counter() - t0
    join()
    p.join(30)
    assert rows == n
    return n / elapsed


BARE_CLIENT_ID = "bench-bare-paho"


def bare_consumer_main(url: str, n: int, receive_maximum: int, tx: Any) -> None:
    """(d): paho as the bridge builds it, orjson.loads and ack per message, no database.

    Sends ("ready",) on `tx` once the subscription is granted, then ("done", consumed,
    duplicates, cpu_s) as soon as the n-th message has been parsed and acknowledged
    (cpu_s: this process's CPU seconds, all threads, since it was ready).
    """
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    from service import mqtt

    got = 0
    dups = 0
    cpu0 = 0.0
    finished = threading.Event()
    client = mqtt.make_client(MqttUrl.parse(url), BARE_CLIENT_ID, manual_ack=True)

    def on_connect(
        c: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            tx.send(("failed", f"connect: {reason}"))
            finished.set()
            return
        c.subscribe(TREE.wildcard(Kind.TELEMETRY), qos=1)

    def on_subscribe(
        c: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        if any(r.is_failure for r in reasons):
            tx.send(("failed", f"subscribe: {reasons}"))
            finished.set()
        else:
            nonlocal cpu0
            cpu0 = time.process_time()
            tx.send(("ready",))

    def on_message(c: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        nonlocal got, dups
        orjson.loads(msg.payload)
        c.ack(msg.mid, msg.qos)
        got += 1
        dups += msg.dup
        if got == n:
            tx.send(("done", got, dups, time.process_time() - cpu0))
            finished.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    mqtt_url = MqttUrl.parse(url)
    client.connect(
        mqtt_url.host,
        mqtt_url.port,
        keepalive=30,
        clean_start=False,
        properties=mqtt.connect_properties(receive_maximum=receive_maximum),
    )
    client.loop_start()
    finished.wait(900)
    client.disconnect()  # queued after the last PUBACKs
    client.loop_stop()


def run_bare(broker: Broker, db: str, creds: dict[str, str], n: int) -> tuple[float, float]:
    """Messages/s of (d), timed like (c): from the publishers' start to the last one,
    and its CPU microseconds per message."""
    url = broker.url(identity.BRIDGE_USER)
    # The Receive Maximum the bridge announces (service/bridge/ingest.py), from the
    # environment the benchmark's bridge gets.
    settings = Settings.from_env(bridge_env(broker, db, 0))
    receive_maximum = min(settings.ingest_max_pending, 65535)
    expected = (n // len(creds)) * len(creds)
    ctx = mp.get_context("spawn")  # a fresh interpreter, as the bridge's subprocess
    rx, tx = ctx.Pipe(duplex=False)
    p = ctx.Process(target=bare_consumer_main, args=(url, expected, receive_maximum, tx))
    p.start()
    tx.close()
    try:
        assert rx.poll(60), "bare paho consumer did not subscribe"
        msg = rx.recv()
        assert msg == ("ready",), f"bare paho consumer: {msg}"
        go, join = publish(broker.port, creds, n)
        t0 = go()
        assert rx.poll(900), "bare paho consumer did not get every message"
        elapsed = time.perf_counter() - t0
        msg = rx.recv()
        join()
        assert msg[:3] == ("done", expected, 0), f"bare paho consumer: {msg}"
        p.join(30)
        assert p.exitcode == 0, f"bare paho consumer exited with {p.exitcode}"
    finally:
        if p.is_alive():
            p.terminate()
            p.join(10)
        rx.close()
        # Like the bridge's: a persistent session would collect the later phases' messages.
        forget_session(broker, BARE_CLIENT_ID)
    return expected / elapsed, msg[3] / expected * 1e6


def truncate(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("TRUNCATE telemetry, dead_letters")


def last_samples(
    creds: dict[str, str], messages: int, batch: int = 1, round_no: int = 0
) -> list[tuple[str, str]]:
    """(agent, ts) of the last sample each publisher of `publish(...)` sends."""
    per = messages // len(creds)
    ts = sample(round_no * 10_000_000 + per * batch - 1)["ts"]
    return [(agent, ts) for agent in creds]


def wait_count(db: str, n: int, timeout: float, last: list[tuple[str, str]]) -> int:
    """Wait until `n` rows are stored (or the timeout); return the count.

    Polls cheap primary-key lookups of each publisher's last sample first, and counts
    the table only once they are all there (and then until the count is complete: the
    bridge's writers commit concurrently). Counting all along cost 24 ms a time at
    300,000 rows: polled every 20 ms, it kept a PostgreSQL backend busy on the two
    cores the consumers are measured on.
    """
    deadline = time.monotonic() + timeout
    with psycopg.connect(db, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM telemetry t"
                " JOIN unnest(%s::text[], %s::timestamptz[]) AS l(agent_id, time)"
                " USING (agent_id, time)",
                ([a for a, _ in last], [t for _, t in last]),
            ).fetchone()
            if (row and row[0] >= len(last)) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        while True:
            row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
            got = int(row[0]) if row else 0
            if got >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.02)


def bridge_env(broker: Broker, db: str, metrics_port: int) -> dict[str, str]:
    return os.environ | {
        "EUCORA_MQTT_URL": broker.url(identity.BRIDGE_USER), "EUCORA_DATABASE_URL": db,
        "EUCORA_METRICS_PORT": str(metrics_port), "EUCORA_BRIDGE_CLIENT_ID": "bench-bridge",
        "EUCORA_LOG_LEVEL": "WARNING",
    }  # fmt: skip


def run_bridge(
    broker: Broker, db: str, creds: dict[str, str], n: int, batch: int, round_no: int, workdir: Path
) -> dict[str, float]:
    truncate(db)
    port = free_port()
    env = bridge_env(broker, db, port)
    log = open(workdir / f"bridge-{round_no}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "bridge", "run"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _ready(port), 30, "bridge ready")
        go, join = publish(broker.port, creds, n, batch=batch, round_no=round_no)
        rows_expected = (n // len(creds)) * len(creds) * batch
        cpu0 = _cpu_s(proc.pid)
        t0 = go()
        rows = wait_count(db, rows_expected, 900, last_samples(creds, n, batch, round_no))
        elapsed = time.perf_counter() - t0
        cpu = _cpu_s(proc.pid) - cpu0
        join()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        dup = sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("eucora_duplicates_total")
        )
        rss = _peak_rss_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        # The stopped bridge's persistent session stays in the shared subscription and
        # would collect the next phases' messages: discard it with a clean start.
        forget_session(broker, "bench-bridge")
    return {
        "rate": rows_expected / batch / elapsed,
        "rows_per_s": rows_expected / elapsed,
        "lost": rows_expected - rows,
        "duplicates": dup,
        "peak_rss_mb": rss / 1024,
        "cpu_us": cpu / (rows_expected / batch) * 1e6,
    }


def forget_session(broker: Broker, client_id: str) -> None:
    subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.service_port),
         "-u", identity.BRIDGE_USER,
         "-P", broker.passwords[identity.BRIDGE_USER], "-V", "5", "-i", client_id,
         "-t", TREE.wildcard(Kind.TELEMETRY), "-E"],
        check=True, timeout=30, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _peak_rss_kb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument(
        "--naive-messages",
        type=int,
        default=20_000,
        help="the naive bridge is ~100x slower: it gets fewer messages",
    )
    ap.add_argument(
        "--skip-naive", action="store_true", help="leave out (b), the naive bridge (and c/b)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--publishers", type=int, default=4)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="eucora-bench-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # noqa: S103 (broker and database accounts walk through it)
        passwords = {u: identity.new_password() for u in identity.SERVICE_USERS}
        broker = Broker(
            data_dir=root / "mosquitto", port=free_port(), service_port=free_port(),
            passwords=passwords,
        )  # fmt: skip
        cluster = Cluster(root=root / "pg", port=free_port(), password=identity.new_password())
        broker.start()
        cluster.start()
        try:
            migrate.upgrade(cluster.url)
            creds = {f"bench-{i}": identity.new_password() for i in range(args.publishers)}
            identity.add_agents(
                broker.auth, {a: identity.hash_password(p) for a, p in creds.items()}
            )
            pubs = creds
            n = args.messages
            a_rates: list[float] = []
            b_rates: list[float] = []
            d_rates: list[float] = []
            d_cpu: list[float] = []
            c_runs: list[dict[str, float]] = []
            batch_runs: list[dict[str, float]] = []
            for r in range(args.rounds):
                a_rates.append(run_c_subscriber(broker, pubs, n, r))
                if not args.skip_naive:
                    b_rates.append(run_naive(broker, cluster.url, pubs, args.naive_messages))
                c_runs.append(run_bridge(broker, cluster.url, pubs, n, 1, r, root))
                # Right after (c), so that both see the machine in much the same state.
                d_rate, d_us = run_bare(broker, cluster.url, pubs, n)
                d_rates.append(d_rate)
                d_cpu.append(d_us)
                batch_runs.append(
                    run_bridge(broker, cluster.url, pubs, max(n // 50, 4), 50, 100 + r, root)
                )
                c_rate, b50 = c_runs[-1]["rate"], batch_runs[-1]["rows_per_s"]
                b = f"{b_rates[-1]:,.0f}" if b_rates else "skipped"
                print(
                    f"round {r + 1}: a={a_rates[-1]:,.0f} b={b} c={c_rate:,.0f} "
                    f"d={d_rates[-1]:,.0f} msg/s (c/d={c_rate / d_rates[-1]:.2f}), "
                    f"batch50={b50:,.0f} rows/s",
                    file=sys.stderr,
                )
            report(n, args, a_rates, b_rates, c_runs, d_rates, d_cpu, batch_runs)
        finally:
            broker.stop()
            cluster.stop()


def report(
    n: int,
    args: argparse.Namespace,
    a: list[float],
    b: list[float],
    c: list[dict[str, float]],
    d: list[float],
    d_cpu: list[float],
    batch: list[dict[str, float]],
) -> None:
    med = statistics.median
    a_m, d_m = med(a), med(d)
    b_m = med(b) if b else None
    c_m = med(x["rate"] for x in c)
    print(
        f"\nIngest benchmark: {n:,} messages x {args.rounds} rounds, {args.publishers} "
        f"publisher processes, QoS 1, {os.cpu_count()} cores"
    )
    print("| measure | median | runs |")
    print("|---|---|---|")

    def row(name: str, value: str, runs: str) -> None:
        print(f"| {name} | {value} | {runs} |")

    def runs(xs: list[float]) -> str:
        return ", ".join(f"{x:,.0f}" for x in xs)

    rates = [x["rate"] for x in c]
    batch_rows = [x["rows_per_s"] for x in batch]
    everything = c + batch
    row("(a) mosquitto_sub -q 1, discard", f"{a_m:,.0f} msg/s", runs(a))
    naive = f"(b) naive bridge, INSERT per message ({args.naive_messages:,} msgs)"
    if b_m is None:
        row("(b) naive bridge, INSERT per message", "skipped", "--skip-naive")
    else:
        row(naive, f"{b_m:,.0f} msg/s", runs(b))
    row("(c) eucora bridge, published -> committed", f"{c_m:,.0f} msg/s", runs(rates))
    row("(d) bare paho consumer (orjson + ack), no database", f"{d_m:,.0f} msg/s", runs(d))
    row("c/a", f"{c_m / a_m:.2f}", "target >= 0.8")
    if b_m is not None:
        row("c/b", f"{c_m / b_m:.1f}", "target >= 20")
    # Per round: c and d ran back to back, so each round's ratio shares its noise.
    ratios = ", ".join(f"{x['rate'] / y:.2f}" for x, y in zip(c, d, strict=True))
    row("c/d", f"{c_m / d_m:.2f}", f"target >= 0.8; per round {ratios}")
    # CPU per message: less sensitive to what else the machine runs than the rates.
    c_cpu = [x["cpu_us"] for x in c]
    row("(c) bridge process CPU per message", f"{med(c_cpu):.1f} us", runs(c_cpu))
    row("(d) bare consumer CPU per message", f"{med(d_cpu):.1f} us", runs(d_cpu))
    cpu_ratios = ", ".join(f"{y / x:.2f}" for x, y in zip(c_cpu, d_cpu, strict=True))
    row("d/c CPU per message", f"{med(d_cpu) / med(c_cpu):.2f}", f"per round {cpu_ratios}")
    row("lost rows (all rounds)", f"{sum(x['lost'] for x in everything):.0f}", "must be 0")
    row(
        "duplicate rows (all rounds)",
        f"{sum(x['duplicates'] for x in everything):.0f}",
        "must be 0",
    )
    row("bridge peak RSS", f"{max(x['peak_rss_mb'] for x in everything):.0f} MB", "")
    row("batches of 50 samples per message", f"{med(batch_rows):,.0f} rows/s", runs(batch_rows))


if __name__ == "__main__":
    main()
