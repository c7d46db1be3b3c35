"""Background work of the bridge besides ingest (sweeps, the task outbox...).

Each entry is started as a task when the bridge is ready and cancelled when it stops.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from psycopg_pool import AsyncConnectionPool

from service.config import Settings

if TYPE_CHECKING:
    from service.bridge.ingest import Ingest

Worker = Callable[[Settings, AsyncConnectionPool, "Ingest"], Coroutine[Any, Any, None]]


def workers() -> list[Worker]:
    """The workers to run; later features append theirs here."""
    from service.bridge.outbox import outbox_worker
    from service.bridge.sweeper import stale_sweeper
    from service.bridge.task_sweeps import task_sweeper

    return [stale_sweeper, outbox_worker, task_sweeper]
