"""The route table: every kind an agent sends maps to exactly one way of storing it.

Telemetry and heartbeats are the bulk kinds: the store writes them itself, a whole
batch at a time (COPY, one UPDATE). Every other kind has a handler here: a thin
adapter from a batch's validated messages of that kind (in arrival order) to its
domain (service/domains/), run inside the batch's transaction. The domains apply a
batch's status messages, registrations, inventories and task reports set-wise, with a
fixed number of statements however many there are (docs/ingest.md): one statement
per message kept a fleet's reconnect storm or a fan-out's reports at a few hundred
messages a second.

A handler that cannot apply a valid message calls `reject` for it and writes nothing
for it (the store gives it no savepoint): the message becomes a dead letter with that
reason and the rest of the batch is stored. Any other exception rolls the batch back,
and the store writes it again message by message (store.py). `Routes` refuses to be
built with a kind that has no route, so no kind can be acknowledged and silently
dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from schemas.payloads import (
    DeploymentStatusReport,
    Inventory,
    Register,
    Status,
    TaskStatusReport,
)
from schemas.states import TERMINAL, AgentState, DeadLetterReason
from schemas.topics import AGENT_KINDS, Kind
from service import logs
from service.bridge.message import Inbound
from service.domains import agents, deployments, inventory, tasks

log = logging.getLogger("eucora.bridge.routes")

Conn = psycopg.AsyncConnection[Any]
Reject = Callable[[Inbound, str, str], None]  # (message, reason, detail)
Handler = Callable[[Conn, Sequence[Inbound], Reject], Awaitable[None]]
M = TypeVar("M")

# Stored by the store itself, batched.
BULK: frozenset[Kind] = frozenset({Kind.TELEMETRY, Kind.HEARTBEAT})


class Rejected(Exception):
    """A valid message that cannot be applied: dead-lettered with `reason` (raised by
    a per-message handler, see `each`)."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Routes:
    handlers: Mapping[Kind, Handler]

    def __post_init__(self) -> None:
        missing = [k.value for k in AGENT_KINDS if k not in BULK and k not in self.handlers]
        doubled = [k.value for k in self.handlers if k in BULK]
        foreign = [k.value for k in self.handlers if k not in AGENT_KINDS]
        if missing or doubled or foreign:
            raise ValueError(
                f"route table: no route for {missing}, bulk kinds with a handler {doubled},"
                f" handlers for kinds agents do not send {foreign}"
            )


def _models(items: Sequence[Inbound], cls: type[M]) -> list[tuple[str, M]]:
    out = []
    for item in items:
        assert item.agent_id is not None and isinstance(item.model, cls)
        out.append((item.agent_id, item.model))
    return out


async def on_status(conn: Conn, items: Sequence[Inbound], reject: Reject) -> None:
    accepted = await agents.apply_statuses(conn, _models(items, Status))
    # session_present false: the broker lost the agent's queue (session expired,
    # broker restarted without its store, never connected before). Absent (an agent
    # that does not say) is treated alike: a duplicate is harmless, a lost task is not.
    lost = [
        r.agent_id
        for r in accepted
        if r.msg.state is AgentState.ONLINE and r.msg.session_present is not True
    ]
    for agent_id, n in (await tasks.owe_again(conn, lost)).items():
        log.info(
            "republishing tasks to an agent without its session",
            extra={"agent_id": agent_id, "tasks": n},
        )


async def on_register(conn: Conn, items: Sequence[Inbound], reject: Reject) -> None:
    await agents.apply_registrations(conn, _models(items, Register))


async def on_inventory(conn: Conn, items: Sequence[Inbound], reject: Reject) -> None:
    await inventory.apply_inventories(conn, _models(items, Inventory))


async def on_task_status(conn: Conn, items: Sequence[Inbound], reject: Reject) -> None:
    outcomes = await tasks.apply_reports(conn, _models(items, TaskStatusReport))
    for item, outcome in zip(items, outcomes, strict=True):
        if outcome.outcome == "unknown_task":  # nothing was written for it
            reject(item, DeadLetterReason.UNKNOWN_TASK, f"task-status: no task {outcome.task_id}")
    if any(o.deployment_id is not None and o.status in TERMINAL for o in outcomes):
        await deployments.notify(conn)  # their deployments may start the next agents now


def each(handle: Callable[[Conn, Inbound], Awaitable[None]]) -> Handler:
    """A handler for a kind applied message by message (rare kinds): each runs in a log
    context naming its ids, and `Rejected` (raised before it wrote anything) rejects it."""

    async def handler(conn: Conn, items: Sequence[Inbound], reject: Reject) -> None:
        for item in items:
            with logs.context(**item.log_fields()):
                try:
                    await handle(conn, item)
                except Rejected as exc:
                    reject(item, exc.reason, exc.detail)

    return handler


async def on_deployment_status(conn: Conn, item: Inbound) -> None:
    assert item.agent_id is not None and isinstance(item.model, DeploymentStatusReport)
    try:
        await deployments.apply_report(conn, item.agent_id, item.model)
    except deployments.UnknownDeployment as exc:
        raise Rejected(DeadLetterReason.UNKNOWN_DEPLOYMENT, str(exc)) from None


def default_routes() -> Routes:
    """Handlers run in this order within a batch (MQTT orders messages only within a
    topic, so no order across kinds is promised to begin with): an agent's status
    before its registration and inventory, which is the order an agent sends them."""
    return Routes(
        {
            Kind.STATUS: on_status,
            Kind.REGISTER: on_register,
            Kind.INVENTORY: on_inventory,
            Kind.TASK_STATUS: on_task_status,
            Kind.DEPLOYMENT_STATUS: each(on_deployment_status),
        }
    )
