"""What ingest hands to the store: one received message, already validated."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from schemas.payloads import TelemetryBatch, TelemetrySample
from schemas.topics import Kind
from schemas.validate import AnyPayload, PayloadError
from service.domains import telemetry


@dataclass(slots=True)
class Inbound:
    mid: int
    qos: int
    generation: int  # of the broker connection it came on (acks go only to that one)
    topic: str
    agent_id: str | None
    kind: Kind | None
    model: AnyPayload | None = None
    error: PayloadError | None = None
    payload: bytes | bytearray = b""
    received: float = field(default_factory=time.monotonic)
    link: int = 0  # which broker link it came on (its index in the bridge's links)
    rows: list[telemetry.Row] | None = None  # telemetry: set by accept() instead of model

    def accept(self, model: AnyPayload) -> None:
        """Keep the validated payload: telemetry as its rows, ready for COPY (made here,
        on receipt, the model is not held: fewer objects per pending message for the
        garbage collector to walk); any other kind as its model."""
        if isinstance(model, TelemetrySample | TelemetryBatch):
            self.rows = telemetry.rows(self.agent_id or "", model)
        else:
            self.model = model

    def log_fields(self) -> dict[str, object]:
        """The ids a log line about this message carries (service/logs.py context)."""
        fields: dict[str, object] = {"agent_id": self.agent_id}
        for name in ("task_id", "deployment_id", "correlation_id"):
            fields[name] = getattr(self.model, name, None)
        return fields
