"""Telemetry kept while the agent is disconnected, bounded: the oldest samples go first."""

from __future__ import annotations

from collections import deque

from schemas.payloads import TelemetrySample


class TelemetryBuffer:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the telemetry buffer needs room for at least one sample")
        self.capacity = capacity
        self._samples: deque[TelemetrySample] = deque(maxlen=capacity)
        self.dropped = 0  # samples lost because the buffer was full

    def append(self, sample: TelemetrySample) -> None:
        if len(self._samples) == self.capacity:
            self.dropped += 1
        self._samples.append(sample)

    def take_all(self) -> list[TelemetrySample]:
        """Every buffered sample, oldest first; the buffer is empty afterwards."""
        samples = list(self._samples)
        self._samples.clear()
        return samples

    def __len__(self) -> int:
        return len(self._samples)
