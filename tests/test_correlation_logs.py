"""One task followed by its correlation id everywhere an operator looks (SPEC "Logs"):
the output of `eucora tasks create --wait`, the bridge's log, the reference agent's
log and the task's events (`tasks show --json`). Real broker, bridge and agent."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from service.stack.broker import Broker
from tests.fix_services import BridgeProcess
from tests.test_agent_tasks import eucora
from tests.test_agents_support import AgentProcess, agent_factory, provision, query, wait

__all__ = ["agent_factory"]


def lines_with(log: str, correlation_id: str) -> list[dict[str, Any]]:
    """The JSON log lines that carry this correlation id."""
    found = []
    for line in log.splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("correlation_id") == correlation_id:
                found.append(doc)
    return found


def test_one_task_traced_by_its_correlation_id(
    broker: Broker,
    bridge: BridgeProcess,
    database: str,
    agent_factory: Callable[..., AgentProcess],
) -> None:
    pw = provision(broker, "worker-1")["worker-1"]
    agent = agent_factory(broker, "worker-1", pw, "--telemetry-interval", "1")
    wait(
        lambda: query(database, "SELECT 1 FROM agents WHERE agent_id = 'worker-1'"
                                " AND status = 'online'"),
        20, "the agent online",
    )  # fmt: skip

    done = eucora(database, "tasks", "create", "--agent", "worker-1", "--type", "HEALTHCHECK",
                  "--wait", "--wait-timeout", "60")  # fmt: skip
    # A real health check of this host: COMPLETED (0) or FAILED (1) are both honest.
    assert done.returncode in (0, 1), done.stdout + done.stderr
    match = re.search(r"correlation id (\S+)", done.stdout)
    assert match, done.stdout
    cid = match.group(1)
    ((task_id, status),) = query(
        database, "SELECT task_id::text, status FROM tasks WHERE correlation_id = %s", (cid,)
    )
    assert status in ("COMPLETED", "FAILED")
    assert task_id in done.stdout  # the table

    # The task's events: every one of them carries it.
    shown = eucora(database, "tasks", "show", task_id, "--json")
    events = json.loads(shown.stdout)["events"]
    assert events and {e["correlation_id"] for e in events} == {cid}

    # The bridge: published, then the agent's final report, both with the task's ids.
    def bridge_lines() -> list[dict[str, Any]]:
        found = lines_with(bridge.log(), cid)
        return (
            found if {"task message published", "task report"} <= {d["msg"] for d in found} else []
        )

    for doc in wait(bridge_lines, 10, "the bridge's lines about the task"):
        assert doc["task_id"] == task_id and doc["agent_id"] == "worker-1", doc
    final = [d for d in bridge_lines() if d["msg"] == "task report"]
    assert [d["status"] for d in final] == [status]

    # The agent: received, then its final report.
    mine = lines_with(agent.log(), cid)
    assert [d["msg"] for d in mine] == ["task received", "task report"], agent.log()
    assert all(d["task_id"] == task_id and d["agent_id"] == "worker-1" for d in mine)
    assert mine[-1]["status"] == status
