"""The agent's task executor: what an agent does with a message on its tasks topic.

Self-contained: give it the raw payload of each message (`handle`) and a `report`
callback that publishes a task-status payload (a dict; serialise it with orjson). The
rules (SPEC "Tasks"; docs/tasks.md):

- task_id is an idempotency key. Every task seen is remembered (bounded, and in a
  small JSON file when `state_file` is given, so a restarted agent does not run a
  task twice). A task seen again is not run again: its last report is sent again
  instead, in case the server missed it.
- expires_at is checked on arrival and again right before the task starts: an expired
  task is never started, and is reported REJECTED with error "expired before start
  (expires_at ...)" (the task schema's rule), so an operator sees why.
- Reports: ASSIGNED on receipt, IN_PROGRESS when it starts, then COMPLETED or FAILED;
  REJECTED instead when the agent cannot run it (expired, unknown type or collector,
  invalid parameters, a command not on the allow-list, cancelled before it started).
- HEALTHCHECK: local checks (disk, memory, CPU through psutil) against thresholds;
  FAILED when a check fails, with every check in the result.
- COLLECT: a snapshot of what the payload names ({"what": ["telemetry", "inventory"]},
  default telemetry), from the `collectors` given or psutil / agent.inventory.
- DEPLOY, REMEDIATE, UPDATE: only a declared command ({"command": ["argv", ...]}, never
  a shell) that the local allow-list permits; anything else is REJECTED. It runs with
  the task's timeout_seconds (then it is killed and FAILED); exit status 0 is
  COMPLETED, any other FAILED; the tail of its output is in the result.
- DEPLOY of a deployment (its payload carries "deployment_id", the rollout engine's):
  the same command, and the agent's own reports on the deployment-status topic
  through `report_deployment` besides the task's: PENDING when accepted, IN_PROGRESS
  (progress 0: a command does not say how far it got) when it starts, SUCCESS or
  FAILED (with the error as message) before the task's COMPLETED or FAILED. With
  "rollback": true it runs the payload's "rollback_command" instead (allow-listed too;
  REJECTED when absent or not allowed) and reports ROLLBACK, or FAILED. A refused
  deployment task is FAILED on deployment-status too; an expired or cancelled one is
  not reported there (it never started).
- `{"cancel": task_id}`: a queued task is never started (REJECTED "cancelled before
  start"), a running command is stopped (FAILED "cancelled"). The server has already
  marked the task CANCELLED, so it keeps these reports as history only.
- After a restart, `recover()` reports FAILED for tasks the previous process had
  started (it cannot know how far they got) and starts the ones it had only queued.

Threads: `handle` returns quickly (call it from the MQTT thread); tasks run on a small
pool of worker threads, and `report` is called from those threads too: hand it over
to your network loop (e.g. agent.loop.Loop.call_soon_threadsafe) if your client needs
that.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
import psutil

from agent import logs
from agent.protocol import Metrics
from schemas.payloads import DeploymentStatusReport, TaskCancel, TaskCommand, TaskStatusReport
from schemas.states import TERMINAL, DeploymentAgentStatus, TaskStatus, TaskType
from schemas.topics import Kind
from schemas.validate import PayloadError, dump, parse

log = logging.getLogger("eucora.agent.tasks")

Report = Callable[[dict[str, Any]], None]
Collector = Callable[[], Any]
_A = DeploymentAgentStatus

COMMAND_TYPES: Final = frozenset({TaskType.DEPLOY, TaskType.REMEDIATE, TaskType.UPDATE})
ANY_ARGS: Final = "..."  # last element of an allow-list entry: any further arguments
OUTPUT_TAIL: Final = 4096  # bytes of stdout/stderr kept in a command's result
ERROR_MAX: Final = 4000
MESSAGE_MAX: Final = 4096  # a deployment-status message (the schema's limit)
STOP_GRACE_S: Final = 5.0  # SIGTERM, then SIGKILL after this long
SMALL_RESULT: Final = 4096  # results up to this size are remembered for re-reports
HEALTH_DEFAULTS: Final = {"disk_max_percent": 90.0, "memory_max_percent": 90.0,
                          "cpu_max_percent": 95.0}  # fmt: skip
STATE_VERSION: Final = 1


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def disk_root() -> str:
    return os.environ.get("SYSTEMDRIVE", "C:") + "\\" if os.name == "nt" else "/"


class Reject(Exception):
    """The agent will not run this task (reported REJECTED with this error)."""


# --- the allow-list -----------------------------------------------------------------


@dataclass(frozen=True)
class AllowList:
    """Commands this agent may run for DEPLOY/REMEDIATE/UPDATE tasks.

    Each entry is an argv pattern; a command is allowed when it matches one entry
    element by element (fnmatch patterns: `eucora-*`, `[0-9]*`), with the same number
    of elements, except that a last element "..." matches any further arguments.
    E.g. ["apt-get", "install", "-y", "eucora-agent=*"] or ["/opt/fix/run.sh", "..."].
    The empty list (the default) allows nothing.
    """

    entries: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def of(cls, entries: Iterable[Sequence[str]]) -> AllowList:
        return cls(tuple(tuple(e) for e in entries if e))

    @classmethod
    def load(cls, path: str | Path) -> AllowList:
        """From a JSON file: {"commands": [["apt-get", "install", "-y", "..."], ...]}."""
        doc = orjson.loads(Path(path).read_bytes())
        commands = doc.get("commands") if isinstance(doc, dict) else None
        if not isinstance(commands, list) or not all(
            isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in commands
        ):
            raise ValueError(f"{path}: expected {{'commands': [[argv...], ...]}}")
        return cls.of(commands)

    def allows(self, argv: Sequence[str]) -> bool:
        return any(_matches(entry, argv) for entry in self.entries)


def _matches(entry: Sequence[str], argv: Sequence[str]) -> bool:
    if entry and entry[-1] == ANY_ARGS:
        fixed = entry[:-1]
        if len(argv) < len(fixed):
            return False
    else:
        fixed = entry
        if len(argv) != len(fixed):
            return False
    return all(fnmatch.fnmatchcase(a, p) for a, p in zip(argv, fixed, strict=False))


# --- deployments ---------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentRef:
    """The deployment a DEPLOY task belongs to, and whether it is the rollback task."""

    deployment_id: str
    rollback: bool = False


def deployment_of(task: TaskCommand) -> DeploymentRef | None:
    """The deployment of a DEPLOY task whose payload names one (None: a plain task).
    Raises Reject for a deployment_id that is not a UUID or a "rollback" not a boolean."""
    if task.type is not TaskType.DEPLOY or "deployment_id" not in task.payload:
        return None
    raw = task.payload["deployment_id"]
    try:
        deployment_id = str(uuid.UUID(raw)) if isinstance(raw, str) else None
    except ValueError:
        deployment_id = None
    if deployment_id is None:
        raise Reject("deployment_id must be a UUID")
    rollback = task.payload.get("rollback", False)
    if not isinstance(rollback, bool):
        raise Reject('"rollback" must be true or false')
    return DeploymentRef(deployment_id, rollback)


def deployment_document(
    deployment_id: str,
    status: DeploymentAgentStatus,
    *,
    progress: float = 0,
    message: str | None = None,
) -> dict[str, Any]:
    """A deployment-status payload, checked against the schema."""
    doc: dict[str, Any] = {
        "deployment_id": deployment_id,
        "status": status.value,
        "progress": progress,
        "ts": now(),
    }
    if message is not None:
        doc["message"] = message[:MESSAGE_MAX]
    dump(DeploymentStatusReport.model_validate(doc, strict=False))
    return doc


# --- what the executor remembers ----------------------------------------------------


@dataclass
class Record:
    # queued: accepted, not started; running: started; done: final report sent
    state: str
    status: str  # the last status reported
    correlation_id: str | None = None
    error: str | None = None
    result: Any = None
    progress: float | None = None
    message: str | None = None  # the task message, kept while queued (for recover())
    live: bool = True  # False: loaded from the state file, not run by this process
    cancelled: bool = False
    deployment_id: str | None = None  # a deployment's DEPLOY task
    rollback: bool = False  # ... its rollback task
    deployment: dict[str, Any] | None = None  # the last deployment-status report sent
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"state": self.state, "status": self.status}
        for name in ("correlation_id", "error", "progress", "message", "deployment_id"):
            if getattr(self, name) is not None:
                doc[name] = getattr(self, name)
        if self.result is not None:
            doc["result"] = self.result
        if self.cancelled:
            doc["cancelled"] = True
        if self.rollback:
            doc["rollback"] = True
        if self.deployment is not None:
            doc["deployment"] = self.deployment
        return doc

    def deployment_report(
        self,
        status: DeploymentAgentStatus,
        *,
        progress: float | None = None,
        message: str | None = None,
    ) -> dict[str, Any] | None:
        """Make (and keep as the last) the deployment-status report of this task;
        None for a plain task. Progress: the last one reported unless given."""
        if self.deployment_id is None:
            return None
        if progress is None:
            progress = self.deployment["progress"] if self.deployment is not None else 0
        self.deployment = deployment_document(
            self.deployment_id, status, progress=progress, message=message
        )
        return self.deployment

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Record:
        return cls(
            state=str(doc["state"]),
            status=str(doc["status"]),
            correlation_id=doc.get("correlation_id"),
            error=doc.get("error"),
            result=doc.get("result"),
            progress=doc.get("progress"),
            message=doc.get("message"),
            live=False,
            cancelled=bool(doc.get("cancelled", False)),
            deployment_id=doc.get("deployment_id"),
            rollback=bool(doc.get("rollback", False)),
            deployment=doc.get("deployment"),
        )


class TaskExecutor:
    def __init__(
        self,
        report: Report,
        *,
        agent_id: str,
        allow: AllowList | None = None,
        state_file: str | Path | None = None,
        max_remembered: int = 10_000,
        max_running: int = 4,
        collectors: Mapping[str, Collector] | None = None,
        clock: Callable[[], float] = time.time,
        report_deployment: Report | None = None,
    ) -> None:
        self.report = report
        # Deployment-status payloads (dicts) of a deployment's DEPLOY tasks go here.
        self.report_deployment = report_deployment
        self.agent_id = agent_id
        self.allow = allow or AllowList()
        self.state_file = Path(state_file) if state_file is not None else None
        self.max_remembered = max(max_remembered, 1)
        self.collectors: dict[str, Collector] = {
            "telemetry": telemetry_snapshot,
            "inventory": inventory_snapshot,
            **(collectors or {}),
        }
        self.clock = clock
        self._lock = threading.RLock()
        self._records: OrderedDict[str, Record] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="eucora-task")
        self._closing = False
        self._load()
        psutil.cpu_percent(interval=None)  # primes the counter the health check reads

    # --- incoming messages ---------------------------------------------------------
    def handle(self, payload: bytes | bytearray) -> None:
        """One message from the tasks topic: a task, or {"cancel": task_id}."""
        try:
            msg = parse(Kind.TASKS, self.agent_id, payload)
        except PayloadError as exc:
            self._invalid(payload, exc)
            return
        if isinstance(msg, TaskCancel):
            self.cancel(str(msg.cancel))
        else:
            self._accept(msg)

    def _invalid(self, payload: bytes | bytearray, exc: PayloadError) -> None:
        # A task this agent does not understand (a newer server's type, a bad field):
        # say so when the task id can be read, otherwise only log it.
        task_id: str | None = None
        with contextlib.suppress(Exception):
            doc = orjson.loads(payload)
            task_id = str(uuid.UUID(str(doc["task_id"])))
        log.warning("invalid task message", extra={"task_id": task_id, "error": str(exc)})
        if task_id is None:
            return
        with self._lock:
            if task_id in self._records:
                return
            self._remember(task_id, Record("done", "REJECTED", error=f"invalid task: {exc}"))
        self._send(task_id, TaskStatus.REJECTED, error=f"invalid task: {exc}")

    def _accept(self, task: TaskCommand) -> None:
        with logs.context(**self._log_fields(task)):
            log.info("task received", extra={"type": task.type.value, "attempt": task.attempt})
            self._accept_in_context(task)

    def _log_fields(self, task: TaskCommand) -> dict[str, Any]:
        """The ids every log line about this task carries (SPEC "Logs")."""
        deployment = task.payload.get("deployment_id")
        return {
            "agent_id": self.agent_id,
            "task_id": task.task_id,
            "correlation_id": task.correlation_id,
            "deployment_id": deployment if isinstance(deployment, str) else None,
        }

    def _accept_in_context(self, task: TaskCommand) -> None:
        task_id = str(task.task_id)
        rejection: str | None = None
        deployment: dict[str, Any] | None = None
        with self._lock:
            known = self._records.get(task_id)
            # A task queued by a previous process (not started) is run now; anything
            # else seen before is a duplicate.
            duplicate = known is not None and not (known.state == "queued" and not known.live)
            if not duplicate:
                ref: DeploymentRef | None = None
                try:
                    ref = deployment_of(task)
                except Reject as exc:
                    rejection = str(exc)
                else:
                    rejection = self._precheck(task)
                record = Record("queued", "ASSIGNED", task.correlation_id,
                                message=task.model_dump_json())  # fmt: skip
                if ref is not None:
                    record.deployment_id, record.rollback = ref.deployment_id, ref.rollback
                if rejection is not None:
                    record.state, record.status, record.message = "done", "REJECTED", None
                    record.error = rejection
                    # Refused: the deployment failed here. Expired: it never started
                    # (nothing to say on deployment-status).
                    if not self._expired(task):
                        deployment = record.deployment_report(_A.FAILED, message=rejection)
                elif not record.rollback:
                    deployment = record.deployment_report(_A.PENDING)
                self._remember(task_id, record)
        if duplicate:
            self._resend(task_id)
            return
        if rejection is not None:
            self._send_deployment(task_id, deployment)
            self._send(task_id, TaskStatus.REJECTED, error=rejection, corr=task.correlation_id)
            return
        self._send(task_id, TaskStatus.ASSIGNED, corr=task.correlation_id)
        self._send_deployment(task_id, deployment)
        self._pool.submit(self._run, task)

    def _precheck(self, task: TaskCommand) -> str | None:
        """Why the task cannot run at all (None: it can)."""
        if self._expired(task):
            return f"expired before start (expires_at {task.expires_at.isoformat()})"
        try:
            if task.type in COMMAND_TYPES:
                self._command(task)
            elif task.type is TaskType.HEALTHCHECK:
                health_thresholds(task.payload)
            elif task.type is TaskType.COLLECT:
                self._what(task.payload)
            else:
                raise Reject(f"unsupported task type {task.type.value}")
        except Reject as exc:
            return str(exc)
        return None

    def _expired(self, task: TaskCommand) -> bool:
        return task.expires_at.timestamp() <= self.clock()

    def cancel(self, task_id: str) -> None:
        """Never start it if queued, stop it if running; remember it if not seen yet
        (the cancel overtook the task)."""
        process = None
        with self._lock:
            record = self._records.get(task_id)
            if record is None:
                self._remember(task_id, Record("done", "REJECTED", error="cancelled before start",
                                               cancelled=True))  # fmt: skip
                return
            if record.state == "done":
                return
            record.cancelled = True
            process = record.process
            self._save()
        if process is not None:
            # Not on the caller's (MQTT) thread: stopping may take the grace period.
            threading.Thread(target=_stop, args=(process,), daemon=True).start()

    # --- running -------------------------------------------------------------------
    def _run(self, task: TaskCommand) -> None:
        with logs.context(**self._log_fields(task)):  # a pool thread: a context of its own
            self._run_in_context(task)

    def _run_in_context(self, task: TaskCommand) -> None:
        task_id = str(task.task_id)
        corr = task.correlation_id
        with self._lock:
            record = self._records.get(task_id)
            if record is None or record.state != "queued":
                return
            why = None
            if record.cancelled:
                why = "cancelled before start"
            elif self._expired(task):  # it waited behind other tasks
                why = f"expired before start (expires_at {task.expires_at.isoformat()})"
            elif self._closing:
                return  # stays queued: recover() starts it after a restart
            started: dict[str, Any] | None = None
            if why is None:
                record.state, record.status, record.message = "running", "IN_PROGRESS", None
                if not record.rollback:
                    started = record.deployment_report(_A.IN_PROGRESS)
            else:
                record.state, record.status, record.error = "done", "REJECTED", why
            self._save()
        if why is not None:
            self._send(task_id, TaskStatus.REJECTED, error=why, corr=corr)
            return
        self._send(task_id, TaskStatus.IN_PROGRESS, progress=0, corr=corr)
        self._send_deployment(task_id, started)
        try:
            status, result, error = self._execute(task, record)
        except Reject as exc:  # only from the pre-checks, which passed: kept for safety
            status, result, error = TaskStatus.FAILED, None, str(exc)
        except Exception as exc:
            log.exception("task failed unexpectedly", extra={"task_id": task_id})
            status, result, error = TaskStatus.FAILED, None, f"agent error: {exc}"
        with self._lock:
            if record.cancelled and status is not TaskStatus.COMPLETED:
                status, error = TaskStatus.FAILED, "cancelled"  # what stopped it
            record.process = None
            record.state, record.status, record.error = "done", status.value, error
            record.result = result if _small(result) else None
            record.progress = 100 if status is TaskStatus.COMPLETED else record.progress
            if status is TaskStatus.COMPLETED:
                done = _A.ROLLBACK if record.rollback else _A.SUCCESS
                outcome = record.deployment_report(done, progress=100)
            else:
                outcome = record.deployment_report(_A.FAILED, message=error)
            self._save()
        # The deployment's outcome first, then the task's (what the server derives
        # from the task then agrees with what the agent said).
        self._send_deployment(task_id, outcome)
        self._send(task_id, status, result=result, error=error, corr=corr,
                   progress=100 if status is TaskStatus.COMPLETED else None)  # fmt: skip

    def _execute(self, task: TaskCommand, record: Record) -> tuple[TaskStatus, Any, str | None]:
        if task.type is TaskType.HEALTHCHECK:
            return healthcheck(task.payload)
        if task.type is TaskType.COLLECT:
            result = {name: self.collectors[name]() for name in self._what(task.payload)}
            return TaskStatus.COMPLETED, result, None
        return self._run_command(self._command(task), task.timeout_seconds, record)

    def _command(self, task: TaskCommand) -> list[str]:
        """The argv to run: the payload's "command", or "rollback_command" for a
        deployment's rollback task; it must be on the allow-list."""
        ref = deployment_of(task)
        key = "rollback_command" if ref is not None and ref.rollback else "command"
        argv = task.payload.get(key)
        if argv is None:
            if key == "rollback_command":
                raise Reject(
                    'cannot roll back: the deployment\'s payload declares no "rollback_command"'
                )
            raise Reject(f'{task.type.value} needs a declared command: {{"command": [...]}}')
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) and "\x00" not in a for a in argv)
        ):
            raise Reject(f"{key} must be a non-empty list of strings (argv, no shell)")
        if not self.allow.allows(argv):
            raise Reject(f"{key} not on this agent's allow-list: {argv!r}"[:ERROR_MAX])
        return argv

    def _what(self, payload: Mapping[str, Any]) -> list[str]:
        what = payload.get("what", ["telemetry"])
        if isinstance(what, str):
            what = [what]
        if not isinstance(what, list) or not all(isinstance(w, str) for w in what):
            raise Reject('"what" must be a list of names, e.g. ["telemetry", "inventory"]')
        unknown = [w for w in what if w not in self.collectors]
        if unknown:
            raise Reject(f"unknown collector(s) {unknown}; known: {sorted(self.collectors)}")
        return what

    def _run_command(
        self, argv: list[str], timeout: float, record: Record
    ) -> tuple[TaskStatus, Any, str | None]:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=os.name != "nt",  # its own group: stopped as a whole
                )
            except OSError as exc:
                return TaskStatus.FAILED, None, f"cannot run {argv[0]!r}: {exc.strerror or exc}"
            with self._lock:
                record.process = process
                cancelled = record.cancelled
            if cancelled:
                _stop(process)
            timed_out = False
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _stop(process)
                code = process.wait()
            result = {"exit_code": code, "stdout": _tail(out), "stderr": _tail(err)}
        if timed_out:
            return TaskStatus.FAILED, result, f"timed out after {timeout:g} s"
        if code != 0:
            return TaskStatus.FAILED, result, f"exit status {code}"
        return TaskStatus.COMPLETED, result, None

    # --- reports -------------------------------------------------------------------
    def _send(
        self,
        task_id: str,
        status: TaskStatus,
        *,
        progress: float | None = None,
        result: Any = None,
        error: str | None = None,
        corr: str | None = None,
    ) -> None:
        doc = report_document(task_id, status, progress=progress, result=result, error=error,
                              correlation_id=corr)  # fmt: skip
        # The outcome at INFO, the steps before it at DEBUG; the ids also outside a
        # context (a repeat of an old report, an invalid task).
        with self._lock:
            record = self._records.get(task_id)
        ids = {"agent_id": self.agent_id, "task_id": task_id,
               "correlation_id": corr or (record.correlation_id if record else None),
               "deployment_id": record.deployment_id if record else None}  # fmt: skip
        log.log(
            logging.INFO if status in TERMINAL else logging.DEBUG,
            "task report",
            extra={**{k: v for k, v in ids.items() if v is not None}, "status": status.value},
        )
        try:
            self.report(doc)
        except Exception:
            # The next delivery of this task (a duplicate) sends the report again.
            log.exception("reporting a task status failed", extra={"task_id": task_id})

    def _send_deployment(self, task_id: str, doc: dict[str, Any] | None) -> None:
        if doc is None or self.report_deployment is None:
            return
        try:
            self.report_deployment(doc)
        except Exception:
            ids = {"task_id": task_id, "deployment_id": doc["deployment_id"]}
            log.exception("reporting a deployment status failed", extra=ids)

    def _resend(self, task_id: str) -> None:
        """A task seen before: say again where it stands (the report may have been lost);
        a task a previous process had started is FAILED, as recover() would say."""
        with self._lock:
            record = self._records.get(task_id)
            if record is None:
                return
            if record.state == "running" and not record.live:
                self._interrupted(record)
            status, error, result = TaskStatus(record.status), record.error, record.result
            progress, corr = record.progress, record.correlation_id
            # Sent again as it was (same ts): the server takes it for the repeat it is.
            deployment = record.deployment
        self._send_deployment(task_id, deployment)
        self._send(task_id, status, progress=progress, result=result, error=error, corr=corr)

    def _interrupted(self, record: Record) -> None:
        record.state, record.status = "done", "FAILED"
        record.error = "interrupted: the agent restarted while the task ran"
        record.deployment_report(_A.FAILED, message=record.error)
        self._save()

    def recover(self) -> int:
        """After a restart: FAILED for the tasks the previous process had started, and
        start the ones it had only queued. Call once connected; returns how many."""
        again: list[TaskCommand] = []
        failed: list[tuple[str, Record]] = []
        with self._lock:
            for task_id, record in self._records.items():
                if record.live:
                    continue
                if record.state == "running":
                    self._interrupted(record)
                    failed.append((task_id, record))
                elif record.state == "queued" and record.message is not None:
                    try:
                        again.append(TaskCommand.model_validate_json(record.message))
                    except ValueError:
                        record.state, record.status = "done", "FAILED"
                        record.error = "interrupted: the agent restarted before it started"
                        record.deployment_report(_A.FAILED, message=record.error)
                        failed.append((task_id, record))
                    else:
                        record.live = True
            self._save()
        for task_id, record in failed:
            self._send_deployment(task_id, record.deployment)
            self._send(task_id, TaskStatus.FAILED, error=record.error, corr=record.correlation_id)
        for task in again:
            self._pool.submit(self._run, task)
        return len(failed) + len(again)

    # --- memory --------------------------------------------------------------------
    def _remember(self, task_id: str, record: Record) -> None:
        self._records[task_id] = record
        self._records.move_to_end(task_id)
        excess = len(self._records) - self.max_remembered
        if excess > 0:
            # Forget the oldest finished tasks; one still queued or running is kept.
            for old in [k for k, r in self._records.items() if r.state == "done"][:excess]:
                del self._records[old]
        self._save()

    def _load(self) -> None:
        if self.state_file is None:
            return
        try:
            doc = orjson.loads(self.state_file.read_bytes())
            tasks = doc["tasks"] if doc.get("version") == STATE_VERSION else {}
            for task_id, rec in tasks.items():
                self._records[task_id] = Record.from_json(rec)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Starting with an empty memory is the lesser evil than not starting; the
            # bad file is kept aside for a human.
            log.error("task state file unreadable; starting empty",
                      extra={"file": str(self.state_file), "error": str(exc)})  # fmt: skip
            with contextlib.suppress(OSError):
                self.state_file.replace(self.state_file.with_suffix(".corrupt"))

    def _save(self) -> None:
        if self.state_file is None:
            return
        doc = {
            "version": STATE_VERSION,
            "tasks": {k: r.to_json() for k, r in self._records.items()},
        }
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)  # atomic: a crash leaves the old or the new file

    def status_of(self, task_id: str) -> str | None:
        """The last status reported for a task (None: never seen)."""
        with self._lock:
            record = self._records.get(task_id)
            return record.status if record is not None else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking tasks; wait up to `timeout` for running ones, then stop them.
        Queued tasks stay queued in the state file for recover()."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                running = [r for r in self._records.values() if r.state == "running" and r.live]
            if not running:
                break
            time.sleep(0.05)
        with self._lock:
            processes = [r.process for r in self._records.values() if r.process is not None]
        for p in processes:
            _stop(p)
        self._pool.shutdown(wait=True, cancel_futures=True)


# --- helpers ---------------------------------------------------------------------------


def report_document(
    task_id: str,
    status: TaskStatus,
    *,
    progress: float | None = None,
    result: Any = None,
    error: str | None = None,
    correlation_id: str | None = None,
) -> dict[str, Any]:
    """A task-status payload, checked against the schema and its size limit (an
    oversized result is replaced by a note saying so)."""
    doc: dict[str, Any] = {"task_id": task_id, "status": status.value, "ts": now()}
    if progress is not None:
        doc["progress"] = progress
    if result is not None:
        doc["result"] = result
    if error is not None:
        doc["error"] = error[:ERROR_MAX]
    if correlation_id is not None:
        doc["correlation_id"] = correlation_id
    try:
        dump(TaskStatusReport.model_validate(doc, strict=False))
    except PayloadError as exc:
        doc["result"] = {"truncated": True, "why": exc.detail}
    return doc


def health_thresholds(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The thresholds and disk paths of a HEALTHCHECK (defaults: HEALTH_DEFAULTS, /)."""
    limits: dict[str, Any] = dict(HEALTH_DEFAULTS)
    for key in HEALTH_DEFAULTS:
        if key in payload:
            value = payload[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Reject(f"{key} must be a number of percent")
            if not 0 <= value <= 100:
                raise Reject(f"{key} must be between 0 and 100")
            limits[key] = float(value)
    paths = payload.get("paths", [disk_root()])
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise Reject('"paths" must be a non-empty list of mount points')
    limits["paths"] = paths
    return limits


def healthcheck(payload: Mapping[str, Any]) -> tuple[TaskStatus, Any, str | None]:
    limits = health_thresholds(payload)
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, value: float, limit: float) -> None:
        checks[name] = {"percent": round(value, 1), "max_percent": limit, "ok": value <= limit}

    for path in limits["paths"]:
        try:
            check(f"disk:{path}", psutil.disk_usage(path).percent, limits["disk_max_percent"])
        except OSError as exc:
            checks[f"disk:{path}"] = {"ok": False, "error": exc.strerror or str(exc)}
    check("memory", psutil.virtual_memory().percent, limits["memory_max_percent"])
    check("cpu", psutil.cpu_percent(interval=None), limits["cpu_max_percent"])
    failed = [name for name, c in checks.items() if not c["ok"]]
    result = {"healthy": not failed, "checks": checks}
    if hasattr(os, "getloadavg"):
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if failed:
        return TaskStatus.FAILED, result, "unhealthy: " + ", ".join(failed)
    return TaskStatus.COMPLETED, result, None


def telemetry_snapshot() -> dict[str, Any]:
    net = psutil.net_io_counters()
    reading = Metrics(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
        disk_percent=psutil.disk_usage(disk_root()).percent,
        net_rx_bytes=net.bytes_recv if net else 0,  # counters since boot, not rates
        net_tx_bytes=net.bytes_sent if net else 0,
    )
    return {
        "ts": now(),
        **reading.as_fields(),
        "uptime_s": round(max(time.time() - psutil.boot_time(), 0.0), 1),
        "process_count": len(psutil.pids()),
    }


def inventory_snapshot() -> list[dict[str, Any]]:
    from agent import inventory  # the reference agent's sources (dpkg, python)

    software = inventory.collect(inventory.default_sources())
    return [s.model_dump(mode="json", exclude_none=True) for s in software]


def _small(value: Any) -> bool:
    if value is None:
        return True
    try:
        return len(orjson.dumps(value)) <= SMALL_RESULT
    except TypeError:
        return False


def _tail(f: Any) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(size - OUTPUT_TAIL, 0))
    return str(f.read().decode(errors="replace"))


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's process group, SIGKILL after a grace period."""
    if process.poll() is not None:
        return

    def signal_group(kill: bool) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.name == "nt":
                process.kill()  # no process groups or SIGTERM there
            else:
                os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)

    signal_group(kill=False)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        signal_group(kill=True)
