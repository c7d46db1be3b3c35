"""The agent side of the contract, shared by the reference agent and the simulator.

Pure functions and small value objects only (no sockets): topics, payload building
(validated through the schemas models), the epoch clock and the rule for reacting to
the agent's own retained status. docs/agents.md explains the rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Final

from schemas.constants import TELEMETRY_METRICS, WILL_REASON
from schemas.payloads import (
    MAX_BATCH,
    Hardware,
    Heartbeat,
    Inventory,
    Register,
    Software,
    Status,
    TelemetryBatch,
    TelemetrySample,
)
from schemas.states import AgentState, Platform
from schemas.topics import Kind, TopicTree
from schemas.validate import PayloadError, dump

# The last will's `reason` is schemas.constants.WILL_REASON: the bridge records such
# an offline as source "last_will".
STOP_REASON: Final = "graceful shutdown"
REPUBLISH_REASON: Final = "republished after an older offline"


def now() -> str:
    """RFC 3339 with the UTC offset: the schemas take timestamps as strings only."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def rfc3339(ts: datetime | str | None) -> str:
    if ts is None:
        return now()
    return ts if isinstance(ts, str) else ts.isoformat()


@dataclass(frozen=True)
class AgentTopics:
    """The topics of one agent."""

    status: str
    register: str
    heartbeat: str
    telemetry: str
    inventory: str
    tasks: str
    task_status: str
    deployment_status: str

    @classmethod
    def of(cls, tree: TopicTree, agent_id: str) -> AgentTopics:
        return cls(
            status=tree.agent(agent_id, Kind.STATUS),
            register=tree.agent(agent_id, Kind.REGISTER),
            heartbeat=tree.agent(agent_id, Kind.HEARTBEAT),
            telemetry=tree.agent(agent_id, Kind.TELEMETRY),
            inventory=tree.agent(agent_id, Kind.INVENTORY),
            tasks=tree.agent(agent_id, Kind.TASKS),
            task_status=tree.agent(agent_id, Kind.TASK_STATUS),
            deployment_status=tree.agent(agent_id, Kind.DEPLOYMENT_STATUS),
        )


class EpochClock:
    """Strictly increasing epochs: milliseconds since 1970, but never less than the last
    one + 1, so a clock set back (or an epoch seen from another instance of this agent
    id, see `observe`) cannot produce an epoch the bridge would take for an old one."""

    def __init__(self, last: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.last = last
        self._clock = clock

    def next(self) -> int:
        self.last = max(int(self._clock() * 1000), self.last + 1)
        return self.last

    def observe(self, epoch: int) -> None:
        self.last = max(self.last, epoch)


class OwnStatusAction(Enum):
    NOTHING = "nothing"
    REPUBLISH = "republish"  # publish `online` with our epoch again
    RECONNECT = "reconnect"  # our epoch cannot win any more: reconnect with a new one


def on_own_status(
    current_epoch: int | None, state: AgentState, epoch: int, *, stopping: bool
) -> OwnStatusAction:
    """What a connected agent does when its own status topic shows (state, epoch).

    - `online`: ours, or another process with our id (the broker will make one of us
      leave): nothing.
    - `offline` with an older epoch: an earlier session's last will (or graceful
      offline) overwrote our retained `online`: republish it. The bridge has ignored
      that offline already; the republish repairs the retained message for everyone
      else (and is a duplicate for the bridge).
    - `offline` with our own epoch while we are not stopping: the broker published it
      only if it considers this session gone; the bridge accepts an equal-epoch
      offline as real and ignores an `online` of that same epoch afterwards, so
      republishing could never win. Reconnect: the new session has a new epoch and a
      will that matches it.
    - `offline` with a newer epoch: another process uses our id, or our clock went
      back; reconnect with an epoch above it (the clock observes it first).
    - While stopping (our own graceful offline comes back to us): nothing.
    """
    if stopping or current_epoch is None or state is AgentState.ONLINE:
        return OwnStatusAction.NOTHING
    if epoch < current_epoch:
        return OwnStatusAction.REPUBLISH
    return OwnStatusAction.RECONNECT


# --- payloads ------------------------------------------------------------------------


def status(
    state: AgentState,
    epoch: int,
    *,
    reason: str | None = None,
    session_present: bool | None = None,
    ts: datetime | None = None,
) -> bytes:
    fields: dict[str, object] = {"state": state, "epoch": epoch, "ts": rfc3339(ts)}
    if reason is not None:
        fields["reason"] = reason
    if session_present is not None:
        fields["session_present"] = session_present
    return dump(Status.model_validate(fields, strict=False))


def will(epoch: int) -> bytes:
    """The last will: offline with the epoch of the session it belongs to. Its `ts` is
    the connect time (the broker sends it as it was set)."""
    return status(AgentState.OFFLINE, epoch, reason=WILL_REASON)


@dataclass(frozen=True)
class HostInfo:
    """What a registration says about the machine."""

    hostname: str
    platform: Platform
    os_version: str
    cpu_count: int
    memory_bytes: int
    disk_bytes: int
    ip_address: str
    mac_address: str


def register(host: HostInfo, agent_version: str, tags: dict[str, str]) -> bytes:
    return dump(
        Register.model_validate(
            {
                "hostname": host.hostname,
                "platform": host.platform,
                "os_version": host.os_version,
                "agent_version": agent_version,
                "hardware": Hardware(
                    cpu_count=host.cpu_count,
                    memory_bytes=host.memory_bytes,
                    disk_bytes=host.disk_bytes,
                ),
                "ip_address": host.ip_address,
                "mac_address": host.mac_address,
                "tags": tags,
                "ts": now(),
            },
            strict=False,
        )
    )


def heartbeat(seq: int, uptime_s: float | None, buffer: tuple[int, int] | None = None) -> bytes:
    """`buffer`: (buffered, dropped) samples of the offline buffer, when worth saying."""
    fields: dict[str, object] = {"ts": now(), "seq": seq}
    if uptime_s is not None:
        fields["uptime_s"] = round(uptime_s, 3)
    if buffer is not None:
        fields["buffered_samples"], fields["dropped_samples"] = buffer
    return dump(Heartbeat.model_validate(fields, strict=False))


@dataclass(frozen=True)
class Metrics:
    """One reading of the host (or of a simulated host): the fields are the contract's
    TELEMETRY_METRICS, in that order (tests/test_agents_protocol.py checks it)."""

    cpu_percent: float
    memory_percent: float
    disk_percent: float
    net_rx_bytes: int
    net_tx_bytes: int

    def as_fields(self) -> dict[str, float | int]:
        """The telemetry fields, named as the contract names them."""
        return {name: getattr(self, name) for name in TELEMETRY_METRICS}


def sample(m: Metrics, ts: datetime | None = None) -> TelemetrySample:
    """A sample with percentages clamped to 0..100 (2 decimals) and byte counts >= 0."""
    fields: dict[str, object] = {"ts": rfc3339(ts)}
    for name, value in m.as_fields().items():
        if name.endswith("_percent"):
            fields[name] = round(min(max(float(value), 0.0), 100.0), 2)
        else:
            fields[name] = max(int(value), 0)
    return TelemetrySample.model_validate(fields, strict=False)


def telemetry(s: TelemetrySample) -> bytes:
    return dump(s)


def telemetry_batches(samples: Sequence[TelemetrySample]) -> list[bytes]:
    """Samples as `{"samples": [...]}` messages of at most MAX_BATCH samples, oldest
    first; a batch over the size limit is split in halves."""
    out: list[bytes] = []
    for i in range(0, len(samples), MAX_BATCH):
        out += _batch(samples[i : i + MAX_BATCH])
    return out


def _batch(chunk: Sequence[TelemetrySample]) -> list[bytes]:
    try:
        return [dump(TelemetryBatch(samples=list(chunk)))]
    except PayloadError:
        if len(chunk) == 1:
            raise
        half = len(chunk) // 2
        return _batch(chunk[:half]) + _batch(chunk[half:])


def inventory(software: Sequence[Software]) -> bytes:
    return dump(Inventory.model_validate({"ts": now(), "software": list(software)}))


def software_digest(software: Sequence[Software]) -> int:
    """Order-independent fingerprint: an inventory is sent only when it changes."""
    return hash(frozenset((s.name, s.version, s.publisher) for s in software))
