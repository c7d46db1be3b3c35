"""`eucora telemetry show ID [--since 1h] [--bucket 1m]`: an agent's metrics, charted.

Without --bucket every stored sample is a row; with it, one row per bucket holding the
averages (`time_bucket`, the same call on TimescaleDB and on plain PostgreSQL). The
terminal chart is one line of Unicode blocks per metric, no dependency needed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import EXIT_NOT_OK, emit_json, fail, iso, open_database, parse_duration
from cli.db import DATABASE_URL_OPTION
from schemas.constants import TELEMETRY_METRICS

if TYPE_CHECKING:
    from service.db.models import TelemetryPublic

app = typer.Typer(help="Agent metrics over time.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Agent metrics over time."""
    # A callback keeps `telemetry` a group (`eucora telemetry show`) with one command.


METRICS = TELEMETRY_METRICS
_LABELS = {
    "cpu_percent": "cpu %",
    "memory_percent": "memory %",
    "disk_percent": "disk %",
    "net_rx_bytes": "net rx",
    "net_tx_bytes": "net tx",
}
BLOCKS = "▁▂▃▄▅▆▇█"


def fetch(
    conn: Any, agent_id: str, since: timedelta, bucket: timedelta | None
) -> list[TelemetryPublic]:
    from service.db.models import TelemetryPublic, model_row

    if bucket is None:
        sql = (
            "SELECT time, cpu_percent, memory_percent, disk_percent, net_rx_bytes, net_tx_bytes"
            " FROM telemetry WHERE agent_id = %(id)s AND time >= now() - %(since)s ORDER BY time"
        )
    else:
        sql = (
            "SELECT time_bucket(%(bucket)s, time) AS time, avg(cpu_percent) AS cpu_percent,"
            " avg(memory_percent) AS memory_percent, avg(disk_percent) AS disk_percent,"
            " avg(net_rx_bytes) AS net_rx_bytes, avg(net_tx_bytes) AS net_tx_bytes"
            " FROM telemetry WHERE agent_id = %(id)s AND time >= now() - %(since)s"
            " GROUP BY 1 ORDER BY 1"
        )
    params = {"id": agent_id, "since": since, "bucket": bucket}
    rows: list[TelemetryPublic] = (
        conn.cursor(row_factory=model_row(TelemetryPublic)).execute(sql, params).fetchall()
    )
    return rows


def sparkline(values: Sequence[float | None], width: int, top: float) -> str:
    """`values` resampled to `width` columns (averages), scaled 0..top, as blocks."""
    if not values or width <= 0:
        return ""
    columns: list[float | None] = []
    n = len(values)
    for c in range(min(width, n)):
        lo, hi = c * n // min(width, n), (c + 1) * n // min(width, n)
        chunk = [v for v in values[lo:hi] if v is not None]
        columns.append(sum(chunk) / len(chunk) if chunk else None)
    top = top or 1.0
    return "".join(
        " " if v is None else BLOCKS[min(int(v / top * len(BLOCKS)), len(BLOCKS) - 1)]
        for v in columns
    )


def _human(metric: str, value: float) -> str:
    if metric.endswith("_percent"):
        return f"{value:.1f}"
    for unit in ("B", "K", "M", "G"):
        if abs(value) < 1024:
            return f"{value:.0f}{unit}"
        value /= 1024
    return f"{value:.1f}T"


def chart(rows: list[TelemetryPublic], width: int) -> list[str]:
    label_w = max(len(v) for v in _LABELS.values())
    stats_w = 40
    spark_w = max(width - label_w - stats_w - 4, 10)
    lines = []
    for metric in METRICS:
        series: list[float | None] = [getattr(r, metric) for r in rows]
        present = [float(v) for v in series if v is not None]
        if not present:
            continue
        top = 100.0 if metric.endswith("_percent") else max(max(present), 1.0)
        line = sparkline(series, spark_w, top)
        figures = (min(present), sum(present) / len(present), max(present), present[-1])
        stats = "  ".join(
            f"{name} {_human(metric, v)}"
            for name, v in zip(("min", "avg", "max", "last"), figures, strict=True)
        )
        lines.append(f"{_LABELS[metric].ljust(label_w)}  {line.ljust(spark_w)}  {stats}")
    return lines


@app.command()
def show(
    agent_id: Annotated[str, typer.Argument(help="the agent's id")],
    since: Annotated[str, typer.Option(help="how far back: 30m, 1h, 7d...")] = "1h",
    bucket: Annotated[
        str | None, typer.Option(help="average per bucket of this width: 1m, 5m, 1h...")
    ] = None,
    database_url: str | None = DATABASE_URL_OPTION,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = (
        False
    ),
) -> None:
    """An agent's telemetry: a chart in the terminal, or rows with --json."""
    window = parse_duration(since, "--since")
    width = parse_duration(bucket, "--bucket") if bucket else None
    with open_database(database_url, autocommit=True) as conn:
        known = conn.execute("SELECT 1 FROM agents WHERE agent_id = %s", (agent_id,)).fetchone()
        if known is None:
            fail(f"agent {agent_id!r} not found", EXIT_NOT_OK)
        rows = fetch(conn, agent_id, window, width)
    if json_output:
        emit_json([r.model_dump(mode="json") for r in rows])
        return
    if not rows:
        typer.echo(f"no telemetry from {agent_id} in the last {since}")
        return
    what = f"{len(rows)} buckets of {bucket}" if bucket else f"{len(rows)} samples"
    typer.echo(f"{agent_id}: {what}, {iso(rows[0].time)} .. {iso(rows[-1].time)}")
    columns = shutil.get_terminal_size((100, 24)).columns
    for line in chart(rows, columns):
        typer.echo(line)


__all__ = ["app", "fetch", "parse_duration", "sparkline"]
