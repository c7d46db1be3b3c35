"""Telemetry kept while the agent cannot send it: bounded, oldest first out, and (with a
state directory) on disk, so it survives an agent restart and a host reboot.

Both buffers have one interface. Samples get increasing sequence numbers; `unsent()`
returns those not yet handed to the MQTT client in this process, `sent(seq)` marks
them handed, and `acked(seq)` forgets every sample up to `seq` once the broker
acknowledged the message carrying it. A sample handed but not acknowledged when the
process dies is sent again after a restart (the bridge stores each sample once: its
time is part of the key).

The bound (docs/agents.md, "Offline buffer"): at most `capacity` samples and none
older than `max_age_s`; past it the oldest go first and are counted in `dropped`,
which the agent reports in its registration (`telemetry_dropped`). The count is kept
with the samples, so it too survives restarts.

`open_buffer` picks the durable one when it can; an unwritable directory, a corrupt
file or a full disk degrades to the memory buffer with one warning, never a crash or
a stopped sampler.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
from pathlib import Path
from typing import Protocol

from schemas.payloads import TelemetrySample

log = logging.getLogger("eucora.agent.buffer")

BUFFER_FILE = "telemetry.sqlite3"
# A week: an agent back from a long absence still sends what it measured; older
# samples are history nobody asked the agent to keep.
DEFAULT_MAX_AGE_S = 604_800.0


class Buffer(Protocol):
    @property
    def dropped(self) -> int: ...

    def append(self, sample: TelemetrySample) -> None: ...
    def unsent(self) -> list[tuple[int, TelemetrySample]]: ...
    def sent(self, seq: int) -> None: ...
    def acked(self, seq: int) -> None: ...
    def __len__(self) -> int: ...


class TelemetryBuffer:
    """In memory: what a restart loses."""

    def __init__(self, capacity: int, max_age_s: float = DEFAULT_MAX_AGE_S, dropped: int = 0):
        if capacity < 1:
            raise ValueError("the telemetry buffer needs room for at least one sample")
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.dropped = dropped  # samples lost: the buffer was full, or they were too old
        self._samples: collections.deque[tuple[int, float, TelemetrySample]] = collections.deque()
        self._seq = 0
        self._handed = 0  # the highest seq handed to the client

    def append(self, sample: TelemetrySample) -> None:
        self._seq += 1
        self._samples.append((self._seq, time.time(), sample))
        while len(self._samples) > self.capacity:
            self._samples.popleft()
            self.dropped += 1
        self._expire()

    def _expire(self) -> None:
        oldest = time.time() - self.max_age_s
        while self._samples and self._samples[0][1] < oldest:
            self._samples.popleft()
            self.dropped += 1

    def unsent(self) -> list[tuple[int, TelemetrySample]]:
        self._expire()
        return [(seq, s) for seq, _, s in self._samples if seq > self._handed]

    def sent(self, seq: int) -> None:
        self._handed = max(self._handed, seq)

    def acked(self, seq: int) -> None:
        while self._samples and self._samples[0][0] <= seq:
            self._samples.popleft()

    def __len__(self) -> int:
        return len(self._samples)


class DurableBuffer:
    """SQLite in WAL mode in the agent's state directory. synchronous=NORMAL: a sample
    is on disk once the next WAL checkpoint or transaction after it syncs, so a crash
    of the agent loses nothing and a power cut at most the last moments."""

    def __init__(self, path: Path, capacity: int, max_age_s: float = DEFAULT_MAX_AGE_S):
        if capacity < 1:
            raise ValueError("the telemetry buffer needs room for at least one sample")
        self.path = path
        self.capacity = capacity
        self.max_age_s = max_age_s
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS samples"
            " (seq INTEGER PRIMARY KEY AUTOINCREMENT, taken REAL NOT NULL, body BLOB NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )
        row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        self.dropped = int(row[0]) if row else 0
        (self._count,) = self._db.execute("SELECT count(*) FROM samples").fetchone()
        self._handed = 0  # nothing is handed to a client in a new process

    def append(self, sample: TelemetrySample) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            db.execute(
                "INSERT INTO samples (taken, body) VALUES (?, ?)",
                (time.time(), sample.model_dump_json().encode()),
            )
            self._count += 1
            lost = 0
            if self._count > self.capacity:
                lost += db.execute(
                    "DELETE FROM samples WHERE seq IN"
                    " (SELECT seq FROM samples ORDER BY seq LIMIT ?)",
                    (self._count - self.capacity,),
                ).rowcount
            lost += db.execute(
                "DELETE FROM samples WHERE taken < ?", (time.time() - self.max_age_s,)
            ).rowcount
            if lost:
                self._count -= lost
                db.execute(
                    "INSERT INTO counters VALUES ('dropped', ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (self.dropped + lost,),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.dropped += lost

    def unsent(self) -> list[tuple[int, TelemetrySample]]:
        rows = self._db.execute(
            "SELECT seq, body FROM samples WHERE seq > ? ORDER BY seq", (self._handed,)
        ).fetchall()
        return [(seq, TelemetrySample.model_validate_json(body)) for seq, body in rows]

    def sent(self, seq: int) -> None:
        self._handed = max(self._handed, seq)

    def acked(self, seq: int) -> None:
        self._count -= self._db.execute("DELETE FROM samples WHERE seq <= ?", (seq,)).rowcount

    def __len__(self) -> int:
        return int(self._count)

    def close(self) -> None:
        self._db.close()


class FallbackBuffer:
    """The durable buffer until the disk fails it (full, gone read-only), then memory
    for the rest of the process, with one warning. Samples already on disk stay there
    and go out after the next start."""

    def __init__(self, durable: DurableBuffer) -> None:
        self._inner: DurableBuffer | TelemetryBuffer = durable
        self.capacity = durable.capacity

    @property
    def dropped(self) -> int:
        return self._inner.dropped

    @property
    def durable(self) -> bool:
        return isinstance(self._inner, DurableBuffer)

    def _degrade(self, exc: Exception) -> None:
        assert isinstance(self._inner, DurableBuffer)
        log.warning(
            "the offline telemetry buffer cannot write to disk; keeping samples in memory",
            extra={"path": str(self._inner.path), "error": str(exc)},
        )
        self._inner = TelemetryBuffer(self.capacity, self._inner.max_age_s, self._inner.dropped)

    def append(self, sample: TelemetrySample) -> None:
        try:
            self._inner.append(sample)
        except sqlite3.Error as exc:
            self._degrade(exc)
            self._inner.append(sample)

    def unsent(self) -> list[tuple[int, TelemetrySample]]:
        try:
            return self._inner.unsent()
        except sqlite3.Error as exc:
            self._degrade(exc)
            return []

    def sent(self, seq: int) -> None:
        self._inner.sent(seq)

    def acked(self, seq: int) -> None:
        try:
            self._inner.acked(seq)
        except sqlite3.Error as exc:
            self._degrade(exc)

    def __len__(self) -> int:
        return len(self._inner)


def open_buffer(
    state_dir: Path | None, capacity: int, max_age_s: float = DEFAULT_MAX_AGE_S
) -> Buffer:
    """The durable buffer in `state_dir` when it can be opened, else memory (one
    warning when a state directory was given but cannot hold it)."""
    if state_dir is None:
        return TelemetryBuffer(capacity, max_age_s)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        return FallbackBuffer(DurableBuffer(state_dir / BUFFER_FILE, capacity, max_age_s))
    except (OSError, sqlite3.Error) as exc:
        log.warning(
            "cannot keep the offline telemetry buffer on disk; keeping it in memory",
            extra={"path": str(state_dir / BUFFER_FILE), "error": str(exc)},
        )
        return TelemetryBuffer(capacity, max_age_s)
