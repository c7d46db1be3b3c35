"""A fleet on several brokers (`eucora stack up --brokers N`): every agent has a home
broker, accounts are valid on every broker of the host (one auth folder), and a
revocation reaches every broker. A small version of bench/provision.py."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.stack import app as stack_app
from schemas.config import MqttUrl
from service.db.connect import connect
from service.stack.process import free_port_range
from service.stack.stack import Stack
from tests.fix_services import service_dir
from tests.test_security import Probe, cli

runner = CliRunner()
FLEET = 2000


@pytest.fixture
def shards(database: str) -> Iterator[Stack]:
    """A stack of 2 brokers on the test database, without a bridge."""
    with service_dir("shards") as root:
        stack = Stack(root / "s")
        try:
            stack.up(mqtt_port=free_port_range(3), service_port=free_port_range(3),
                     database_url=database, bridge=False, brokers=2)  # fmt: skip
            yield stack
        finally:
            stack.down()


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    made: list[Probe] = []
    yield made
    for p in made:
        p.close()


def connect_agent(probes: list[Probe], doc: dict[str, Any], url: str | None = None) -> Probe:
    """The agent as it runs: its config's URL (or another broker's), TLS with its CA."""
    target = MqttUrl.parse(url or doc["mqtt_url"])
    p = Probe(target.port, doc["username"], doc["password"], doc["agent_id"],
              tls=target.tls, ca_file=doc["ca_file"])  # fmt: skip
    probes.append(p)
    return p


def homes(database: str) -> dict[str, int]:
    with connect(database) as conn:
        return dict(conn.execute("SELECT agent_id, broker_id FROM agents").fetchall())


def test_a_fleet_on_two_brokers_provision_connect_revoke(
    shards: Stack, database: str, probes: list[Probe], tmp_path: Path
) -> None:
    env = shards.env()
    ids = tmp_path / "fleet.txt"
    ids.write_text("".join(f"pc-{i:05d}\n" for i in range(FLEET)))
    result = runner.invoke(cli, ["provision", "--from-file", str(ids), "--json"], env=env)
    assert result.exit_code == 0, result.output
    docs = {d["agent_id"]: d for d in json.loads(result.stdout)}
    assert len(docs) == FLEET
    # Level shards: each broker is home to half the fleet, named by its agent URL.
    agent_urls = [b.agent_url for b in shards.brokers()]
    assert Counter(d["mqtt_url"] for d in docs.values()) == {u: FLEET // 2 for u in agent_urls}
    assert Counter(homes(database).values()) == {1: FLEET // 2, 2: FLEET // 2}

    # Agents connect to their home broker; their accounts are valid on every broker.
    on_2 = [a for a, d in docs.items() if d["mqtt_url"] == agent_urls[1]]
    target, bystander = docs[on_2[0]], docs[on_2[1]]
    victim = connect_agent(probes, target)
    assert victim.connect(clean_start=False, session_expiry=3600) == "Success"
    # The same agent on the other broker as well: a revoke must reach that one too.
    victim_on_1 = connect_agent(probes, target, agent_urls[0])
    assert victim_on_1.connect() == "Success"
    other = connect_agent(probes, bystander)
    assert other.connect() == "Success"
    elsewhere = connect_agent(probes, docs[on_2[2]], agent_urls[0])
    assert elsewhere.connect() == "Success"

    status = runner.invoke(stack_app, ["status", "--dir", str(shards.dir), "--json"])
    brokers = json.loads(status.stdout)["brokers"]
    assert [(b["running"], b["agents"]) for b in brokers] == [(True, FLEET // 2)] * 2

    # Revoked: dropped from its home broker at once, refused by every broker.
    result = runner.invoke(cli, ["revoke", target["agent_id"]], env=env)
    assert result.exit_code == 0, result.output
    assert victim.disconnected.wait(5), "the revoked agent is still connected"
    assert victim_on_1.disconnected.wait(5), "still connected to the other broker"
    for url in agent_urls:
        assert connect_agent(probes, target, url).connect() == "Not authorized"
    assert not other.disconnected.is_set() and not elsewhere.disconnected.is_set()
    assert other.publish(f"eucora/v1/agents/{bystander['agent_id']}/heartbeat") != "Not authorized"


def test_adding_a_broker_keeps_every_agent_home(shards: Stack, database: str) -> None:
    env = shards.env()
    first = runner.invoke(cli, ["provision", "a-1", "a-2", "a-3", "a-4", "--json"], env=env)
    assert first.exit_code == 0, first.output
    before = homes(database)
    # A second `stack up` with more brokers adds them; nobody moves.
    shards.up(brokers=3, bridge=False)
    assert len(shards.brokers()) == 3 and all(b.running for b in shards.brokers())
    assert homes(database) == before
    again = runner.invoke(cli, ["provision", "a-5", "--json"], env=env)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["mqtt_url"] == shards.broker(3).agent_url  # the emptiest
    with connect(database) as conn:
        rows = conn.execute("SELECT broker_id, url FROM brokers ORDER BY broker_id").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]
    assert all("@" not in url for _, url in rows)  # no credentials in the registry


def test_accounts_in_the_registry_in_both_schema_modes(
    db_mode: Any, empty_database: str, broker: Any, probes: list[Probe]
) -> None:
    """Provision, revoke and delete on plain PostgreSQL and on TimescaleDB (where
    security_events and agent_status_events are hypertables)."""
    from service.db import migrate
    from tests.fix_services import register_broker

    migrate.upgrade(empty_database, mode=db_mode)
    register_broker(broker, empty_database)
    env = {"EUCORA_DATABASE_URL": empty_database, "EUCORA_AUTH_DIR": str(broker.auth.path)}
    result = runner.invoke(cli, ["provision", "m-1", "m-2", "m-3", "--json"], env=env)
    assert result.exit_code == 0, result.output
    docs = {d["agent_id"]: d for d in json.loads(result.stdout)}
    assert connect_agent(probes, docs["m-1"]).connect() == "Success"
    assert runner.invoke(cli, ["revoke", "m-2"], env=env).exit_code == 0
    assert runner.invoke(cli, ["delete", "m-3"], env=env).exit_code == 0
    with connect(empty_database) as conn:
        agents = conn.execute(
            "SELECT agent_id, password_hash IS NOT NULL, status FROM agents ORDER BY 1"
        ).fetchall()
        (count,) = conn.execute("SELECT agents FROM brokers WHERE broker_id = 1").fetchone() or ()
        events = conn.execute(
            "SELECT agent_id, event FROM security_events ORDER BY time, agent_id"
        ).fetchall()
    assert agents == [("m-1", True, "unknown"), ("m-2", False, "offline")]
    assert count == 1
    assert [e for e in events if e[1] != "provisioned"] == [
        ("m-2", "credentials_revoked"), ("m-3", "credentials_revoked"), ("m-3", "deleted")
    ]  # fmt: skip
    assert broker.auth.agents() == {"m-1"}


def test_a_lost_password_file_is_rebuilt_from_the_registry(
    shards: Stack, database: str, probes: list[Probe]
) -> None:
    """The registry is the source of truth: a stack that starts without the agents'
    password file writes it again from the database (revoked agents left out)."""
    env = shards.env()
    result = runner.invoke(cli, ["provision", "r-1", "r-2", "--json"], env=env)
    assert result.exit_code == 0, result.output
    docs = {d["agent_id"]: d for d in json.loads(result.stdout)}
    assert runner.invoke(cli, ["revoke", "r-2"], env=env).exit_code == 0
    shards.down()
    (shards.auth_dir / "agents.passwd").unlink()
    shards.up(bridge=False)
    assert connect_agent(probes, docs["r-1"]).connect() == "Success"
    assert connect_agent(probes, docs["r-2"]).connect() == "Not authorized"


def test_a_broker_that_does_not_accept_gets_no_new_agents(shards: Stack, database: str) -> None:
    with connect(database) as conn:
        conn.execute("UPDATE brokers SET accepting = false WHERE broker_id = 1")
        conn.commit()
    result = runner.invoke(cli, ["provision", "n-1", "n-2", "n-3", "--json"], env=shards.env())
    assert result.exit_code == 0, result.output
    assert {d["mqtt_url"] for d in json.loads(result.stdout)} == {shards.broker(2).agent_url}
    with connect(database) as conn:
        conn.execute("UPDATE brokers SET accepting = false")
        conn.commit()
    refused = runner.invoke(cli, ["provision", "n-4"], env=shards.env())
    assert refused.exit_code == 1
    assert "no broker accepts new agents" in refused.stderr
