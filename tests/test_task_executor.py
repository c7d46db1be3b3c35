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
    # The task schema (task-payload-healthcheck) refuses it before the executor looks.
    error = reports.wait(tid, "REJECTED")["error"]
    assert "a HEALTHCHECK task's payload.disk_max_percent: Input should be a valid number" in error
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
        ({}, "an UPDATE task's payload.command: Field required"),
        ({"command": "apt-get upgrade"}, "an UPDATE task's payload.command: Input should be"),
        ({"command": []}, "an UPDATE task's payload.command: List should have at least 1"),
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


# --- DEPLOY tasks of a deployment ---------------------------------------------------


class Timeline:
    """Task-status and deployment-status reports in the order the executor made them,
    each validated as the bridge would."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()

    def task(self, doc: dict[str, Any]) -> None:
        self._add(Kind.TASK_STATUS, doc)

    def deployment(self, doc: dict[str, Any]) -> None:
        self._add(Kind.DEPLOYMENT_STATUS, doc)

    def _add(self, kind: Kind, doc: dict[str, Any]) -> None:
        parse(kind, AGENT, orjson.dumps(doc))
        with self.cond:
            self.items.append((kind.value, doc))
            self.cond.notify_all()

    def steps(self) -> list[str]:
        """e.g. ["task ASSIGNED", "deployment PENDING", ...]."""
        with self.cond:
            return [f"{k.split('-')[0]} {d['status']}" for k, d in self.items]

    def deployments(self) -> list[dict[str, Any]]:
        with self.cond:
            return [d for k, d in self.items if k == Kind.DEPLOYMENT_STATUS.value]

    def wait_for(self, step: str, count: int = 1, timeout: float = 20) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.steps().count(step) >= count, timeout)
        assert ok, f"no {step} x{count}: {self.steps()}"


@pytest.fixture
def deploying() -> Iterator[Callable[..., tuple[TaskExecutor, Timeline]]]:
    made: list[TaskExecutor] = []

    def factory(**kwargs: Any) -> tuple[TaskExecutor, Timeline]:
        timeline = Timeline()
        kwargs.setdefault("allow", AllowList.of([[PY, "-c", "..."]]))
        ex = TaskExecutor(
            timeline.task, report_deployment=timeline.deployment, agent_id=AGENT, **kwargs
        )
        made.append(ex)
        return ex, timeline

    yield factory
    for ex in made:
        ex.close(timeout=0)


def writes(path: Path, text: str) -> list[str]:
    """A command that appends a line to a file (to count its runs)."""
    return [PY, "-c", f"open({str(path)!r}, 'a').write({text + chr(10)!r})"]


def deploy(payload: dict[str, Any], deployment_id: str, **kw: Any) -> tuple[str, bytes]:
    return task("DEPLOY", payload | {"deployment_id": deployment_id}, **kw)


def test_a_deployment_task_reports_its_deployment_status(deploying: Any, tmp_path: Path) -> None:
    ex, timeline = deploying()
    did = str(uuid.uuid4())
    runs = tmp_path / "runs"
    _, msg = deploy({"command": writes(runs, "install"), "package": "demo"}, did)
    ex.handle(msg)
    timeline.wait_for("task COMPLETED")
    assert timeline.steps() == [
        "task ASSIGNED", "deployment PENDING", "task IN_PROGRESS", "deployment IN_PROGRESS",
        "deployment SUCCESS", "task COMPLETED",
    ]  # fmt: skip
    docs = timeline.deployments()
    assert {d["deployment_id"] for d in docs} == {did}
    assert [d["progress"] for d in docs] == [0, 0, 100]
    assert runs.read_text().splitlines() == ["install"]


def test_a_failed_deployment_command_reports_failed_with_the_error(deploying: Any) -> None:
    ex, timeline = deploying()
    _, msg = deploy({"command": [PY, "-c", "import sys; sys.exit(3)"]}, str(uuid.uuid4()))
    ex.handle(msg)
    timeline.wait_for("task FAILED")
    assert timeline.steps()[-2:] == ["deployment FAILED", "task FAILED"]
    assert timeline.deployments()[-1]["message"] == "exit status 3"


def test_a_rollback_runs_the_rollback_command_and_reports_rollback(
    deploying: Any, tmp_path: Path
) -> None:
    ex, timeline = deploying()
    runs = tmp_path / "runs"
    payload = {"command": writes(runs, "install"), "rollback_command": writes(runs, "undo"),
               "rollback": True}  # fmt: skip
    _, msg = deploy(payload, str(uuid.uuid4()))
    ex.handle(msg)
    timeline.wait_for("task COMPLETED")
    assert timeline.steps() == [
        "task ASSIGNED", "task IN_PROGRESS", "deployment ROLLBACK", "task COMPLETED",
    ]  # fmt: skip
    assert timeline.deployments()[0]["progress"] == 100
    assert runs.read_text().splitlines() == ["undo"]


def test_a_failed_rollback_reports_failed(deploying: Any) -> None:
    ex, timeline = deploying()
    payload = {"command": [PY, "-c", "pass"], "rollback": True,
               "rollback_command": [PY, "-c", "import sys; sys.exit(4)"]}  # fmt: skip
    ex.handle(deploy(payload, str(uuid.uuid4()))[1])
    timeline.wait_for("task FAILED")
    assert timeline.steps()[-2:] == ["deployment FAILED", "task FAILED"]
    assert timeline.deployments()[-1]["message"] == "exit status 4"


@pytest.mark.parametrize(
    "payload, why",
    [
        ({"command": [PY, "-c", "pass"]}, 'declares no "rollback_command"'),
        ({"command": [PY, "-c", "pass"], "rollback_command": ["rm", "-rf", "/x"]},
         "rollback_command not on this agent's allow-list"),
    ],
)  # fmt: skip
def test_a_rollback_without_an_allowed_rollback_command_is_rejected(
    deploying: Any, payload: dict[str, Any], why: str
) -> None:
    ex, timeline = deploying()
    did = str(uuid.uuid4())
    _, msg = deploy(payload | {"rollback": True}, did)
    ex.handle(msg)
    timeline.wait_for("task REJECTED")
    assert timeline.steps() == ["deployment FAILED", "task REJECTED"]
    (task_doc,) = [d for k, d in timeline.items if k == "task-status"]
    assert why in task_doc["error"]
    assert why in timeline.deployments()[0]["message"]


def test_a_rollback_command_of_the_wrong_type_is_an_invalid_task(deploying: Any) -> None:
    ex, timeline = deploying()
    payload = {"command": [PY, "-c", "pass"], "rollback_command": "undo.sh", "rollback": True}
    _, msg = deploy(payload, str(uuid.uuid4()))
    ex.handle(msg)
    timeline.wait_for("task REJECTED")
    assert timeline.steps() == ["task REJECTED"]
    assert "a DEPLOY task's payload.rollback_command" in timeline.items[0][1]["error"]


def test_a_refused_deployment_command_is_rejected_and_failed(deploying: Any) -> None:
    ex, timeline = deploying()
    _, msg = deploy({"command": ["rm", "-rf", "/x"]}, str(uuid.uuid4()))
    ex.handle(msg)
    timeline.wait_for("task REJECTED")
    assert timeline.steps() == ["deployment FAILED", "task REJECTED"]
    assert "not on this agent's allow-list" in timeline.deployments()[0]["message"]


def test_an_expired_deployment_task_says_nothing_on_deployment_status(
    deploying: Any, tmp_path: Path
) -> None:
    ex, timeline = deploying()
    runs = tmp_path / "runs"
    ex.handle(deploy({"command": writes(runs, "install")}, str(uuid.uuid4()), expires_in=-5)[1])
    timeline.wait_for("task REJECTED")
    assert timeline.steps() == ["task REJECTED"]
    ex.close()
    assert not runs.exists()


def test_a_bad_deployment_id_is_rejected(deploying: Any) -> None:
    ex, timeline = deploying()
    _, msg = deploy({"command": [PY, "-c", "pass"]}, "not-a-uuid")
    ex.handle(msg)
    timeline.wait_for("task REJECTED")
    assert timeline.steps() == ["task REJECTED"]
    assert (
        "a DEPLOY task's payload.deployment_id: Input should be a valid UUID"
        in (timeline.items[0][1]["error"])
    )


def test_a_deploy_without_a_deployment_is_a_plain_task(deploying: Any, tmp_path: Path) -> None:
    ex, timeline = deploying()
    runs = tmp_path / "runs"
    # "rollback" means something only in a deployment's task: the command runs.
    payload = {"command": writes(runs, "install"), "rollback_command": writes(runs, "undo"),
               "rollback": True}  # fmt: skip
    ex.handle(task("DEPLOY", payload)[1])
    timeline.wait_for("task COMPLETED")
    assert timeline.steps() == ["task ASSIGNED", "task IN_PROGRESS", "task COMPLETED"]
    assert runs.read_text().splitlines() == ["install"]


def test_a_deployment_task_delivered_again_runs_once_across_a_restart(
    deploying: Any, tmp_path: Path
) -> None:
    state = tmp_path / "tasks.json"
    runs = tmp_path / "runs"
    ex1, timeline1 = deploying(state_file=state)
    _, msg = deploy({"command": writes(runs, "install")}, str(uuid.uuid4()))
    ex1.handle(msg)
    timeline1.wait_for("task COMPLETED")
    success = timeline1.deployments()[-1]
    ex1.handle(msg)  # a redelivery: both reports again, nothing run
    timeline1.wait_for("task COMPLETED", count=2)
    assert timeline1.deployments()[-1] == success  # the same report, same ts: a repeat
    ex1.close()
    ex2, timeline2 = deploying(state_file=state)
    ex2.handle(msg)
    timeline2.wait_for("task COMPLETED")
    assert timeline2.steps() == ["deployment SUCCESS", "task COMPLETED"]
    assert timeline2.deployments() == [success]
    assert runs.read_text().splitlines() == ["install"]


def test_recover_fails_an_interrupted_deployment_task(deploying: Any, tmp_path: Path) -> None:
    state = tmp_path / "tasks.json"
    tid, did = str(uuid.uuid4()), str(uuid.uuid4())
    started = {"deployment_id": did, "status": "IN_PROGRESS", "progress": 0,
               "ts": datetime.now(UTC).isoformat()}  # fmt: skip
    records = {tid: {"state": "running", "status": "IN_PROGRESS", "deployment_id": did,
                     "deployment": started}}  # fmt: skip
    state.write_bytes(orjson.dumps({"version": 1, "tasks": records}))
    ex, timeline = deploying(state_file=state)
    assert ex.recover() == 1
    timeline.wait_for("task FAILED")
    assert timeline.steps() == ["deployment FAILED", "task FAILED"]
    assert "restarted" in timeline.deployments()[0]["message"]


def test_cancel_of_a_running_deployment_command_fails_the_deployment(deploying: Any) -> None:
    ex, timeline = deploying()
    tid, msg = deploy({"command": [PY, "-c", "import time; time.sleep(60)"]}, str(uuid.uuid4()))
    ex.handle(msg)
    timeline.wait_for("deployment IN_PROGRESS")
    ex.handle(cancel(tid))
    timeline.wait_for("task FAILED", timeout=15)
    assert timeline.steps()[-2:] == ["deployment FAILED", "task FAILED"]
    assert timeline.deployments()[-1]["message"] == "cancelled"
