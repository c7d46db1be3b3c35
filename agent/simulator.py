"""A fleet of simulated agents (`eucora simulate`): the reference agent's protocol code
(AgentSession) reporting on imaginary hosts, all on one Loop thread.

Each simulated host has a stable profile drawn from a seeded RNG (platform, OS,
hardware, site/env/role tags, a software list) and metrics that wander plausibly:
CPU as a mean-reverting walk with bursts, memory slowly drifting, disk slowly
filling, network bytes from a per-host rate. `churn` is the fraction of the fleet
that leaves per minute, half of it by crashing (the broker publishes the will) and
half by a clean stop, each coming back after a pause; some come back with software
installed, removed or upgraded. Tasks are played as the reference agent reports
them (SimulatedTasks); DEPLOY tasks take `deploy_duration` seconds and fail at
`deploy_fail_rate`, and a deployment's also report on deployment-status.

The simulator only connects: the agents' broker accounts are made on the server side
(`eucora simulate` in cli/simulate.py, as `eucora agents provision` makes them), which
hands their passwords and home brokers to `run`/`Fleet`.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

import psutil

from agent.loop import Loop, Timer
from agent.protocol import HostInfo, Metrics
from agent.session import AgentSession, Timing
from agent.tasks import (
    DeploymentRef,
    Reject,
    deployment_document,
    deployment_of,
    report_document,
)
from schemas.config import DEFAULT_TOPIC_ROOT, MqttUrl
from schemas.payloads import Software, TaskCancel, TaskCommand
from schemas.states import DeploymentAgentStatus, Platform, TaskStatus, TaskType
from schemas.topics import Kind, TopicTree
from schemas.validate import PayloadError, parse

log = logging.getLogger("eucora.simulate")
_A = DeploymentAgentStatus

AGENT_VERSION = "0.1.0-sim"

_OS = {
    Platform.WINDOWS: [
        "Windows 11 Pro 23H2 (22631.4602)", "Windows 11 Enterprise 24H2 (26100.2605)",
        "Windows 10 Enterprise 22H2 (19045.5247)", "Windows Server 2022 (20348.2966)",
    ],
    Platform.MACOS: ["macOS 14.7.2 Sonoma", "macOS 15.2 Sequoia", "macOS 13.7.2 Ventura"],
    Platform.LINUX: [
        "Ubuntu 24.04.1 LTS", "Ubuntu 22.04.5 LTS", "Debian GNU/Linux 12 (bookworm)",
        "Red Hat Enterprise Linux 9.5", "Rocky Linux 9.5",
    ],
}  # fmt: skip
_SOFTWARE = {
    Platform.WINDOWS: [
        ("Google Chrome", "131.0.6778.265", "Google LLC"),
        ("Mozilla Firefox", "133.0.3", "Mozilla"),
        ("7-Zip 24.09 (x64)", "24.09", "Igor Pavlov"),
        ("Microsoft Edge", "131.0.2903.112", "Microsoft Corporation"),
        ("Microsoft Office 365", "16.0.18227", "Microsoft Corporation"),
        ("Zoom Workplace", "6.3.1", "Zoom Video Communications"),
        ("Notepad++", "8.7.4", "Notepad++ Team"),
        ("Adobe Acrobat Reader", "24.005.20320", "Adobe"),
        ("VLC media player", "3.0.21", "VideoLAN"),
        ("Git", "2.47.1", "The Git Development Community"),
        ("Python 3.12.8", "3.12.8150.0", "Python Software Foundation"),
        ("Slack", "4.41.105", "Slack Technologies"),
        ("CrowdStrike Falcon Sensor", "7.20.19006", "CrowdStrike"),
        ("Microsoft Teams", "24335.206", "Microsoft Corporation"),
        ("PuTTY release 0.82", "0.82.0.0", "Simon Tatham"),
    ],
    Platform.MACOS: [
        ("Google Chrome", "131.0.6778.265", "Google LLC"), ("Firefox", "133.0.3", "Mozilla"),
        ("Slack", "4.41.105", "Slack Technologies"), ("zoom.us", "6.3.1", "Zoom"),
        ("Microsoft Word", "16.92", "Microsoft"), ("Microsoft Excel", "16.92", "Microsoft"),
        ("iTerm2", "3.5.10", "George Nachman"), ("Visual Studio Code", "1.96.2", "Microsoft"),
        ("Docker Desktop", "4.37.1", "Docker Inc."), ("1Password", "8.10.56", "AgileBits"),
        ("Homebrew", "4.4.15", "Homebrew"), ("Xcode", "16.2", "Apple"),
    ],
    Platform.LINUX: [
        ("openssl", "3.0.15-1~deb12u1", "Debian"), ("curl", "7.88.1-10+deb12u8", "Debian"),
        ("openssh-server", "1:9.2p1-2+deb12u3", "Debian"), ("nginx", "1.22.1-9", "Debian"),
        ("postgresql-15", "15.10-0+deb12u1", "Debian"), ("python3", "3.11.2-1+b1", "Debian"),
        ("systemd", "252.33-1~deb12u1", "Debian"), ("bash", "5.2.15-2+b7", "Debian"),
        ("docker-ce", "5:27.4.1-1~debian.12", "Docker"), ("vim", "2:9.0.1378-2", "Debian"),
        ("rsync", "3.2.7-1", "Debian"), ("sudo", "1.9.13p3-1+deb12u1", "Debian"),
        ("chrony", "4.3-2+deb12u1", "Debian"), ("git", "1:2.39.5-0+deb12u1", "Debian"),
        ("mosquitto-clients", "2.0.11-1.2+deb12u1", "Debian"), ("tcpdump", "4.99.3-1", "Debian"),
    ],
}  # fmt: skip
_SITES = ["paris", "fra1", "lon", "nyc", "sgp", "syd"]
_ENVS = ["prod", "prod", "prod", "staging", "dev"]
_ROLES = {
    Platform.WINDOWS: ["laptop", "desktop", "kiosk", "server"],
    Platform.MACOS: ["laptop", "laptop", "desktop"],
    Platform.LINUX: ["web", "db", "cache", "worker", "build"],
}
_DEPTS = ["finance", "sales", "engineering", "support", "ops"]


def _pick_platform(rng: random.Random) -> Platform:
    roll = rng.random()
    return Platform.WINDOWS if roll < 0.5 else Platform.LINUX if roll < 0.85 else Platform.MACOS


class SimulatedHost:
    """One imaginary machine with a stable profile and wandering metrics."""

    def __init__(self, index: int, rng: random.Random, platform: Platform | None = None) -> None:
        self.rng = rng
        picked = _pick_platform(rng)  # drawn anyway: the rest of the profile stays seeded
        self.platform = platform or picked
        role = rng.choice(_ROLES[self.platform])
        site = rng.choice(_SITES)
        prefix = {"windows": "WS", "macos": "MAC", "linux": role}[self.platform.value]
        hostname = f"{prefix}-{site}-{index:05d}"
        if self.platform is not Platform.WINDOWS:
            hostname = f"{hostname.lower()}.corp.example"
        big = role in ("db", "build", "server")
        memory = rng.choice([8, 16, 16, 32, 64] if not big else [64, 128, 256]) << 30
        disk = rng.choice([256, 512, 512, 1024] if not big else [1024, 2048, 4096]) * 10**9
        self.host_info = HostInfo(
            hostname=hostname,
            platform=self.platform,
            os_version=rng.choice(_OS[self.platform]),
            cpu_count=rng.choice([4, 8, 8, 12, 16] if not big else [32, 48, 64]),
            memory_bytes=memory,
            disk_bytes=disk,
            # Made-up private addresses: data only, nothing is ever sent there.
            ip_address=f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}",
            mac_address="02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5)),
        )
        self.tags = {"site": site, "env": rng.choice(_ENVS), "role": role}
        if self.platform is not Platform.LINUX:
            self.tags["dept"] = rng.choice(_DEPTS)
        pool = _SOFTWARE[self.platform]
        chosen = rng.sample(pool, k=rng.randint(len(pool) // 2, len(pool)))
        self.packages = {
            name: Software(name=name, version=version, publisher=publisher)
            for name, version, publisher in chosen
        }
        self.cpu_base = rng.uniform(3, 45)
        self.cpu = self.cpu_base
        self.memory = rng.uniform(25, 80)
        self.disk = rng.uniform(15, 90)
        self.net_rate = math.exp(rng.uniform(math.log(2e3), math.log(5e6)))  # bytes/s
        self.boot = time.time() - rng.uniform(600, 40 * 86400)
        self.last_sample = time.monotonic()

    def info(self) -> HostInfo:
        return self.host_info

    def metrics(self) -> Metrics:
        now = time.monotonic()
        dt, self.last_sample = max(now - self.last_sample, 0.001), now
        rng = self.rng
        # Mean-reverting CPU walk with occasional bursts (a build, an update...).
        self.cpu += 0.3 * (self.cpu_base - self.cpu) + rng.gauss(0, 4)
        if rng.random() < 0.03:
            self.cpu = rng.uniform(70, 100)
        self.memory = min(max(self.memory + rng.gauss(0, 0.8), 5), 98)
        self.disk = min(self.disk + abs(rng.gauss(0, 0.01)), 99.5)
        burst = rng.lognormvariate(0, 0.6)
        return Metrics(
            cpu_percent=min(max(self.cpu, 0.0), 100.0),
            memory_percent=self.memory,
            disk_percent=self.disk,
            net_rx_bytes=int(self.net_rate * dt * burst),
            net_tx_bytes=int(self.net_rate * dt * burst * rng.uniform(0.1, 0.6)),
        )

    def software(self) -> Sequence[Software] | None:
        return list(self.packages.values())

    def uptime(self) -> float | None:
        return time.time() - self.boot

    def update_software(self) -> None:
        """An install, a removal or an upgrade, as happens between two boots."""
        pool = _SOFTWARE[self.platform]
        missing = [p for p in pool if p[0] not in self.packages]
        roll = self.rng.random()
        if roll < 0.4 and missing:
            name, version, publisher = self.rng.choice(missing)
            self.packages[name] = Software(name=name, version=version, publisher=publisher)
        elif roll < 0.6 and len(self.packages) > 1:
            del self.packages[self.rng.choice(sorted(self.packages))]
        elif self.packages:
            name = self.rng.choice(sorted(self.packages))
            old = self.packages[name]
            self.packages[name] = old.model_copy(update={"version": f"{old.version}.1"})


@dataclass
class TaskCounters:
    deploys_succeeded: int = 0
    deploys_failed: int = 0
    rollbacks: int = 0


class SimulatedTasks:
    """A simulated agent's side of tasks, reported as the reference agent reports them
    (agent/tasks.py). Deduplicated by task id; an expired task is REJECTED.

    - DEPLOY: "runs" for `deploy_duration` s (+-30 % jitter) and fails with the
      probability `deploy_fail_rate`; both drawn from (fleet seed, agent id, how many
      DEPLOY tasks the agent played before), so a fleet started again with the same
      seed fails the same agents, whatever the timing. A deployment's DEPLOY (payload
      with "deployment_id") also reports on deployment-status: PENDING on receipt,
      IN_PROGRESS (progress 0) at the start, SUCCESS or FAILED before the task's
      COMPLETED or FAILED. Its rollback task ("rollback": true) takes as long, never
      fails, and reports ROLLBACK; without a "rollback_command" it is REJECTED
      (deployment-status FAILED), as the reference agent does. A cancel stops a
      running DEPLOY (FAILED "cancelled").
    - Any other task: COMPLETED after 0.2 to 1.2 s.
    """

    def __init__(
        self,
        loop: Loop,
        agent_id: str,
        rng: random.Random,
        *,
        seed: int = 1,
        deploy_duration: float = 3.0,
        deploy_fail_rate: float = 0.0,
    ) -> None:
        self.loop = loop
        self.agent_id = agent_id
        self.rng = rng
        self.seed = seed
        self.deploy_duration = deploy_duration
        self.deploy_fail_rate = deploy_fail_rate
        self.report: Callable[[dict[str, Any]], None] = lambda doc: None
        self.report_deployment: Callable[[dict[str, Any]], None] = lambda doc: None
        self.counters = TaskCounters()
        self._plays = 0  # DEPLOY tasks played: with the seed, what the next one draws
        # task id -> its last task report and last deployment report (sent again on a
        # redelivery, unchanged: the server takes them for repeats)
        self._done: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        self._running: dict[str, tuple[Timer, DeploymentRef | None, str | None]] = {}

    def handle(self, payload: bytes | bytearray) -> None:
        try:
            msg = parse(Kind.TASKS, self.agent_id, payload)
        except PayloadError:
            return
        if isinstance(msg, TaskCancel):
            self._cancel(str(msg.cancel))
            return
        task_id, corr = str(msg.task_id), msg.correlation_id
        if task_id in self._done:
            last, deployment = self._done[task_id]
            if deployment is not None:
                self.report_deployment(deployment)
            self.report(last)  # a redelivery: say again where it stands
            return
        if msg.expires_at <= datetime.now(UTC):
            why = f"expired before start (expires_at {msg.expires_at.isoformat()})"
            self._finish(task_id, report_document(task_id, TaskStatus.REJECTED, error=why,
                                                  correlation_id=corr))  # fmt: skip
            return
        if msg.type is TaskType.DEPLOY:
            self._deploy(msg)
            return
        self._finish(task_id, report_document(task_id, TaskStatus.ASSIGNED, correlation_id=corr))
        self.report(
            report_document(task_id, TaskStatus.IN_PROGRESS, progress=0, correlation_id=corr)
        )
        done = report_document(
            task_id, TaskStatus.COMPLETED, progress=100,
            result={"simulated": True, "type": msg.type.value}, correlation_id=corr,
        )  # fmt: skip
        self.loop.call_later(0.2 + self.rng.random(), lambda: self._finish(task_id, done))

    def _deploy(self, msg: TaskCommand) -> None:
        task_id, corr = str(msg.task_id), msg.correlation_id
        ref: DeploymentRef | None = None
        try:
            ref = deployment_of(msg)
            argv = msg.payload.get("rollback_command" if ref and ref.rollback else "command")
            if ref is not None and ref.rollback and argv is None:
                raise Reject(
                    'cannot roll back: the deployment\'s payload declares no "rollback_command"'
                )
        except Reject as exc:
            failed = self._deployment(ref, _A.FAILED, message=str(exc))
            rejected = report_document(task_id, TaskStatus.REJECTED, error=str(exc),
                                       correlation_id=corr)  # fmt: skip
            self._finish(task_id, rejected, failed)
            return
        draw = random.Random(f"{self.seed}/{self.agent_id}/{self._plays}")  # noqa: S311
        self._plays += 1
        duration = self.deploy_duration * draw.uniform(0.7, 1.3)
        fails = draw.random() < self.deploy_fail_rate and not (ref and ref.rollback)
        rollback = ref is not None and ref.rollback
        assigned = report_document(task_id, TaskStatus.ASSIGNED, correlation_id=corr)
        pending = None if rollback else self._deployment(ref, _A.PENDING)
        self._finish(task_id, assigned, pending, task_first=True)
        started = report_document(task_id, TaskStatus.IN_PROGRESS, progress=0,
                                  correlation_id=corr)  # fmt: skip
        in_progress = None if rollback else self._deployment(ref, _A.IN_PROGRESS)
        self._finish(task_id, started, in_progress, task_first=True)

        def finish() -> None:
            self._running.pop(task_id, None)
            result = {"simulated": True, "type": "DEPLOY", "exit_code": 1 if fails else 0}
            if fails:
                error = "exit status 1 (simulated failure)"
                self.counters.deploys_failed += 1
                outcome = self._deployment(ref, _A.FAILED, message=error)
                end = report_document(task_id, TaskStatus.FAILED, result=result, error=error,
                                      correlation_id=corr)  # fmt: skip
            else:
                if rollback:
                    self.counters.rollbacks += 1
                else:
                    self.counters.deploys_succeeded += 1
                outcome = self._deployment(
                    ref, _A.ROLLBACK if rollback else _A.SUCCESS, progress=100
                )
                end = report_document(task_id, TaskStatus.COMPLETED, progress=100,
                                      result=result, correlation_id=corr)  # fmt: skip
            self._finish(task_id, end, outcome)

        self._running[task_id] = (self.loop.call_later(duration, finish), ref, corr)

    def _cancel(self, task_id: str) -> None:
        running = self._running.pop(task_id, None)
        if running is None:
            return  # not seen (the server has cancelled it anyway), or finished
        timer, ref, corr = running
        timer.cancel()
        failed = self._deployment(ref, _A.FAILED, message="cancelled")
        self._finish(
            task_id,
            report_document(task_id, TaskStatus.FAILED, error="cancelled", correlation_id=corr),
            failed,
        )

    def _deployment(
        self,
        ref: DeploymentRef | None,
        status: DeploymentAgentStatus,
        *,
        progress: float = 0,
        message: str | None = None,
    ) -> dict[str, Any] | None:
        if ref is None:
            return None
        return deployment_document(ref.deployment_id, status, progress=progress, message=message)

    def _finish(
        self,
        task_id: str,
        doc: dict[str, Any],
        deployment: dict[str, Any] | None = None,
        *,
        task_first: bool = False,
    ) -> None:
        """Send a task report and a deployment report (if any; an outcome before the
        task's, progress after it), and remember them."""
        if len(self._done) > 10_000:  # bounded memory: forget the oldest
            self._done.pop(next(iter(self._done)))
        previous = self._done.get(task_id, (doc, None))[1]
        self._done[task_id] = (doc, deployment or previous)
        if task_first:
            self.report(doc)
        if deployment is not None:
            self.report_deployment(deployment)
        if not task_first:
            self.report(doc)


@dataclass
class FleetOptions:
    agents: int
    prefix: str = "sim"
    telemetry_interval: float = 10.0
    heartbeat_interval: float = 60.0
    keepalive: int = 60
    churn: float = 0.0  # fraction of the fleet leaving per minute
    connect_rate: float = 200.0  # new connections per second at start
    # Connects between their start and the broker's answer, at most, shared by the
    # processes (agent.loop.ConnectGate): past what the machine finishes, the ramp
    # slows down instead of collapsing.
    max_connecting: int = 64
    seed: int = 1
    topic_root: str = DEFAULT_TOPIC_ROOT
    ca_file: str | None = None
    buffer_size: int = 1000
    platform: Platform | None = None  # every agent on this platform (default: a mix)
    deploy_duration: float = 3.0  # seconds a simulated DEPLOY runs (+-30 %)
    deploy_fail_rate: float = 0.0  # the fraction of DEPLOY tasks that fail
    mqtt_version: str = "5"  # or "3.1.1"
    # The slice of the fleet this process runs (`run_many` splits it): agents
    # first..last-1; each agent's host profile depends on its index only.
    first: int = 0
    last: int | None = None

    def agent_ids(self) -> list[str]:
        """Every agent of the fleet (not only this process's slice)."""
        width = max(5, len(str(self.agents - 1)))
        return [f"{self.prefix}-{i:0{width}d}" for i in range(self.agents)]

    def indexes(self) -> range:
        return range(self.first, self.agents if self.last is None else self.last)


@dataclass
class FleetReport:
    agents: int
    connected: int
    seconds_to_all_connected: float | None
    telemetry_sent: int
    heartbeats_sent: int
    churn_events: int
    cpu_seconds: float
    cpu_percent: float  # of one core, over the run
    max_rss_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


class Fleet:
    def __init__(
        self,
        options: FleetOptions,
        broker: MqttUrl | Mapping[str, MqttUrl],
        passwords: Mapping[str, str],
        *,
        loop: Loop | None = None,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.loop = loop or Loop()
        self.loop.connect_gate.limit = options.max_connecting
        self.rng = random.Random(options.seed)  # noqa: S311 (simulated data, not security)
        self.on_progress = on_progress or (lambda _msg: None)
        self.churn_events = 0
        self.all_connected_after: float | None = None
        self._started = 0.0
        self._cpu0 = 0.0
        timing = Timing(
            telemetry_interval=options.telemetry_interval,
            heartbeat_interval=options.heartbeat_interval,
            keepalive=options.keepalive,
            inventory_interval=max(options.telemetry_interval, 60.0),
            random_phase=True,
            reconnect_max=30.0,
        )
        ids = options.agent_ids()
        mine = [(i, ids[i]) for i in options.indexes()]
        missing = [a for _, a in mine if a not in passwords]
        if missing:
            raise ValueError(f"no password for {len(missing)} agents (first: {missing[0]})")
        tree = TopicTree(options.topic_root)
        self.hosts: list[SimulatedHost] = []
        self.tasks: list[SimulatedTasks] = []
        self.sessions: list[AgentSession] = []
        for i, agent_id in mine:
            rng = random.Random(options.seed * 1_000_003 + i)  # noqa: S311
            host = SimulatedHost(i, rng, options.platform)
            self.hosts.append(host)
            # One broker for all, or each agent's home broker (a sharded fleet).
            home = broker if isinstance(broker, MqttUrl) else broker[agent_id]
            url = replace(home, username=agent_id, password=passwords[agent_id])
            tasks = SimulatedTasks(
                self.loop, agent_id, host.rng, seed=options.seed,
                deploy_duration=options.deploy_duration,
                deploy_fail_rate=options.deploy_fail_rate,
            )  # fmt: skip
            self.tasks.append(tasks)
            session = AgentSession(
                self.loop,
                agent_id=agent_id,
                url=url,
                host=host,
                tree=tree,
                timing=timing,
                tags=host.tags,
                agent_version=AGENT_VERSION,
                buffer_size=options.buffer_size,
                ca_file=options.ca_file,
                rng=host.rng,
                on_task=tasks.handle,
                mqtt_version=options.mqtt_version,
            )
            tasks.report = session.report_task
            tasks.report_deployment = session.report_deployment
            self.sessions.append(session)

    def connected(self) -> int:
        return sum(1 for s in self.sessions if s.connected)

    def start(self) -> None:
        self._started = time.monotonic()
        self._cpu0 = time.process_time()
        for i, s in enumerate(self.sessions):
            s.start(delay=i / self.options.connect_rate)
        self.loop.call_later(1.0, self._tick)
        self.loop.call_later(5.0, self._progress)

    def _tick(self) -> None:
        self.loop.call_later(1.0, self._tick)
        if self.all_connected_after is None and self.connected() == len(self.sessions):
            self.all_connected_after = time.monotonic() - self._started
            self.on_progress(
                f"all {len(self.sessions)} agents connected in {self.all_connected_after:.1f} s"
            )
        p = self.options.churn / 60.0
        if p <= 0 or self.all_connected_after is None:
            return
        for s, host in zip(self.sessions, self.hosts, strict=True):
            if s.connected and self.rng.random() < p:
                self.churn_events += 1
                if self.rng.random() < 0.2:
                    host.update_software()
                pause = self.rng.uniform(2, 20)
                if self.rng.random() < 0.5:
                    s.crash(pause)
                else:
                    s.pause(pause)

    def _progress(self) -> None:
        self.loop.call_later(10.0, self._progress)
        self.on_progress(
            f"{self.connected()}/{len(self.sessions)} connected, "
            f"{self.loop.connect_gate.held} connecting, "
            f"{self.loop.connect_gate.waiting()} waiting to, "
            f"{sum(s.counters.telemetry_sent for s in self.sessions)} samples sent, "
            f"cpu {self.cpu_percent():.1f}%, rss {rss_bytes() / 2**20:.0f} MiB, "
            f"busiest loop round {self.loop.take_busiest() * 1000:.0f} ms"
        )

    def cpu_percent(self) -> float:
        wall = max(time.monotonic() - self._started, 1e-6)
        return 100 * (time.process_time() - self._cpu0) / wall

    def stop(self) -> None:
        """Every agent publishes `offline` itself and disconnects (call on the loop)."""
        for s in self.sessions:
            s.stop()

    def all_stopped(self) -> bool:
        return all(s.stopped for s in self.sessions)

    def report(self) -> FleetReport:
        return FleetReport(
            agents=len(self.sessions),
            connected=self.connected(),
            seconds_to_all_connected=self.all_connected_after,
            telemetry_sent=sum(s.counters.telemetry_sent for s in self.sessions),
            heartbeats_sent=sum(s.counters.heartbeats_sent for s in self.sessions),
            churn_events=self.churn_events,
            cpu_seconds=time.process_time() - self._cpu0,
            cpu_percent=self.cpu_percent(),
            max_rss_bytes=max_rss_bytes(),
            extra={
                **{
                    name: sum(getattr(t.counters, name) for t in self.tasks)
                    for name in ("deploys_succeeded", "deploys_failed", "rollbacks")
                },
                # Samples sent after an outage, from the offline buffer.
                "telemetry_buffered_sent": sum(s.counters.buffered_sent for s in self.sessions),
            },
        )


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def max_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run(
    options: FleetOptions,
    broker: MqttUrl | Mapping[str, MqttUrl],
    passwords: Mapping[str, str],
    *,
    duration: float | None = None,
    on_progress: Callable[[str], None] | None = None,
    stop_timeout: float = 20.0,
) -> FleetReport:
    """Connect the fleet (this process's slice of it) and run it until `duration` s
    have passed or SIGTERM/SIGINT; then stop every agent gracefully. Runs on the
    calling thread.

    `passwords` (agent id -> password, one per `options.agent_ids()`) are accounts the
    server side made (`eucora simulate` provisions them): the simulator only connects,
    each to `broker`, or to its home broker when `broker` maps agent ids to URLs.
    """
    import signal

    say = on_progress or (lambda _m: None)
    fleet = Fleet(options, broker, passwords, on_progress=say)
    keep_gc_off_the_loop()
    loop = fleet.loop
    stopping = False

    def begin_stop() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            say(f"stopping {len(fleet.sessions)} agents")
            fleet.stop()
            loop.call_later(stop_timeout, loop.stop)

    def on_signal(_signum: int, _frame: object) -> None:
        loop.call_soon_threadsafe(begin_stop)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        fleet.start()
        if duration is not None:
            loop.call_later(duration, begin_stop)
        loop.run(until=lambda: stopping and fleet.all_stopped())
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        loop.close()
    return fleet.report()


# A process holds at most 20,000 open files on the machines we measure on (a hard
# limit): each simulator process keeps well under it.
AGENTS_PER_PROCESS: Final = 15_000


def processes_for(agents: int) -> int:
    return max(1, -(-agents // AGENTS_PER_PROCESS))


def _worker(
    options: FleetOptions,
    broker: MqttUrl | Mapping[str, MqttUrl],
    passwords: Mapping[str, str],
    duration: float | None,
    out: Any,
    name: str,
) -> None:
    def say(message: str) -> None:
        out.put(("progress", f"[{name}] {message}"))

    try:
        out.put(("report", run(options, broker, passwords, duration=duration,
                               on_progress=say)))  # fmt: skip
    except Exception as exc:
        out.put(("error", f"[{name}] {type(exc).__name__}: {exc}"))


def keep_gc_off_the_loop() -> None:
    """Once the fleet is built: its agents, clients and hosts live as long as the
    process, so freeze them out of every collection, and collect young objects every
    50,000 allocations rather than 700. With Python's defaults, py-spy put about half
    of a 14,000-agent process's CPU on one allocation in the write path, where the
    collector ran and walked them (100,000 agents over 7 processes), and its loop
    rounds took seconds."""
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


def run_many(
    options: FleetOptions,
    broker: MqttUrl | Mapping[str, MqttUrl],
    passwords: Mapping[str, str],
    *,
    processes: int,
    duration: float | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> FleetReport:
    """`run` over `processes` processes, each with a consecutive slice of the fleet;
    SIGTERM/SIGINT stop them all. The report sums theirs (memory and CPU too: the
    whole simulator's cost) and lists each in extra["processes"]."""
    if processes <= 1:
        return run(options, broker, passwords, duration=duration,
                   on_progress=on_progress)  # fmt: skip
    import multiprocessing as mp
    import queue
    import signal

    say = on_progress or (lambda _m: None)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ids = options.agent_ids()
    bounds = [options.agents * k // processes for k in range(processes + 1)]
    workers = []
    for k in range(processes):
        # --connect-rate and the connect gate are the fleet's: each process gets its
        # share (7 processes with 64 connects in flight each put 448 handshakes and
        # first publishes on 2 cores at once: CONNACK waits passed, loop rounds of 8 s).
        part = replace(options, first=bounds[k], last=bounds[k + 1],
                       connect_rate=options.connect_rate / processes,
                       max_connecting=max(8, options.max_connecting // processes))  # fmt: skip
        mine = ids[bounds[k] : bounds[k + 1]]
        workers.append(ctx.Process(
            target=_worker, name=f"sim-{k + 1}", daemon=True,
            args=(part, broker if isinstance(broker, MqttUrl) else {a: broker[a] for a in mine},
                  {a: passwords[a] for a in mine}, duration, out, f"{k + 1}/{processes}"),
        ))  # fmt: skip

    def forward(signum: int, _frame: object) -> None:
        for w in workers:
            if w.pid is not None and w.is_alive():
                os.kill(w.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    reports: list[FleetReport] = []
    errors: list[str] = []
    try:
        for w in workers:
            w.start()
        while len(reports) + len(errors) < processes:
            try:
                kind, value = out.get(timeout=1.0)
            except queue.Empty:
                if not any(w.is_alive() for w in workers) and out.empty():
                    errors.append("a simulator process died without a report")
                    break
                continue
            if kind == "progress":
                say(value)
            elif kind == "report":
                reports.append(value)
            else:
                errors.append(value)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for w in workers:
            w.join(timeout=30)
    if errors:
        raise RuntimeError("; ".join(errors))
    times = [r.seconds_to_all_connected for r in reports]
    all_connected = max(t for t in times if t is not None) if None not in times else None
    return FleetReport(
        agents=sum(r.agents for r in reports),
        connected=sum(r.connected for r in reports),
        seconds_to_all_connected=all_connected,
        telemetry_sent=sum(r.telemetry_sent for r in reports),
        heartbeats_sent=sum(r.heartbeats_sent for r in reports),
        churn_events=sum(r.churn_events for r in reports),
        cpu_seconds=sum(r.cpu_seconds for r in reports),
        cpu_percent=sum(r.cpu_percent for r in reports),
        max_rss_bytes=sum(r.max_rss_bytes for r in reports),
        extra={
            **{k: sum(r.extra[k] for r in reports) for k in reports[0].extra},
            "processes": [asdict(r) for r in reports],
        },
    )
