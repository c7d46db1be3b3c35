"""Agents' broker accounts in the registry: the brokers, home brokers, provisioning,
revocation, deletion (docs/broker.md). The database is the source of truth; the
password files the brokers read follow it (service/identity.py).

Synchronous (psycopg.Connection), unlike the bridge's domains: only the CLI, the
stack and the benchmarks call these, and a bulk provisioning is one COPY. Each
function runs in its caller's transaction; `lock` serialises provisioners, so two
of them never pick home brokers from the same counts or write the files crosswise.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from service.domains.agents import status_event
from service.domains.events import record_sync
from service.domains.security import security_event_sync, security_events_sync

Conn = psycopg.Connection[Any]
# pg_advisory_xact_lock key shared by every provisioning command ("eucora-id").
LOCK_KEY = 0x6575636F72612D69


@dataclass(frozen=True)
class BrokerRecord:
    broker_id: int
    url: str
    agent_url: str
    accepting: bool
    agents: int  # agents with an account whose home it is (NULL home: broker 1)


class AccountError(RuntimeError):
    """A request the registry refuses (unknown agent, already provisioned...)."""


def lock(conn: Conn) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))


def register_brokers(conn: Conn, brokers: Sequence[tuple[int, str, str]]) -> None:
    """(broker_id, url, agent_url) of brokers that run: added, or their URLs updated
    (a stack restarted on other ports); every broker's agent count recounted. Agents
    keep their home broker."""
    for broker_id, url, agent_url in brokers:
        conn.execute(
            """
            INSERT INTO brokers (broker_id, url, agent_url) VALUES (%s, %s, %s)
            ON CONFLICT (broker_id) DO UPDATE SET url = EXCLUDED.url,
                   agent_url = EXCLUDED.agent_url
            """,
            (broker_id, url, agent_url),
        )
    conn.execute(
        """
        UPDATE brokers b SET agents = coalesce(n.agents, 0)
          FROM brokers b2
          LEFT JOIN (SELECT coalesce(broker_id, 1) AS broker_id, count(*) AS agents
                       FROM agents WHERE password_hash IS NOT NULL GROUP BY 1) n
                 USING (broker_id)
         WHERE b.broker_id = b2.broker_id
        """
    )


BROKERS_SQL = "SELECT broker_id, url, agent_url, accepting, agents FROM brokers ORDER BY broker_id"


def brokers(conn: Conn) -> list[BrokerRecord]:
    return [BrokerRecord(*r) for r in conn.execute(BROKERS_SQL).fetchall()]


def _count(conn: Conn, changes: Mapping[int, int]) -> None:
    """Keep brokers.agents: +n / -n agents with an account at home there."""
    for broker_id, n in changes.items():
        if n:
            conn.execute(
                "UPDATE brokers SET agents = agents + %s WHERE broker_id = %s", (n, broker_id)
            )


def assign_homes(counts: Mapping[int, int], n: int) -> list[int]:
    """Home brokers for n new agents: each to the accepting broker with the fewest
    agents at that moment (ties: the lowest id), so shards stay level."""
    heap = [(count, broker_id) for broker_id, count in counts.items()]
    heapq.heapify(heap)
    homes: list[int] = []
    for _ in range(n):
        count, broker_id = heapq.heappop(heap)
        homes.append(broker_id)
        heapq.heappush(heap, (count + 1, broker_id))
    return homes


@dataclass(frozen=True)
class Provisioned:
    agent_id: str
    broker_id: int
    agent_url: str


def provision(conn: Conn, hashes: Mapping[str, str], *, rotate: bool = False) -> list[Provisioned]:
    """Give these agents accounts (password hash) in the registry, in one COPY.

    New agents (and agents known but without an account: never provisioned, or
    revoked) get a home broker; with `rotate`, every agent must already have an
    account and keeps its home. Raises AccountError, changing nothing, when an agent
    already has an account (without `rotate`) or has none (with it).
    """
    if not hashes:
        return []
    lock(conn)
    known = {r.broker_id: r for r in brokers(conn)}
    if not known:
        raise AccountError(
            "no broker is registered in the database: `eucora stack up` registers its "
            "brokers (docs/broker.md)"
        )
    conn.execute("DROP TABLE IF EXISTS pg_temp.new_accounts, pg_temp.new_homes")
    conn.execute(
        "CREATE TEMP TABLE new_accounts (agent_id text PRIMARY KEY, password_hash text NOT NULL,"
        " broker_id integer) ON COMMIT DROP"
    )
    with conn.cursor().copy("COPY new_accounts (agent_id, password_hash) FROM STDIN") as copy:
        for agent_id, hashed in hashes.items():
            copy.write_row((agent_id, hashed))
    conn.execute("ANALYZE new_accounts")  # a few rows join by index, a fleet by hash
    rows = conn.execute(
        """
        SELECT n.agent_id, a.agent_id IS NOT NULL, a.password_hash IS NOT NULL, a.broker_id
          FROM new_accounts n LEFT JOIN agents a USING (agent_id)
         ORDER BY n.agent_id
        """
    ).fetchall()
    have = [r[0] for r in rows if r[2]]
    if rotate and len(have) < len(rows):
        missing = [r[0] for r in rows if not r[2]]
        raise AccountError(f"no account for {_names(missing)}: provision without --rotate")
    if not rotate and have:
        raise AccountError(
            f"{_names(have)} already {'has' if len(have) == 1 else 'have'} broker credentials:"
            " use --rotate for a new password, or `eucora agents revoke` first"
        )
    # Re-provisioned agents go home to the broker that holds their session.
    keep = {r[0]: r[3] for r in rows if r[3] is not None and known.get(r[3])}
    fresh = [r[0] for r in rows if r[0] not in keep]
    accepting = {b: r.agents for b, r in known.items() if r.accepting}
    if fresh and not accepting:
        raise AccountError("no broker accepts new agents (brokers.accepting is false everywhere)")
    homes = dict(zip(fresh, assign_homes(accepting, len(fresh)), strict=True)) | keep
    _set_homes(conn, homes)
    conn.execute(
        """
        INSERT INTO agents (agent_id, broker_id, password_hash, provisioned_at)
        SELECT agent_id, broker_id, password_hash, now() FROM new_accounts
        ON CONFLICT (agent_id) DO UPDATE
           SET broker_id = EXCLUDED.broker_id, password_hash = EXCLUDED.password_hash,
               provisioned_at = now(), revoked_at = NULL, updated_at = now()
        """
    )
    if not rotate:
        _count(conn, Counter(homes.values()))
    event = "credentials_rotated" if rotate else "provisioned"
    security_events_sync(conn, [(a, event, {"broker_id": homes[a]}) for a in sorted(hashes)])
    return [Provisioned(a, homes[a], known[homes[a]].agent_url) for a in hashes]


def _set_homes(conn: Conn, homes: Mapping[str, int]) -> None:
    """Home brokers into new_accounts: COPY into a second temp table, one UPDATE."""
    conn.execute(
        "CREATE TEMP TABLE new_homes (agent_id text PRIMARY KEY, broker_id integer) ON COMMIT DROP"
    )
    with conn.cursor().copy("COPY new_homes (agent_id, broker_id) FROM STDIN") as copy:
        for agent_id, broker_id in homes.items():
            copy.write_row((agent_id, broker_id))
    conn.execute(
        "UPDATE new_accounts n SET broker_id = h.broker_id FROM new_homes h"
        " WHERE n.agent_id = h.agent_id"
    )


def _names(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(a) for a in ids[:5])
    return shown + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def revoke(conn: Conn, agent_id: str, *, reason: str = "revoked") -> int | None:
    """Take the agent's account away and show it disconnected at once (status offline,
    reason `revoked`): the broker drops it when the files are reloaded. Its home
    broker, or None when it is not in the registry (AccountError: no account)."""
    lock(conn)
    row = conn.execute(
        "SELECT password_hash IS NOT NULL, coalesce(broker_id, 1) FROM agents"
        " WHERE agent_id = %s FOR UPDATE",
        (agent_id,),
    ).fetchone()
    if row is None:
        return None
    has_account, broker_id = row
    if not has_account:
        raise AccountError(
            f"agent {agent_id!r} has no broker account (never provisioned, or revoked)"
        )
    conn.execute(
        """
        UPDATE agents SET password_hash = NULL, revoked_at = now(), status = 'offline',
               status_reason = 'revoked', status_changed_at = clock_timestamp(),
               stale = false, updated_at = now()
         WHERE agent_id = %s
        """,
        (agent_id,),
    )
    epoch = conn.execute(
        """
        INSERT INTO agent_status_events (time, agent_id, state, epoch, reason, source, accepted)
        SELECT clock_timestamp(), agent_id, 'offline', status_epoch, 'revoked', 'operator', true
          FROM agents WHERE agent_id = %s
        RETURNING epoch
        """,
        (agent_id,),
    ).fetchone()
    offline = status_event(agent_id, "offline", epoch[0] if epoch else None, "revoked", "operator")
    record_sync(conn, [offline])
    _count(conn, {broker_id: -1})
    security_event(conn, agent_id, "credentials_revoked", {"broker_id": broker_id, "by": reason})
    return int(broker_id)


def delete(conn: Conn, agent_id: str) -> bool:
    """Remove the agent from the registry (its account first, if any), with what hangs
    off its row: inventory, changes, per-deployment status, and its tasks (a task
    needs its agent). Time series (telemetry, status history, task and deployment
    events) and security events stay. False when there was no such agent."""
    lock(conn)
    row = conn.execute(
        "SELECT password_hash IS NOT NULL FROM agents WHERE agent_id = %s FOR UPDATE",
        (agent_id,),
    ).fetchone()
    if row is None:
        return False
    if row[0]:
        revoke(conn, agent_id, reason="deleted")
    conn.execute("DELETE FROM tasks WHERE agent_id = %s", (agent_id,))
    conn.execute("DELETE FROM agents WHERE agent_id = %s", (agent_id,))
    security_event(conn, agent_id, "deleted", {})
    return True


def security_event(conn: Conn, agent_id: str, event: str, detail: dict[str, Any]) -> None:
    """The CLI's security events (service/domains/security.py writes them all)."""
    security_event_sync(conn, agent_id, event, detail)


def account_hashes(conn: Conn, agent_ids: Iterable[str] | None = None) -> dict[str, str]:
    """agent_id -> password hash of every agent with an account (to rebuild the file)."""
    rows = conn.execute(
        "SELECT agent_id, password_hash FROM agents WHERE password_hash IS NOT NULL"
        " ORDER BY agent_id"
    ).fetchall()
    wanted = set(agent_ids) if agent_ids is not None else None
    return {a: h for a, h in rows if wanted is None or a in wanted}
