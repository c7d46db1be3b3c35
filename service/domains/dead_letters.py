"""Dead letters: what could not be stored, kept with its reason and a bounded copy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg

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


async def write(conn: Conn, letters: Sequence[DeadLetter]) -> None:
    async with conn.cursor().copy(f"COPY dead_letters ({_COLS}) FROM STDIN (FORMAT BINARY)") as cp:
        cp.set_types(_TYPES)
        for letter in letters:
            await cp.write_row(letter.row())
