"""The reference agent: one AgentSession reporting on this machine (`eucora agent run`).

Runs the agent loop on the main thread; SIGTERM/SIGINT stop it gracefully (offline
published by the agent itself, then a clean disconnect, so no will is sent).
Exit codes: 0 stopped, 2 configuration refused (bad credentials, bad settings).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import signal
from pathlib import Path

from agent import inventory
from agent.buffer import open_buffer
from agent.config import AgentConfig
from agent.host import RealHost
from agent.loop import Loop
from agent.protocol import EpochClock
from agent.session import AgentSession
from agent.tasks import AllowList, TaskExecutor
from schemas.topics import TopicTree

log = logging.getLogger("eucora.agent")


def agent_version() -> str:
    try:
        return importlib.metadata.version("eucora-agent-plane")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


class PersistentEpochClock(EpochClock):
    """Remembers the last epoch in the state folder, so it keeps increasing across
    restarts even if the clock goes back."""

    def __init__(self, path: Path) -> None:
        last = 0
        with contextlib.suppress(OSError, ValueError):
            last = int(path.read_text().strip())
        super().__init__(last)
        self.path = path

    def next(self) -> int:
        epoch = super().next()
        try:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(epoch))
            os.replace(tmp, self.path)
        except OSError as exc:  # the epoch is still strictly increasing in this process
            log.warning("cannot save the epoch", extra={"error": str(exc)})
        return epoch


def run(config: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    loop = Loop()
    epochs: EpochClock = EpochClock()
    if config.state_dir is not None:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        epochs = PersistentEpochClock(config.state_dir / "epoch")
    host = RealHost(
        config.mqtt.host,
        config.mqtt.port,
        config.inventory if config.inventory is not None else inventory.default_sources(),
    )
    exit_code = 0

    def fatal(reason: str) -> None:
        nonlocal exit_code
        exit_code = 2
        log.error("giving up: the broker refused this agent", extra={"reason": reason})
        loop.stop()

    executor: TaskExecutor | None = None

    def on_task(payload: bytes | bytearray) -> None:
        if executor is not None:
            executor.handle(payload)

    session = AgentSession(
        loop,
        agent_id=config.agent_id,
        url=config.mqtt,
        password=config.password,
        host=host,
        tree=TopicTree(config.topic_root),
        timing=config.timing,
        tags=config.tags,
        agent_version=agent_version(),
        epochs=epochs,
        buffer=open_buffer(config.state_dir, config.buffer_size, config.buffer_max_age),
        ca_file=config.ca_file,
        cert_file=config.cert_file,
        key_file=config.key_file,
        on_fatal=fatal,
        on_stopped=loop.stop,
        on_task=on_task,
        mqtt_version=config.mqtt_version,
    )
    try:
        allow = AllowList.load(config.allow_list) if config.allow_list else AllowList()
    except (OSError, ValueError) as exc:
        log.error("cannot read the allow-list", extra={"error": str(exc)})
        loop.close()
        return 2
    executor = TaskExecutor(
        session.report_task,
        report_deployment=session.report_deployment,
        agent_id=config.agent_id,
        allow=allow,
        # Task ids already handled survive a restart: a redelivered task never runs twice.
        state_file=config.state_dir / "tasks.json" if config.state_dir else None,
    )
    executor.recover()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        loop.call_soon_threadsafe(session.stop)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info(
        "agent starting",
        extra={"agent_id": config.agent_id, "broker": str(config.mqtt),
               "telemetry_interval": config.timing.telemetry_interval},
    )  # fmt: skip
    try:
        session.start()
        loop.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        executor.close()
        loop.close()
    log.info("agent stopped", extra={"agent_id": config.agent_id, "exit_code": exit_code})
    return exit_code
