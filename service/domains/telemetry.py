"""The telemetry domain: samples into the `telemetry` table, each stored once.

Binary COPY into a session-local staging table (no key, no index: full speed), then
`INSERT ... SELECT ... ON CONFLICT DO NOTHING`, so a redelivered or replayed sample
is stored once (the key is (agent_id, time)). The column list is the contract's
(schemas.constants.TELEMETRY_METRICS).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any, Final

import psycopg

from schemas.constants import TELEMETRY_METRICS
from schemas.validate import TelemetryMessage, telemetry_samples

Conn = psycopg.AsyncConnection[Any]
Row = tuple[Any, ...]

COLUMNS: Final = ("agent_id", "time", *TELEMETRY_METRICS, "correlation_id")
_TYPES: Final = {
    "time": "timestamptz", "agent_id": "text", "correlation_id": "text",
    "net_rx_bytes": "int8", "net_tx_bytes": "int8",
}  # fmt: skip
_COPY_TYPES: Final = [_TYPES.get(c, "float8") for c in COLUMNS]
_COLS: Final = ", ".join(COLUMNS)
# One C call per sample for every field after agent_id (ts, the metrics, correlation_id).
_FIELDS: Final = attrgetter("ts", *TELEMETRY_METRICS, "correlation_id")


def rows(agent_id: str, message: TelemetryMessage) -> list[Row]:
    """The rows of one telemetry message, single sample or batch alike."""
    return [(agent_id, *_FIELDS(s)) for s in telemetry_samples(message)]


async def prepare(conn: Conn) -> None:
    """Once per writer connection: its staging table (rows go at every COMMIT)."""
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS telemetry_stage"
        " (LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )


async def store(conn: Conn, rows: Sequence[Row]) -> int:
    """Store the samples (in the caller's transaction); returns how many were new."""
    async with conn.cursor() as cur:
        async with cur.copy(f"COPY telemetry_stage ({_COLS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_COPY_TYPES)
            for r in rows:
                await copy.write_row(r)
        await cur.execute(
            f"INSERT INTO telemetry ({_COLS}) SELECT {_COLS}"
            " FROM telemetry_stage ON CONFLICT DO NOTHING"
        )
        return max(cur.rowcount, 0)
