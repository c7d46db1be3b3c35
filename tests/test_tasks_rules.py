"""The task rules as pure functions: how a report is judged, what the outbox sends."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from schemas.payloads import TaskCancel, TaskCommand
from schemas.states import TaskStatus
from schemas.topics import Kind
from schemas.validate import parse
from service.bridge.outbox import cancel_payload, command_payload
from service.domains.tasks import judge_report

S = TaskStatus


@pytest.mark.parametrize(
    "current, new, outcome",
    [
        (S.PENDING, S.ASSIGNED, "accepted"),
        (S.PENDING, S.COMPLETED, "accepted"),  # earlier reports lost: the outcome still counts
        (S.ASSIGNED, S.IN_PROGRESS, "accepted"),
        (S.ASSIGNED, S.REJECTED, "accepted"),
        (S.IN_PROGRESS, S.FAILED, "accepted"),
        (S.ASSIGNED, S.ASSIGNED, "duplicate"),
        (S.COMPLETED, S.COMPLETED, "duplicate"),
        (S.IN_PROGRESS, S.ASSIGNED, "out_of_order"),
        (S.COMPLETED, S.IN_PROGRESS, "after_terminal"),
        (S.CANCELLED, S.COMPLETED, "after_terminal"),
        (S.TIMEOUT, S.ASSIGNED, "after_terminal"),
        (S.IN_PROGRESS, S.REJECTED, "illegal"),  # too late to refuse what it started
    ],
)
def test_judge_report(current: TaskStatus, new: TaskStatus, outcome: str) -> None:
    verdict = judge_report(current, new)
    assert verdict.outcome == outcome
    assert verdict.applies == (outcome == "accepted")
    assert (verdict.reason is None) == (outcome == "accepted")


def test_progress_updates() -> None:
    assert judge_report(S.IN_PROGRESS, S.IN_PROGRESS, 10, 40).outcome == "progress"
    assert judge_report(S.IN_PROGRESS, S.IN_PROGRESS, None, 5).outcome == "progress"
    assert judge_report(S.IN_PROGRESS, S.IN_PROGRESS, 40, 40).outcome == "duplicate"
    assert judge_report(S.IN_PROGRESS, S.IN_PROGRESS, 40, None).outcome == "duplicate"
    late = judge_report(S.IN_PROGRESS, S.IN_PROGRESS, 40, 10)
    assert (late.outcome, late.reason) == ("out_of_order", "progress 10 after 40")


def test_command_and_cancel_payloads_follow_the_schema() -> None:
    task_id = uuid.uuid4()
    created = datetime(2026, 1, 1, tzinfo=UTC)
    row = {
        "task_id": task_id, "agent_id": "a", "type": "DEPLOY", "payload": {"command": ["true"]},
        "timeout_seconds": 900, "expires_at": created + timedelta(days=7),
        "correlation_id": "op-1", "created_at": created, "attempts": 2,
    }  # fmt: skip
    command = parse(Kind.TASKS, "a", command_payload(row))
    assert isinstance(command, TaskCommand)
    assert (command.task_id, command.attempt, command.correlation_id) == (task_id, 3, "op-1")
    assert command.expires_at == created + timedelta(days=7)
    cancel = parse(Kind.TASKS, "a", cancel_payload(row))
    assert isinstance(cancel, TaskCancel) and cancel.cancel == task_id
    assert cancel.model_extra is not None and cancel.model_extra["correlation_id"] == "op-1"


def test_an_invalid_row_cannot_become_a_message() -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    row = {
        "task_id": uuid.uuid4(), "type": "DEPLOY", "payload": {"command": ["x" * 4000] * 75},
        "timeout_seconds": 900, "expires_at": created, "correlation_id": "c",
        "created_at": created, "attempts": 0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="oversize"):
        command_payload(row)
