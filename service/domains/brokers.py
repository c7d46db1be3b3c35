"""The broker shards: which brokers the fleet is spread over (the `brokers` table) and
which one is each agent's home (`agents.broker_id`). docs/scale.md explains the model.

A fleet without rows here is today's single broker: every agent's home is the broker
of EUCORA_MQTT_URL. Agents with no home recorded (they came before shards, or were
never provisioned) belong to the broker with the lowest id.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from psycopg import AsyncConnection

from schemas.config import ConfigError, MqttUrl

Conn = AsyncConnection[Any]


@dataclass(frozen=True)
class BrokerRecord:
    broker_id: int
    url: str  # the service listener the bridge and operators use, without credentials
    agent_url: str  # what the broker's agents dial, without credentials
    accepting: bool  # new agents may be given this home


async def load(conn: Conn) -> list[BrokerRecord]:
    """Every registered broker, by id."""
    cur = await conn.execute(
        "SELECT broker_id, url, agent_url, accepting FROM brokers ORDER BY broker_id"
    )
    return [BrokerRecord(*row) for row in await cur.fetchall()]


def with_credentials(record: BrokerRecord, credentials: MqttUrl) -> MqttUrl:
    """The broker's service URL with the account of `credentials` (the bridge's own:
    every broker reads the same account files)."""
    try:
        where = MqttUrl.parse(record.url, var=f"brokers.url of broker {record.broker_id}")
    except ConfigError:
        raise
    return replace(credentials, host=where.host, port=where.port, tls=where.tls)
