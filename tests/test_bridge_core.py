"""The bridge's skeleton: every kind has a route, nothing valid is acked and dropped,
and a failure while storing one message costs that message only.

What must survive: every other message of the batch (stored and acknowledged), the
ingest loop (later messages are stored too), and the failing message itself (kept as
a dead letter with its reason, never counted as stored).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import pytest
from prometheus_client import REGISTRY

from schemas.config import MqttUrl
from schemas.payloads import MODELS
from schemas.states import DeadLetterReason
from schemas.topics import AGENT_KINDS, Kind, TopicTree
from schemas.validate import parse
from service import identity
from service.bridge.app import BridgeApp
from service.bridge.message import Inbound
from service.bridge.routes import BULK, Reject, Routes, default_routes, on_register
from service.bridge.store import Store
from service.config import Settings
from service.stack.broker import Broker
from service.stack.process import free_port, wait_for
from tests.fix_services import BridgeProcess
from tests.publishers import AgentClient, provision, sample_bytes

TREE = TopicTree()


def example(kind: Kind) -> dict[str, Any]:
    extra: Any = MODELS[kind][0].model_config.get("json_schema_extra")
    return dict(extra["examples"][0])


def one(url: str, query: str, *args: Any) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(query, args).fetchone()
        return None if row is None else row[0]


def rows(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, args).fetchall()


def metric(text: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def counter(name: str, **labels: str) -> float:
    """A metric of this process (the in-process store and bridge count here)."""
    return float(REGISTRY.get_sample_value(name, labels) or 0.0)


# --- the route table ------------------------------------------------------------------


def test_every_kind_an_agent_sends_has_exactly_one_route() -> None:
    routes = default_routes()
    for kind in AGENT_KINDS:
        assert (kind in BULK) != (kind in routes.handlers), kind
    assert Kind.TASKS not in routes.handlers  # the bridge sends it, agents do not


def test_a_route_table_with_a_gap_is_refused() -> None:
    handlers = dict(default_routes().handlers)
    del handlers[Kind.DEPLOYMENT_STATUS]
    with pytest.raises(ValueError, match="no route for \\['deployment-status'\\]"):
        Routes(handlers)
    with pytest.raises(ValueError, match="bulk kinds with a handler \\['telemetry'\\]"):
        Routes({**default_routes().handlers, Kind.TELEMETRY: on_register})


# --- a valid report that cannot be applied is dead-lettered, never acked as stored ----


def test_a_report_on_an_unknown_deployment_is_dead_lettered_not_counted_as_stored(
    broker: Broker, database: str, bridge: BridgeProcess
) -> None:
    password = provision(broker, "dep-1")["dep-1"]
    client = AgentClient(broker.port, "dep-1", password)
    try:
        client.publish(Kind.DEPLOYMENT_STATUS, [orjson.dumps(example(Kind.DEPLOYMENT_STATUS))])
    finally:
        client.close()
    wait_for(lambda: one(database, "SELECT count(*) FROM dead_letters") == 1, 20, "the dead letter")
    assert rows(database, "SELECT agent_id, kind, reason FROM dead_letters") == [
        ("dep-1", "deployment-status", DeadLetterReason.UNKNOWN_DEPLOYMENT.value)
    ]
    text = bridge.metrics()
    assert metric(text, "eucora_dead_letters_total", 'reason="unknown_deployment"') == 1
    assert metric(text, "eucora_messages_stored_total", 'kind="deployment-status"') == 0


# --- failure isolation ----------------------------------------------------------------

POISON = "poison-host"


async def failing_register(
    conn: psycopg.AsyncConnection[Any], items: Sequence[Inbound], reject: Reject
) -> None:
    """The real handler, except that it fails half-way for one hostname: a bug."""
    await on_register(conn, items, reject)
    if any(getattr(item.model, "hostname", None) == POISON for item in items):
        raise RuntimeError("a bug in a handler")


def failing_routes() -> Routes:
    return Routes({**default_routes().handlers, Kind.REGISTER: failing_register})


def register_payload(hostname: str) -> bytes:
    doc = example(Kind.REGISTER) | {"hostname": hostname, "ts": datetime.now(UTC).isoformat()}
    return orjson.dumps(doc)


def inbound(kind: Kind, agent_id: str, payload: bytes, mid: int) -> Inbound:
    item = Inbound(mid, 1, 0, TREE.agent(agent_id, kind), agent_id, kind, payload=payload)
    item.accept(parse(kind, agent_id, payload))
    return item


def test_a_handler_that_raises_costs_only_its_message(database: str) -> None:
    batch = [inbound(Kind.TELEMETRY, "good-1", sample_bytes(i), i) for i in range(998)]
    batch.insert(500, inbound(Kind.REGISTER, "bad-1", register_payload(POISON), 998))
    batch.append(inbound(Kind.REGISTER, "good-2", register_payload("fine-host"), 999))
    assert len(batch) == 1000
    before = counter("eucora_dead_letters_total", reason="internal_error")
    stored_before = counter("eucora_messages_stored_total", kind="register")

    async def run() -> None:
        store = Store(database, failing_routes())
        await store.open()
        try:
            await store.flush(batch)  # returns: the batch is committed, to be acked
        finally:
            await store.close()

    asyncio.run(run())
    assert one(database, "SELECT count(*) FROM telemetry WHERE agent_id = 'good-1'") == 998
    assert rows(database, "SELECT agent_id, hostname FROM agents WHERE hostname IS NOT NULL") == [
        ("good-2", "fine-host")
    ]  # the failing handler's own writes were undone (the batch written again, one by one)
    dead = rows(database, "SELECT agent_id, kind, reason, detail FROM dead_letters")
    assert [(a, k, r) for a, k, r, _ in dead] == [("bad-1", "register", "internal_error")]
    assert "RuntimeError: a bug in a handler" in dead[0][3]
    assert counter("eucora_dead_letters_total", reason="internal_error") - before == 1
    assert counter("eucora_messages_stored_total", kind="register") - stored_before == 1


class InProcessBridge:
    """The bridge's own composition root, run on a thread of the test, so a test can
    give it another route table."""

    def __init__(self, settings: Settings, routes: Routes) -> None:
        self.app = BridgeApp(settings, routes=routes)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.app.run(signals=False)

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc

    def start(self) -> None:
        self.thread.start()
        wait_for(lambda: self.app.health.ready or self.error is not None, 30, "bridge ready")
        assert self.error is None, self.error

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.app.request_stop)
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture
def in_process(broker: Broker, database: str) -> Iterator[InProcessBridge]:
    settings = Settings(
        mqtt=MqttUrl.parse(broker.url(identity.BRIDGE_USER)),
        database_url=database,
        metrics_port=free_port(),
        client_id="bridge-in-process",
    )
    bridge = InProcessBridge(settings, failing_routes())
    yield bridge
    if bridge.thread.is_alive():
        bridge.stop()


def test_ingest_goes_on_after_a_handler_bug(
    broker: Broker, database: str, in_process: InProcessBridge
) -> None:
    passwords = provision(broker, "bad-2", "good-3")
    in_process.start()
    bad = AgentClient(broker.port, "bad-2", passwords["bad-2"])
    good = AgentClient(broker.port, "good-3", passwords["good-3"])
    try:
        bad.publish(Kind.REGISTER, [register_payload(POISON)])
        good.publish(Kind.TELEMETRY, [sample_bytes(i) for i in range(999)])
        wait_for(lambda: one(database, "SELECT count(*) FROM telemetry") == 999, 30, "the samples")
        wait_for(lambda: one(database, "SELECT count(*) FROM dead_letters") == 1, 10, "dead")
        # Later messages of every kind are still stored, the failing one is not retried.
        good.publish(Kind.REGISTER, [register_payload("fine-host")])
        good.publish(Kind.TELEMETRY, [sample_bytes(i) for i in range(999, 1100)])
        wait_for(
            lambda: one(database, "SELECT count(*) FROM telemetry") == 1100, 30, "more samples"
        )
        wait_for(
            lambda: (
                one(database, "SELECT hostname FROM agents WHERE agent_id = 'good-3'")
                == "fine-host"
            ),
            10,
            "the registration",
        )
    finally:
        bad.close()
        good.close()
    assert in_process.app.health.ready
    assert rows(database, "SELECT agent_id, reason FROM dead_letters") == [
        ("bad-2", "internal_error")
    ]
    in_process.stop()
    assert in_process.error is None
