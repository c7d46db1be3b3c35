"""Dead letters: what could not be stored, kept with its reason and a bounded copy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from schemas.events import EventKind
from service.domains import events
from service.domains.events import NewEvent

Conn = psycopg.AsyncConnection[Any]

PAYLOAD_MAX: Final = 4096  # the table's CHECK: a bounded copy, payload_size the real size
_COLS: Final = "topic, agent_id, kind, reason, detail, payload, payload_size"
_TYPES: Final = ["text", "text", "text", "text", "text", "bytea", "int4"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    agent_id: str | None
    kind: str | None
    reason: str
    detail: str
    payload: bytes

    def row(self) -> tuple[Any, ...]:
        return (
            self.topic[:1024], self.agent_id, self.kind, self.reason, self.detail[:2000],
            self.payload[:PAYLOAD_MAX], len(self.payload),
        )  # fmt: skip

    def event(self) -> NewEvent:
        topic, agent_id, kind, reason, detail, _, size = self.row()
        data = {"topic": topic, "kind": kind, "reason": reason, "detail": detail}
        return NewEvent(EventKind.DEAD_LETTER, agent_id, data | {"payload_size": size})


async def write(conn: Conn, letters: Sequence[DeadLetter]) -> None:
    """The one writer of dead_letters; each letter is also one event."""
    async with conn.cursor().copy(f"COPY dead_letters ({_COLS}) FROM STDIN (FORMAT BINARY)") as cp:
        cp.set_types(_TYPES)
        for letter in letters:
            await cp.write_row(letter.row())
    await events.record(conn, [letter.event() for letter in letters])
