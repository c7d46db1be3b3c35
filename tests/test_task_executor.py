"""The agent's task executor (agent/tasks.py), without a broker: messages in, reports out.

HEALTHCHECK and COLLECT run for real on this host; commands are real processes.
"""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.tasks import AllowList, TaskExecutor, report_document
from schemas.states import TaskStatus
from schemas.topics import Kind
from schemas.validate import dump, parse

AGENT = "agent-1"
PY = sys.executable


class Reports:
    """The report callback: keeps every report, validated as the bridge would."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.cond = threading.Condition()

    def __call__(self, doc: dict[str, Any]) -> None:
        parse(Kind.TASK_STATUS, AGENT, orjson.dumps(doc))  # raises if the bridge would refuse it
        with self.cond:
            self.items.append(doc)
            self.cond.notify_all()

    def of(self, task_id: str) -> list[dict[str, Any]]:
        with self.cond:
            return [d for d in self.items if d["task_id"] == task_id]

    def statuses(self, task_id: str) -> list[str]:
        return [d["status"] for d in self.of(task_id)]

    def wait(
        self, task_id: str, status: str, count: int = 1, timeout: float = 20
    ) -> dict[str, Any]:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.statuses(task_id).count(status) >= count, timeout)
        assert ok, f"no {status} x{count} for {task_id}: {self.statuses(task_id)}"
        return [d for d in self.of(task_id) if d["status"] == status][-1]


def task(
    type_: str = "HEALTHCHECK",
    payload: dict[str, Any] | None = None,
    *,
    task_id: str | None = None,
    expires_in: float = 3600,
    timeout: int = 60,
) -> tuple[str, bytes]:
    tid = task_id or str(uuid.uuid4())
    now = datetime.now(UTC)
    doc = {
        "task_id": tid,
        "type": type_,
        "payload": payload or {},
        "timeout_seconds": timeout,
        "expires_at": (now + timedelta(seconds=expires_in)).isoformat(),
        "correlation_id": "corr-1",
        "created_at": now.isoformat(),
        "attempt": 1,
    }
    return tid, orjson.dumps(doc)


def cancel(task_id: str) -> bytes:
    return orjson.dumps({"cancel": task_id})


@pytest.fixture
def make() -> Iterator[Callable[..., tuple[TaskExecutor, Reports]]]:
    made: list[TaskExecutor] = []

    def factory(**kwargs: Any) -> tuple[TaskExecutor, Reports]:
        reports = Reports()
        ex = TaskExecutor(reports, agent_id=AGENT, **kwargs)
        made.append(ex)
        return ex, reports

    yield factory
    for ex in made:
        ex.close(timeout=0)


def blocking_collector() -> tuple[Callable[[], Any], threading.Event, list[int]]:
    """A collector that runs until released, counting its runs."""
    release = threading.Event()
    runs: list[int] = []

    def collect() -> Any:
        runs.append(1)
        assert release.wait(20)
        return {"ok": True}

    return collect, release, runs


def test_healthcheck_runs_local_checks(make: Any) -> None:
    ex, reports = make()
    tid, msg = task("HEALTHCHECK", {"disk_max_percent": 100, "memory_max_percent": 100,
                                    "cpu_max_percent": 100})  # fmt: skip
    ex.handle(msg)
    done = reports.wait(tid, "COMPLETED")
    assert reports.statuses(tid) == ["ASSIGNED", "IN_PROGRESS", "COMPLETED"]
    checks = done["result"]["checks"]
    assert set(checks) == {"disk:/", "memory", "cpu"}
    assert all(c["ok"] for c in checks.values())
    assert 0 <= checks["memory"]["percent"] <= 100
    assert done["correlation_id"] == "corr-1" and done["progress"] == 100


def test_failed_healthcheck_names_the_failing_check(make: Any) -> None:
    ex, reports = make()
    tid, msg = task("HEALTHCHECK", {"disk_max_percent": 0, "paths": ["/", "/no/such/mount"]})
    ex.handle(msg)
    failed = reports.wait(tid, "FAILED")
    assert failed["result"]["healthy"] is False
    assert "disk:/no/such/mount" in failed["error"]
    assert failed["result"]["checks"]["disk:/no/such/mount"]["ok"] is False


def test_healthcheck_with_bad_thresholds_is_rejected(make: Any) -> None:
    ex, reports = make()
    tid, msg = task("HEALTHCHECK", {"disk_max_percent": "90"})
    ex.handle(msg)
    assert reports.wait(tid, "REJECTED")["error"] == "disk_max_percent must be a number of percent"
    assert reports.statuses(tid) == ["REJECTED"]


def test_collect_takes_a_real_snapshot(make: Any) -> None:
    ex, reports = make(collectors={"inventory": lambda: [{"name": "curl", "version": "8"}]})
    tid, msg = task("COLLECT", {"what": ["telemetry", "inventory"]})
    ex.handle(msg)
    result = reports.wait(tid, "COMPLETED")["result"]
    assert result["inventory"] == [{"name": "curl", "version": "8"}]
    telemetry = result["telemetry"]
    assert 0 <= telemetry["memory_percent"] <= 100 and telemetry["net_rx_bytes"] >= 0


def test_collect_of_an_unknown_collector_is_rejected(make: Any) -> None:
    ex, reports = make()
    tid, msg = task("COLLECT", {"what": ["secrets"]})
    ex.handle(msg)
    assert "unknown collector" in reports.wait(tid, "REJECTED")["error"]


def test_allowed_command_runs_and_reports_its_output(make: Any) -> None:
    allow = AllowList.of([[PY, "-c", "..."]])
    ex, reports = make(allow=allow)
    ok_id, ok = task("DEPLOY", {"command": [PY, "-c", "print('installed')"]})
    bad_id, bad = task("REMEDIATE", {"command": [PY, "-c", "import sys; sys.exit(3)"]})
    ex.handle(ok)
    ex.handle(bad)
    done = reports.wait(ok_id, "COMPLETED")
    assert done["result"]["exit_code"] == 0 and done["result"]["stdout"].strip() == "installed"
    failed = reports.wait(bad_id, "FAILED")
    assert failed["result"]["exit_code"] == 3 and failed["error"] == "exit status 3"


@pytest.mark.parametrize(
    "payload, why",
    [
        ({"command": ["rm", "-rf", "/tmp/x"]}, "not on this agent's allow-list"),
        ({}, "needs a declared command"),
        ({"command": "apt-get upgrade"}, "non-empty list of strings"),
        ({"command": []}, "non-empty list of strings"),
    ],
)
def test_commands_outside_the_allow_list_are_rejected(
    make: Any, tmp_path: Path, payload: dict[str, Any], why: str
) -> None:
    ex, reports = make(allow=AllowList.of([["apt-get", "install", "-y", "eucora-*"]]))
    tid, msg = task("UPDATE", payload)
    ex.handle(msg)
    assert why in reports.wait(tid, "REJECTED")["error"]
    assert reports.statuses(tid) == ["REJECTED"]


def test_allow_list_matching() -> None:
    allow = AllowList.of([["apt-get", "install", "-y", "eucora-*"], ["/opt/fix.sh", "..."]])
    assert allow.allows(["apt-get", "install", "-y", "eucora-agent"])
    assert not allow.allows(["apt-get", "install", "-y", "eucora-agent", "nginx"])
    assert not allow.allows(["apt-get", "install", "-y", "nginx"])
    assert not allow.allows(["apt-get", "install"])
    assert allow.allows(["/opt/fix.sh"]) and allow.allows(["/opt/fix.sh", "--all", "x"])
    assert not allow.allows(["/opt/fix.shx"])
    assert not AllowList().allows(["true"])


def test_allow_list_file(tmp_path: Path) -> None:
    path = tmp_path / "allow.json"
    path.write_text('{"commands": [["systemctl", "restart", "nginx"]]}')
    assert AllowList.load(path).allows(["systemctl", "restart", "nginx"])
    path.write_text('{"commands": "systemctl"}')
    with pytest.raises(ValueError, match="expected"):
        AllowList.load(path)


def test_expired_task_is_rejected_and_never_runs(make: Any, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ex, reports = make(allow=AllowList.of([[PY, "-c", "..."]]))
    tid, msg = task(
        "DEPLOY", {"command": [PY, "-c", f"open({str(marker)!r}, 'w')"]}, expires_in=-60
    )
    ex.handle(msg)
    rejected = reports.wait(tid, "REJECTED")
    assert rejected["error"].startswith("expired before start (expires_at ")
    assert reports.statuses(tid) == ["REJECTED"]
    ex.close()
    assert not marker.exists()


def test_task_that_expires_while_queued_is_not_started(make: Any) -> None:
    clock = [datetime.now(UTC).timestamp()]
    collect, release, runs = blocking_collector()
    ex, reports = make(max_running=1, collectors={"slow": collect}, clock=lambda: clock[0])
    first, msg1 = task("COLLECT", {"what": ["slow"]})
    second, msg2 = task("COLLECT", {"what": ["slow"]}, expires_in=30)
    ex.handle(msg1)
    reports.wait(first, "IN_PROGRESS")
    ex.handle(msg2)
    reports.wait(second, "ASSIGNED")
    clock[0] += 60  # the second one waits behind the first past its expires_at
    release.set()
    reports.wait(first, "COMPLETED")
    assert "expired before start" in reports.wait(second, "REJECTED")["error"]
    assert len(runs) == 1


def test_a_task_delivered_twice_runs_once_and_is_reported_again(make: Any) -> None:
    runs: list[int] = []
    ex, reports = make(collectors={"count": lambda: runs.append(1) or len(runs)})
    tid, msg = task("COLLECT", {"what": ["count"]})
    ex.handle(msg)
    reports.wait(tid, "COMPLETED")
    ex.handle(msg)  # a QoS 1 redelivery, or a republish by the bridge
    again = reports.wait(tid, "COMPLETED", count=2)
    assert runs == [1]
    assert again["result"] == {"count": 1}


def test_a_restarted_agent_does_not_run_a_task_twice(make: Any, tmp_path: Path) -> None:
    state = tmp_path / "tasks.json"
    runs: list[int] = []
    collectors = {"count": lambda: runs.append(1) or len(runs)}
    ex1, reports1 = make(state_file=state, collectors=collectors)
    tid, msg = task("COLLECT", {"what": ["count"]})
    ex1.handle(msg)
    reports1.wait(tid, "COMPLETED")
    ex1.close()
    ex2, reports2 = make(state_file=state, collectors=collectors)
    assert ex2.status_of(tid) == "COMPLETED"
    ex2.handle(msg)
    assert reports2.wait(tid, "COMPLETED")["result"] == {"count": 1}
    assert runs == [1]


def test_recover_fails_interrupted_tasks_and_starts_queued_ones(make: Any, tmp_path: Path) -> None:
    state = tmp_path / "tasks.json"
    interrupted = str(uuid.uuid4())
    queued, queued_msg = task("COLLECT", {"what": ["telemetry"]})
    message = orjson.loads(queued_msg)
    records = {
        interrupted: {"state": "running", "status": "IN_PROGRESS"},
        queued: {
            "state": "queued",
            "status": "ASSIGNED",
            "message": orjson.dumps(message).decode(),
        },
    }
    state.write_bytes(orjson.dumps({"version": 1, "tasks": records}))
    ex, reports = make(state_file=state)
    assert ex.recover() == 2
    assert "restarted" in reports.wait(interrupted, "FAILED")["error"]
    reports.wait(queued, "COMPLETED")
    assert reports.statuses(queued) == ["IN_PROGRESS", "COMPLETED"]


def test_a_corrupt_state_file_is_set_aside(make: Any, tmp_path: Path) -> None:
    state = tmp_path / "tasks.json"
    state.write_text("{not json")
    ex, reports = make(state_file=state)
    assert len(ex) == 0
    assert (tmp_path / "tasks.corrupt").exists()
    tid, msg = task("HEALTHCHECK", {"cpu_max_percent": 100, "memory_max_percent": 100,
                                    "disk_max_percent": 100})  # fmt: skip
    ex.handle(msg)
    reports.wait(tid, "COMPLETED")
    assert tid in orjson.loads(state.read_bytes())["tasks"]


def test_cancel_stops_a_running_command(make: Any) -> None:
    ex, reports = make(allow=AllowList.of([[PY, "-c", "..."]]))
    tid, msg = task("DEPLOY", {"command": [PY, "-c", "import time; time.sleep(60)"]})
    ex.handle(msg)
    reports.wait(tid, "IN_PROGRESS")
    ex.handle(cancel(tid))
    failed = reports.wait(tid, "FAILED", timeout=15)
    assert failed["error"] == "cancelled"
    assert failed["result"]["exit_code"] != 0


def test_cancel_of_a_queued_task_means_it_never_starts(make: Any) -> None:
    collect, release, runs = blocking_collector()
    ex, reports = make(max_running=1, collectors={"slow": collect})
    first, msg1 = task("COLLECT", {"what": ["slow"]})
    second, msg2 = task("COLLECT", {"what": ["slow"]})
    ex.handle(msg1)
    reports.wait(first, "IN_PROGRESS")
    ex.handle(msg2)
    ex.handle(cancel(second))
    release.set()
    assert reports.wait(second, "REJECTED")["error"] == "cancelled before start"
    assert len(runs) == 1


def test_a_cancel_that_overtakes_its_task_keeps_it_from_running(make: Any) -> None:
    runs: list[int] = []
    ex, reports = make(collectors={"count": lambda: runs.append(1)})
    tid, msg = task("COLLECT", {"what": ["count"]})
    ex.handle(cancel(tid))
    ex.handle(msg)
    assert reports.wait(tid, "REJECTED")["error"] == "cancelled before start"
    assert runs == []


def test_a_command_is_killed_at_the_task_timeout(make: Any) -> None:
    ex, reports = make(allow=AllowList.of([[PY, "-c", "..."]]))
    tid, msg = task("REMEDIATE", {"command": [PY, "-c", "import time; time.sleep(60)"]}, timeout=1)
    ex.handle(msg)
    assert reports.wait(tid, "FAILED", timeout=15)["error"] == "timed out after 1 s"


def test_memory_of_seen_tasks_is_bounded(make: Any, tmp_path: Path) -> None:
    ex, _ = make(max_remembered=5, state_file=tmp_path / "s.json")
    ids = []
    for _ in range(12):
        tid, msg = task("COLLECT", {"what": ["nothing"]})  # rejected at once: unknown collector
        ex.handle(msg)
        ids.append(tid)
    assert len(ex) == 5
    assert len(orjson.loads((tmp_path / "s.json").read_bytes())["tasks"]) == 5
    assert ex.status_of(ids[-1]) == "REJECTED" and ex.status_of(ids[0]) is None


def test_invalid_messages(make: Any) -> None:
    ex, reports = make()
    tid = str(uuid.uuid4())
    ex.handle(orjson.dumps({"task_id": tid, "type": "REBOOT"}))
    assert reports.wait(tid, "REJECTED")["error"].startswith("invalid task: schema")
    ex.handle(b"not json")
    ex.handle(orjson.dumps({"cancel": "not-a-uuid"}))
    assert len(reports.items) == 1


def test_an_oversized_result_is_replaced_by_a_note() -> None:
    doc = report_document(str(uuid.uuid4()), TaskStatus.COMPLETED, result="x" * 300_000)
    assert doc["result"]["truncated"] is True
    dump(parse(Kind.TASK_STATUS, AGENT, orjson.dumps(doc)))
