"""The broker shards as the bridge reads them: which brokers the fleet is spread over
(the `brokers` table, written by `service/domains/accounts.py`) and how the bridge
reaches each. docs/scale.md explains the model.

A fleet without rows here is today's single broker: every agent's home is the broker
of EUCORA_MQTT_URL. Agents with no home recorded (they came before shards, or were
never provisioned) belong to the broker with the lowest id.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from psycopg import AsyncConnection

from schemas.config import MqttUrl
from service.domains.accounts import BROKERS_SQL, BrokerRecord

Conn = AsyncConnection[Any]


async def load(conn: Conn) -> list[BrokerRecord]:
    """Every registered broker, by id (the bridge's asynchronous read of what
    `accounts.brokers` reads)."""
    cur = await conn.execute(BROKERS_SQL)
    return [BrokerRecord(*row) for row in await cur.fetchall()]


def with_credentials(record: BrokerRecord, credentials: MqttUrl) -> MqttUrl:
    """The broker's service URL with the account of `credentials` (the bridge's own:
    every broker reads the same account files)."""
    where = MqttUrl.parse(record.url, var=f"brokers.url of broker {record.broker_id}")
    return replace(credentials, host=where.host, port=where.port, tls=where.tls)
