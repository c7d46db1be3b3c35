"""The route table: every kind an agent sends maps to exactly one way of storing it.

Telemetry and heartbeats are the bulk kinds: the store writes them itself, a whole
batch at a time (COPY, one UPDATE). Every other kind has a handler here: a thin
adapter from a validated message to its domain (service/domains/), run inside the
batch's transaction.

A handler that cannot apply a valid message raises `Rejected` BEFORE writing
anything (the store gives it no savepoint): the message becomes a dead letter with that
reason and the rest of the batch is stored. Any other exception rolls the batch back,
and the store writes it again message by message (store.py). `Routes` refuses to be
built with a kind that has no route, so no kind can be acknowledged and silently
dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
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
from service.bridge.message import Inbound
from service.domains import agents, deployments, inventory, tasks

log = logging.getLogger("eucora.bridge.routes")

Conn = psycopg.AsyncConnection[Any]
Handler = Callable[[Conn, Inbound], Awaitable[None]]
M = TypeVar("M")

# Stored by the store itself, batched.
BULK: frozenset[Kind] = frozenset({Kind.TELEMETRY, Kind.HEARTBEAT})


class Rejected(Exception):
    """A valid message that cannot be applied: dead-lettered with `reason`."""

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


def _model(item: Inbound, cls: type[M]) -> tuple[str, M]:
    assert item.agent_id is not None and isinstance(item.model, cls)
    return item.agent_id, item.model


async def on_status(conn: Conn, item: Inbound) -> None:
    agent_id, msg = _model(item, Status)
    changed = await agents.apply_status(conn, agent_id, msg)
    # session_present false: the broker lost the agent's queue (session expired,
    # broker restarted without its store, never connected before). Absent (an agent
    # that does not say) is treated alike: a duplicate is harmless, a lost task is not.
    if changed and msg.state is AgentState.ONLINE and msg.session_present is not True:
        n = await tasks.owe_again(conn, agent_id)
        if n:
            log.info(
                "republishing tasks to an agent without its session",
                extra={"agent_id": agent_id, "tasks": n},
            )


async def on_register(conn: Conn, item: Inbound) -> None:
    await agents.apply_registration(conn, *_model(item, Register))


async def on_inventory(conn: Conn, item: Inbound) -> None:
    await inventory.apply_inventory(conn, *_model(item, Inventory))


async def on_task_status(conn: Conn, item: Inbound) -> None:
    agent_id, report = _model(item, TaskStatusReport)
    try:
        outcome = await tasks.apply_report(conn, agent_id, report)
    except tasks.UnknownTask as exc:
        raise Rejected(DeadLetterReason.UNKNOWN_TASK, str(exc)) from None
    if outcome.deployment_id is not None and outcome.status in TERMINAL:
        await deployments.notify(conn)  # its deployment may start the next agent now


async def on_deployment_status(conn: Conn, item: Inbound) -> None:
    agent_id, report = _model(item, DeploymentStatusReport)
    try:
        await deployments.apply_report(conn, agent_id, report)
    except deployments.UnknownDeployment as exc:
        raise Rejected(DeadLetterReason.UNKNOWN_DEPLOYMENT, str(exc)) from None


def default_routes() -> Routes:
    return Routes(
        {
            Kind.STATUS: on_status,
            Kind.REGISTER: on_register,
            Kind.INVENTORY: on_inventory,
            Kind.TASK_STATUS: on_task_status,
            Kind.DEPLOYMENT_STATUS: on_deployment_status,
        }
    )
