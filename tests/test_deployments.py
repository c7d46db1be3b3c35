"""Deployments end to end: real broker, bridge processes and database; simulated agents.

What must hold, test by test: the in-flight cap and the rate, every target exactly one
DEPLOY (bridge SIGKILL, two bridges), abort on the threshold with nobody started after
it, rollback of exactly the agents that succeeded, an offline target served when it
returns, and reports the deployment cannot use kept and counted, not applied.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from typer.testing import CliRunner

from cli.deployments import app as deployments_app
from cli.deployments import parse_abort_after
from schemas.payloads import TaskCancel
from schemas.states import DeploymentAgentStatus as A
from schemas.states import (
    DeploymentState,
    deployment_agent_transition_allowed,
    deployment_transition_allowed,
)
from schemas.topics import Kind
from schemas.validate import parse
from service.domains.deployments import Counts, judge, starts_allowed, threshold_passed
from service.stack.broker import Broker
from tests.fix_services import BridgeProcess
from tests.publishers import provision
from tests.test_tasks import Db, SimAgent, db, now, wait_online

__all__ = ["db"]  # fixture

FAST = {"EUCORA_TASK_SWEEP_INTERVAL": "0.5", "EUCORA_ROLLOUT_INTERVAL": "0.2"}
PAYLOAD = {"command": ["true"], "rollback_command": ["true"], "package": "demo", "version": "2"}


class DeployAgent(SimAgent):
    """A SimAgent that plays DEPLOY tasks as the reference agent does: task ASSIGNED,
    deployment-status IN_PROGRESS with progress, then SUCCESS (or FAILED when told to
    fail), then the task's outcome; a rollback task ends in ROLLBACK. `queued`: seconds a
    DEPLOY waits behind other work before it starts; one expired by then is REJECTED, as
    the reference agent does."""

    def __init__(
        self, *a: Any, fail: bool = False, duration: float = 0.2, reports: bool = True,
        queued: float = 0, **kw: Any,
    ) -> None:  # fmt: skip
        super().__init__(*a, **kw)
        self.fail = fail
        self.queued = queued
        self.reports = reports  # False: an agent that reports the task only
        self.duration = duration
        self.deploys: Counter[tuple[str, bool]] = Counter()  # (deployment, rollback) -> runs
        self.timers: list[threading.Timer] = []

    def _deployment(self, doc: dict[str, Any]) -> None:
        if not self.reports:
            return
        self.client.publish(self.topic(Kind.DEPLOYMENT_STATUS), orjson.dumps(doc), qos=1)

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        task = parse(Kind.TASKS, self.agent_id, msg.payload)
        if isinstance(task, TaskCancel) or task.type != "DEPLOY":
            super()._on_message(c, u, msg)
            return
        tid, did = str(task.task_id), str(task.payload["deployment_id"])
        rollback = bool(task.payload.get("rollback"))
        with self.lock:
            self.deliveries.append((tid, task.attempt))
            if tid in self.last:
                return  # a repeat: already running or done
            self.last[tid] = {}
            self.deploys[did, rollback] += 1
        self._send(tid, "ASSIGNED")
        if self.queued:
            time.sleep(self.queued)  # paho's thread: later deliveries wait too, as queued
            if task.expires_at <= datetime.now(UTC):
                why = f"expired before start (expires_at {task.expires_at.isoformat()})"
                self._send(tid, "REJECTED", error=why)
                return
        self._send(tid, "IN_PROGRESS", progress=5)
        if not rollback:
            self._deployment({"deployment_id": did, "status": "IN_PROGRESS", "progress": 40,
                              "ts": now()})  # fmt: skip

        def finish() -> None:
            if rollback:
                self._deployment(
                    {"deployment_id": did, "status": "ROLLBACK", "progress": 100, "ts": now()}
                )
                self._send(tid, "COMPLETED", progress=100)
            elif self.fail:
                self._deployment({"deployment_id": did, "status": "FAILED", "progress": 40,
                                  "message": "post-install check failed", "ts": now()})  # fmt: skip
                self._send(tid, "FAILED", error="post-install check failed")
            else:
                self._deployment(
                    {"deployment_id": did, "status": "SUCCESS", "progress": 100, "ts": now()}
                )
                self._send(tid, "COMPLETED", progress=100)

        timer = threading.Timer(self.duration, finish)
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def close(self) -> None:
        for t in self.timers:
            t.cancel()
        super().close()


@pytest.fixture
def deploy_fleet() -> Any:
    made: list[DeployAgent] = []

    def make(broker: Broker, n: int, prefix: str = "dep", **kw: Any) -> list[DeployAgent]:
        fails = kw.pop("fails", lambda i: False)
        passwords = provision(broker, *(f"{prefix}-{i:04d}" for i in range(n)))
        agents = [
            DeployAgent(broker, a, p, fail=fails(i), **kw)
            for i, (a, p) in enumerate(passwords.items())
        ]
        made.extend(agents)
        for a in agents:
            a.connect()
        return agents

    yield make
    for a in made:
        a.close()


def cli(database: str, *args: str) -> Any:
    return CliRunner().invoke(deployments_app, list(args), env={"EUCORA_DATABASE_URL": database})


def create(database: str, *args: str) -> str:
    result = cli(database, "create", "--json", "--payload", orjson.dumps(PAYLOAD).decode(), *args)
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.stdout)
    assert set(doc) == {"deployment_id", "status", "targets"}
    return str(doc["deployment_id"])


def show(database: str, deployment_id: str) -> dict[str, Any]:
    result = cli(database, "show", "--json", deployment_id)
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = orjson.loads(result.stdout)
    return doc


class Sampler:
    """Reads the deployment every `every` seconds while a rollout runs: what an operator
    watching `deployments show` would see."""

    def __init__(self, db: Db, deployment_id: str, every: float = 0.5) -> None:
        self.db = Db(db.url)
        self.deployment_id = deployment_id
        self.every = every
        self.in_flight: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.in_flight.append(
                self.db.one(
                    "SELECT count(*) FROM deployment_status WHERE deployment_id = %s"
                    " AND started_at IS NOT NULL AND finished_at IS NULL",
                    self.deployment_id,
                )
            )
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.db.conn.close()


def wait_state(db: Db, deployment_id: str, state: str, timeout: float = 60) -> None:
    db.wait(
        "SELECT status FROM deployments WHERE deployment_id = %s", state, timeout, deployment_id
    )


def deploys_per_target(db: Db, deployment_id: str) -> Counter[str]:
    return Counter(
        dict(
            db.all(
                "SELECT agent_id, count(*) FROM tasks WHERE deployment_id = %s"
                " AND payload->>'rollback' IS NULL GROUP BY agent_id",
                deployment_id,
            )
        )
    )


# --- the rules, pure ------------------------------------------------------------------


def counts(**kw: int) -> Counts:
    base = {"finished": 0, "failed": 0, "in_flight": 0, "unstarted": 0, "rolling_back": 0}
    base |= kw
    return Counts(targets=kw.get("targets", 100), **{k: v for k, v in base.items()})


def test_the_cap_and_the_rate_limit_starts() -> None:
    from datetime import UTC, datetime

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    d = {"max_in_flight": 5, "rate_per_minute": None, "next_start_at": None}
    assert starts_allowed(d, counts(unstarted=100, in_flight=3), t0)[0] == 2
    assert starts_allowed(d, counts(unstarted=1, in_flight=0), t0)[0] == 1
    assert starts_allowed(d, counts(unstarted=100, in_flight=5), t0)[0] == 0
    # 60/min: one a second; a fresh deployment starts one now, the next a second later.
    d = {"max_in_flight": None, "rate_per_minute": 60, "next_start_at": None}
    n, nxt = starts_allowed(d, counts(unstarted=100), t0)
    assert (n, nxt) == (1, t0 + timedelta(seconds=1))
    d["next_start_at"] = nxt
    assert starts_allowed(d, counts(unstarted=100), t0 + timedelta(seconds=0.5))[0] == 0
    # 1.5 s later than due: the credit (1 s) allows the slots at 1.5 and 2.5 s.
    n, nxt = starts_allowed(d, counts(unstarted=100), t0 + timedelta(seconds=2.5))
    assert n == 2 and nxt == t0 + timedelta(seconds=3.5)
    # After a long pause (cap full, bridge down) the credit is one second's worth, not
    # the whole pause: 600/min allows 10 + 1, not 600.
    d = {"max_in_flight": None, "rate_per_minute": 600, "next_start_at": t0}
    assert starts_allowed(d, counts(unstarted=1000), t0 + timedelta(minutes=1))[0] == 11


def test_the_abort_threshold() -> None:
    d = {"abort_after_count": None, "abort_after_percent": 10.0, "abort_min_finished": 20}
    assert threshold_passed(d, counts(finished=19, failed=19)) is None  # too few finished
    assert threshold_passed(d, counts(finished=20, failed=2)) is None  # 10% is not past 10%
    assert "3 of 20" in str(threshold_passed(d, counts(finished=20, failed=3)))
    d = {"abort_after_count": 3, "abort_after_percent": None, "abort_min_finished": 20}
    assert threshold_passed(d, counts(finished=2, failed=2)) is None
    assert threshold_passed(d, counts(finished=3, failed=3)) is not None
    assert parse_abort_after("10%") == (None, 10.0)
    assert parse_abort_after("5") == (5, None)


def test_state_machines() -> None:
    assert deployment_transition_allowed(DeploymentState.RUNNING, DeploymentState.ABORTED)
    assert deployment_transition_allowed(DeploymentState.ABORTED, DeploymentState.ROLLING_BACK)
    assert not deployment_transition_allowed(DeploymentState.COMPLETED, DeploymentState.RUNNING)
    assert not deployment_transition_allowed(
        DeploymentState.ROLLED_BACK, DeploymentState.ROLLING_BACK
    )
    assert deployment_agent_transition_allowed(A.PENDING, A.SUCCESS)  # lost IN_PROGRESS
    assert deployment_agent_transition_allowed(A.SUCCESS, A.ROLLBACK)
    assert not deployment_agent_transition_allowed(A.SUCCESS, A.IN_PROGRESS)
    assert not deployment_agent_transition_allowed(A.SKIPPED, A.SUCCESS)
    assert not deployment_agent_transition_allowed(A.ROLLBACK, A.SUCCESS)
    verdict = judge(A.SUCCESS, A.IN_PROGRESS, started=True, current_progress=100, new_progress=5)
    assert verdict.outcome == "after_final"
    assert judge(
        A.PENDING, A.SUCCESS, started=False, current_progress=0, new_progress=100
    ).outcome == ("not_started")
    assert judge(A.IN_PROGRESS, A.IN_PROGRESS, started=True, current_progress=10,
                 new_progress=50).outcome == "progress"  # fmt: skip
    # The agent's own PENDING ("received, queued") is news, not a duplicate.
    assert judge(A.PENDING, A.PENDING, started=True, current_progress=0,
                 new_progress=0).outcome == "received"  # fmt: skip


# --- end to end -----------------------------------------------------------------------


def test_rollout_holds_the_cap_and_the_rate(
    broker: Broker, database: str, db: Db, bridge_factory: Any, deploy_fleet: Any
) -> None:
    bridge_factory(broker, database, **FAST)
    agents = deploy_fleet(broker, 40, duration=0.3)
    wait_online(db, 40)
    did = create(database, "--platform", "linux", "--rate", "600", "--max-in-flight", "5")
    sampler = Sampler(db, did)
    try:
        wait_state(db, did, "COMPLETED", 60)
    finally:
        sampler.stop()
    doc = show(database, did)
    assert doc["status"] == "COMPLETED" and doc["targets"] == 40 and doc["progress"] == 100
    assert doc["counts"]["SUCCESS"] == 40 and sum(doc["counts"].values()) == 40
    assert {a["status"] for a in doc["agents"]} == {"SUCCESS"}
    assert all(a["task_id"] for a in doc["agents"])
    assert max(sampler.in_flight) <= 5 and len(sampler.in_flight) >= 4
    starts = sorted(r[0] for r in db.all(
        "SELECT started_at FROM deployment_status WHERE deployment_id = %s", did
    ))  # fmt: skip
    span = (starts[-1] - starts[0]).total_seconds()
    # 600/min is 10 a second: 40 starts take at least (40 - 1 - 10 of credit) / 10 s.
    assert span >= (40 - 1 - 10) / 10 * 0.9
    assert deploys_per_target(db, did) == Counter({a.agent_id: 1 for a in agents})
    assert sum(a.deploys[did, False] for a in agents) == 40


def test_abort_past_the_threshold_stops_starting_and_skips_the_rest(
    broker: Broker, database: str, db: Db, bridge_factory: Any, deploy_fleet: Any
) -> None:
    bridge: BridgeProcess = bridge_factory(broker, database, **FAST)
    # Every third agent fails: 33% against a 10% threshold after 6 finished.
    agents = deploy_fleet(broker, 45, fails=lambda i: i % 3 == 0, duration=0.2)
    wait_online(db, 45)
    did = create(
        database, "--platform", "linux", "--max-in-flight", "3",
        "--abort-after", "10%", "--abort-min-finished", "6",
    )  # fmt: skip
    wait_state(db, did, "ABORTED", 60)
    db.wait(
        "SELECT count(*) FROM deployment_status WHERE deployment_id = %s AND finished_at IS NULL",
        0, 30, did,
    )  # fmt: skip
    doc = show(database, did)
    assert "failed" in doc["status_reason"]
    aborted_at = db.one("SELECT finished_at FROM deployments WHERE deployment_id = %s", did)
    late = db.one(
        "SELECT count(*) FROM deployment_status WHERE deployment_id = %s AND started_at > %s",
        did, aborted_at,
    )  # fmt: skip
    assert late == 0  # nobody started after the abort decision
    c = doc["counts"]
    assert c["SKIPPED"] > 0 and c["FAILED"] >= 1 and sum(c.values()) == 45
    assert c["PENDING"] == 0 and c["IN_PROGRESS"] == 0
    # Skipped targets: never sent a DEPLOY, or their DEPLOY was CANCELLED unstarted.
    skipped_tasks = db.all(
        "SELECT t.status FROM deployment_status ds JOIN tasks t ON t.task_id = ds.task_id"
        " WHERE ds.deployment_id = %s AND ds.status = 'SKIPPED'",
        did,
    )
    assert {s for (s,) in skipped_tasks} <= {"CANCELLED"}
    assert set(deploys_per_target(db, did).values()) == {1}
    assert all(a.deploys[did, False] <= 1 for a in agents)
    text = bridge.metrics()
    assert "eucora_deployment_transitions_total" in text


def test_a_deploy_that_expired_while_queued_on_the_agent_is_skipped_not_failed(
    broker: Broker, database: str, db: Db, bridge_factory: Any, deploy_fleet: Any
) -> None:
    # The agent got the DEPLOY in time, but it expired while queued there; the agent's
    # REJECTED arrives before the server's expiry sweep (set far away) could mark it.
    bridge_factory(broker, database, **{**FAST, "EUCORA_TASK_SWEEP_INTERVAL": "300"})
    agents = deploy_fleet(broker, 1, queued=3.0)
    wait_online(db, 1)
    did = create(database, "--agent", agents[0].agent_id, "--expires-in", "2",
                 "--abort-after", "1")  # fmt: skip
    wait_state(db, did, "COMPLETED", 30)  # not ABORTED: nothing failed
    row = db.one(
        "SELECT ds.status || ' ' || t.status FROM deployment_status ds"
        " JOIN tasks t ON t.task_id = ds.task_id WHERE ds.deployment_id = %s",
        did,
    )
    assert row == "SKIPPED REJECTED"
    assert show(database, did)["counts"]["SKIPPED"] == 1


def test_rollback_after_partial_success(
    broker: Broker, database: str, db: Db, bridge_factory: Any, deploy_fleet: Any
) -> None:
    bridge_factory(broker, database, **FAST)
    agents = deploy_fleet(broker, 6, fails=lambda i: i in (1, 4), duration=0.1)
    wait_online(db, 6)
    did = create(database, "--platform", "linux")
    wait_state(db, did, "COMPLETED", 30)
    assert show(database, did)["counts"] | {} == {
        "PENDING": 0, "IN_PROGRESS": 0, "SUCCESS": 4, "FAILED": 2, "ROLLBACK": 0, "SKIPPED": 0,
    }  # fmt: skip
    result = cli(database, "rollback", "--json", did)
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout)["agents"] == 4
    wait_state(db, did, "ROLLED_BACK", 30)
    doc = show(database, did)
    assert doc["counts"]["ROLLBACK"] == 4 and doc["counts"]["FAILED"] == 2
    succeeded = {a.agent_id for i, a in enumerate(agents) if i not in (1, 4)}
    rolled = {a.agent_id for a in agents if a.deploys[did, True]}
    assert rolled == succeeded
    assert all(a.deploys[did, True] == 1 for a in agents if a.agent_id in succeeded)
    again = cli(database, "rollback", did)
    assert again.exit_code == 1 and "ROLLED_BACK" in again.output


def test_bridge_killed_mid_rollout_and_two_bridges_send_one_deploy_each(
    broker: Broker, database: str, db: Db, bridge_factory: Any, deploy_fleet: Any
) -> None:
    bridges = [bridge_factory(broker, database, client_id=f"bridge-{i}", **FAST) for i in range(2)]
    agents = deploy_fleet(broker, 60, duration=0.3)
    wait_online(db, 60)
    did = create(database, "--platform", "linux", "--rate", "1200", "--max-in-flight", "8")
    sampler = Sampler(db, did, every=0.2)
    try:
        db.wait(
            "SELECT count(*) >= 15 FROM deployment_status WHERE deployment_id = %s"
            " AND started_at IS NOT NULL",
            True, 30, did,
        )  # fmt: skip
        bridges[0].kill()
        time.sleep(0.5)  # the other bridge carries on alone for a while
        bridges[0].start()
        wait_state(db, did, "COMPLETED", 60)
    finally:
        sampler.stop()
    assert max(sampler.in_flight) <= 8
    assert deploys_per_target(db, did) == Counter({a.agent_id: 1 for a in agents})
    assert all(a.deploys[did, False] == 1 for a in agents)
    doc = show(database, did)
    assert doc["counts"]["SUCCESS"] == 60 and sum(doc["counts"].values()) == 60


def test_an_offline_target_gets_its_deploy_when_it_returns(
    broker: Broker, database: str, db: Db, bridge_factory: Any, deploy_fleet: Any
) -> None:
    bridge_factory(broker, database, **FAST)
    agents = deploy_fleet(broker, 3, duration=0.1)
    wait_online(db, 3)
    away = agents[0]
    away.disconnect()
    db.wait("SELECT status FROM agents WHERE agent_id = %s", "offline", 10, away.agent_id)
    did = create(database, "--platform", "linux", "--max-in-flight", "2")
    db.wait(
        "SELECT count(*) FROM deployment_status WHERE deployment_id = %s AND status = 'SUCCESS'",
        2, 30, did,
    )  # fmt: skip
    assert show(database, did)["status"] == "RUNNING"
    away.connect()  # its persistent session holds the DEPLOY
    wait_state(db, did, "COMPLETED", 30)
    assert away.deploys[did, False] == 1


def test_reports_the_deployment_cannot_use_are_kept_not_applied(
    broker: Broker, database: str, db: Db, bridge_factory: Any, deploy_fleet: Any
) -> None:
    bridge: BridgeProcess = bridge_factory(broker, database, **FAST)
    agents = deploy_fleet(broker, 2, duration=0.1)
    wait_online(db, 2)
    did = create(database, "--agent", agents[0].agent_id)
    wait_state(db, did, "COMPLETED", 30)
    a, b = agents
    # Unknown deployment; a deployment that does not target b: dead letters.
    b._deployment({"deployment_id": str(uuid.uuid4()), "status": "SUCCESS", "progress": 100,
                   "ts": now()})  # fmt: skip
    b._deployment({"deployment_id": did, "status": "SUCCESS", "progress": 100, "ts": now()})
    # After the final SUCCESS: recorded as not accepted, nothing changes.
    a._deployment({"deployment_id": did, "status": "IN_PROGRESS", "progress": 10, "ts": now()})
    db.wait("SELECT count(*) FROM dead_letters WHERE reason = 'unknown_deployment'", 2, 15)
    db.wait(
        "SELECT count(*) FROM deployment_status_events WHERE deployment_id = %s AND NOT accepted",
        1, 15, did,
    )  # fmt: skip
    assert db.one(
        "SELECT status FROM deployment_status WHERE deployment_id = %s AND agent_id = %s",
        did, a.agent_id,
    ) == "SUCCESS"  # fmt: skip
    text = bridge.metrics()
    assert 'eucora_deployment_reports_total{outcome="after_final"} 1.0' in text
    assert 'eucora_dead_letters_total{reason="unknown_deployment"} 2.0' in text


def test_cli_errors_are_one_line(database: str, db: Db) -> None:
    db.conn.execute("INSERT INTO agents (agent_id, platform) VALUES ('x-1', 'linux')")
    ok = '{"command": ["true"]}'
    bad = [
        (["create", "--payload", "[1]", "--platform", "linux"], 2, "JSON object"),
        (["create", "--payload", ok, "--platform", "linux", "--abort-after", "x"], 2, "count"),
        (["create", "--payload", '{"rollback": 1}', "--platform", "linux"], 2, "must not set"),
        (["create", "--payload", "{}", "--platform", "linux"], 2, "payload.command"),
        (["create", "--payload", ok, "--agent", "nobody"], 1, "unknown agent"),
        (["create", "--payload", ok, "--platform", "windows"], 1, "no agent matches"),
        (["show", str(uuid.uuid4())], 1, "no deployment"),
        (["abort", "not-a-uuid"], 1, "not a deployment id"),
    ]  # fmt: skip
    for args, code, text in bad:
        result = cli(database, *args)
        assert result.exit_code == code, (args, result.output)
        assert text in result.output and "Traceback" not in result.output
    assert db.one("SELECT count(*) FROM deployments") == 0
    did = create(database, "--agent", "x-1", "--intent-id", "CHG-42")
    doc = show(database, did)
    assert doc["intent_id"] == "CHG-42" and doc["status"] == "PENDING"
    assert {
        "deployment_id",
        "intent_id",
        "status",
        "targets",
        "counts",
        "progress",
        "agents",
    } <= set(doc)
    assert set(doc["agents"][0]) >= {"agent_id", "status", "progress", "task_id", "updated_at"}
    aborted = cli(database, "abort", "--json", did)
    assert aborted.exit_code == 0 and orjson.loads(aborted.stdout)["status"] == "ABORTED"
    doc = show(database, did)
    assert doc["counts"]["SKIPPED"] == 1 and doc["status"] == "ABORTED"
    again = cli(database, "abort", did)
    assert again.exit_code == 1 and "nothing to abort" in again.output
    listed = orjson.loads(cli(database, "list", "--json").stdout)
    assert [d["deployment_id"] for d in listed] == [did]


def test_agents_at_work_when_aborted_finish_and_are_recorded(
    broker: Broker, database: str, db: Db, bridge_factory: Any, deploy_fleet: Any
) -> None:
    """They are told nothing new; an agent that reports only its task still ends SUCCESS."""
    bridge_factory(broker, database, **FAST)
    agents = deploy_fleet(broker, 4, duration=3.0, reports=False)
    wait_online(db, 4)
    did = create(database, "--platform", "linux", "--max-in-flight", "2")
    db.wait(
        "SELECT count(*) FROM tasks WHERE deployment_id = %s AND status = 'IN_PROGRESS'",
        2, 20, did,
    )  # fmt: skip
    result = cli(database, "abort", did)
    assert result.exit_code == 0, result.output
    waited = cli(database, "show", "--json", did)
    assert orjson.loads(waited.stdout)["in_flight"] == 2
    db.wait(
        "SELECT count(*) FROM deployment_status WHERE deployment_id = %s AND status = 'SUCCESS'",
        2, 30, did,
    )  # fmt: skip
    doc = show(database, did)
    assert doc["status"] == "ABORTED" and doc["in_flight"] == 0
    assert doc["counts"]["SUCCESS"] == 2 and doc["counts"]["SKIPPED"] == 2
    assert sum(a.deploys[did, False] for a in agents) == 2
    assert not any(a.cancels for a in agents)  # nobody at work was told anything
