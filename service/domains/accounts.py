"""Agents' broker accounts in the registry: the brokers, home brokers, provisioning,
revocation, deletion (docs/broker.md). The database is the source of truth; the
password files the brokers read follow it (service/identity.py), and so does the CRL
of the certificate listeners (revoked_certificates, service/revocation.py).

An agent's account is a password (`password_hash`) or a client certificate
(`cert_serial`, migration 0013), never both.

Synchronous (psycopg.Connection), unlike the bridge's domains: only the CLI, the
stack and the benchmarks call these, and a bulk provisioning is one COPY. Each
function runs in its caller's transaction; `lock` serialises provisioners, so two
of them never pick home brokers from the same counts or write the files crosswise.
"""

from __future__ import annotations

import datetime
import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from service.domains.agents import status_event
from service.domains.events import record_sync
from service.domains.security import security_event

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
    # What agents with a certificate are given; None: no certificate listener there.
    cert_agent_url: str | None = None


class AccountError(RuntimeError):
    """A request the registry refuses (unknown agent, already provisioned...)."""


def lock(conn: Conn) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))


# An agent has an account: a password or a certificate (SQL, on `agents`).
HAS_ACCOUNT = "(password_hash IS NOT NULL OR cert_serial IS NOT NULL)"


def register_brokers(conn: Conn, brokers: Sequence[tuple[int, str, str, str | None]]) -> None:
    """(broker_id, url, agent_url, cert_agent_url) of brokers that run: added, or their
    URLs updated (a stack restarted on other ports); every broker's agent count
    recounted. Agents keep their home broker."""
    for broker_id, url, agent_url, cert_agent_url in brokers:
        conn.execute(
            """
            INSERT INTO brokers (broker_id, url, agent_url, cert_agent_url)
            VALUES (%s, %s, %s, %s)
            ON CONFLICT (broker_id) DO UPDATE SET url = EXCLUDED.url,
                   agent_url = EXCLUDED.agent_url, cert_agent_url = EXCLUDED.cert_agent_url
            """,
            (broker_id, url, agent_url, cert_agent_url),
        )
    conn.execute(
        f"""
        UPDATE brokers b SET agents = coalesce(n.agents, 0)
          FROM brokers b2
          LEFT JOIN (SELECT coalesce(broker_id, 1) AS broker_id, count(*) AS agents
                       FROM agents WHERE {HAS_ACCOUNT} GROUP BY 1) n
                 USING (broker_id)
         WHERE b.broker_id = b2.broker_id
        """
    )


BROKERS_SQL = (
    "SELECT broker_id, url, agent_url, accepting, agents, cert_agent_url FROM brokers"
    " ORDER BY broker_id"
)


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
    agent_url: str  # the home's cert_agent_url for a certificate identity


@dataclass(frozen=True)
class Certificate:
    """What the registry keeps of an agent's certificate: enough to revoke it."""

    serial: int
    not_after: datetime.datetime

    @property
    def hex(self) -> str:
        return format(self.serial, "x")


def provision(
    conn: Conn,
    hashes: Mapping[str, str],
    *,
    rotate: bool = False,
    certificates: Mapping[str, Certificate] | None = None,
) -> list[Provisioned]:
    """Give these agents accounts in the registry, in one COPY: a password (`hashes`:
    agent_id -> hash) or a certificate (`certificates`), one identity per agent.

    New agents (and agents known but without an account: never provisioned, or
    revoked) get a home broker; with `rotate` (passwords only), every agent must
    already have a password account and keeps its home. Raises AccountError, changing
    nothing, when an agent already has an account (without `rotate`) or has none (with
    it), or when a certificate agent's home broker has no certificate listener.
    """
    certificates = certificates or {}
    if not hashes and not certificates:
        return []
    if rotate and certificates:
        raise AccountError("certificates are not rotated: revoke, then provision again")
    lock(conn)
    known = {r.broker_id: r for r in brokers(conn)}
    if not known:
        raise AccountError(
            "no broker is registered in the database: `eucora stack up` registers its "
            "brokers (docs/broker.md)"
        )
    conn.execute("DROP TABLE IF EXISTS pg_temp.new_accounts, pg_temp.new_homes")
    conn.execute(
        "CREATE TEMP TABLE new_accounts (agent_id text PRIMARY KEY, password_hash text,"
        " cert_serial text, cert_not_after timestamptz, broker_id integer) ON COMMIT DROP"
    )
    columns = "agent_id, password_hash, cert_serial, cert_not_after"
    with conn.cursor().copy(f"COPY new_accounts ({columns}) FROM STDIN") as copy:
        for agent_id, hashed in hashes.items():
            copy.write_row((agent_id, hashed, None, None))
        for agent_id, cert in certificates.items():
            copy.write_row((agent_id, None, cert.hex, cert.not_after))
    conn.execute("ANALYZE new_accounts")  # a few rows join by index, a fleet by hash
    rows = conn.execute(
        """
        SELECT n.agent_id, a.agent_id IS NOT NULL, a.password_hash IS NOT NULL
               OR a.cert_serial IS NOT NULL, a.broker_id, a.cert_serial IS NOT NULL
          FROM new_accounts n LEFT JOIN agents a USING (agent_id)
         ORDER BY n.agent_id
        """
    ).fetchall()
    have = [r[0] for r in rows if r[2]]
    if rotate and len(have) < len(rows):
        missing = [r[0] for r in rows if not r[2]]
        raise AccountError(f"no account for {_names(missing)}: provision without --rotate")
    with_cert = [r[0] for r in rows if r[4]]
    if rotate and with_cert:
        raise AccountError(
            f"{_names(with_cert)} {'has' if len(with_cert) == 1 else 'have'} a certificate,"
            " not a password: `eucora agents revoke`, then `agents provision --cert` again"
        )
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
    no_listener = [a for a in certificates if known[homes[a]].cert_agent_url is None]
    if no_listener:
        broker_ids = sorted({homes[a] for a in no_listener})
        raise AccountError(
            f"the home broker of {_names(sorted(no_listener))} ({', '.join(map(str, broker_ids))})"
            " has no certificate listener (brokers.cert_agent_url is NULL: a broker with TLS"
            " gets one when it starts; docs/broker.md)"
        )
    _set_homes(conn, homes)
    conn.execute(
        """
        INSERT INTO agents (agent_id, broker_id, password_hash, cert_serial, cert_not_after,
                            provisioned_at)
        SELECT agent_id, broker_id, password_hash, cert_serial, cert_not_after, now()
          FROM new_accounts
        ON CONFLICT (agent_id) DO UPDATE
           SET broker_id = EXCLUDED.broker_id, password_hash = EXCLUDED.password_hash,
               cert_serial = EXCLUDED.cert_serial, cert_not_after = EXCLUDED.cert_not_after,
               provisioned_at = now(), revoked_at = NULL, updated_at = now()
        """
    )
    if not rotate:
        _count(conn, Counter(homes.values()))
    details = {a: {"broker_id": homes[a]} for a in hashes} | {
        a: {"broker_id": homes[a], "identity": "certificate", "serial": c.hex}
        for a, c in certificates.items()
    }
    security_event(
        conn,
        "credentials_rotated" if rotate else "provisioned",
        [(a, details[a]) for a in sorted(details)],
    )
    urls = {a: known[homes[a]].agent_url for a in hashes} | {
        a: str(known[homes[a]].cert_agent_url) for a in certificates
    }
    return [Provisioned(a, homes[a], urls[a]) for a in [*hashes, *certificates]]


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


@dataclass(frozen=True)
class Revoked:
    broker_id: int  # its home
    # A certificate identity: its serial is now in revoked_certificates, so the CRL
    # must be rebuilt (and the connected agent dropped: the broker does not re-check a
    # connected client against a new CRL).
    certificate: bool


def revoke(conn: Conn, agent_id: str, *, reason: str = "revoked") -> Revoked | None:
    """Take the agent's account away and show it disconnected at once (status offline,
    reason `revoked`): the broker drops it when the files are reloaded (a password) or
    the CRL lists it and its connection is taken over (a certificate). None when it is
    not in the registry (AccountError: no account)."""
    lock(conn)
    row = conn.execute(
        "SELECT password_hash IS NOT NULL, cert_serial, cert_not_after, coalesce(broker_id, 1)"
        " FROM agents WHERE agent_id = %s FOR UPDATE",
        (agent_id,),
    ).fetchone()
    if row is None:
        return None
    has_password, serial, not_after, broker_id = row
    if not has_password and serial is None:
        raise AccountError(
            f"agent {agent_id!r} has no broker account (never provisioned, or revoked)"
        )
    if serial is not None:
        # Kept past `agents delete`: the CRL lists it until the certificate expires.
        conn.execute(
            "INSERT INTO revoked_certificates (serial, agent_id, not_after) VALUES (%s, %s, %s)"
            " ON CONFLICT (serial) DO NOTHING",
            (serial, agent_id, not_after),
        )
    conn.execute(
        """
        UPDATE agents SET password_hash = NULL, cert_serial = NULL, cert_not_after = NULL,
               revoked_at = now(), status = 'offline',
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
    details: dict[str, object] = {"broker_id": broker_id, "by": reason}
    if serial is not None:
        details["serial"] = serial
    security_event(conn, "credentials_revoked", [(agent_id, details)])
    return Revoked(int(broker_id), certificate=serial is not None)


def revoked_certificates(conn: Conn) -> list[tuple[int, datetime.datetime]]:
    """(serial, revoked_at) of every revoked certificate not yet expired: the CRL's
    entries (an expired one is refused by the handshake anyway)."""
    rows = conn.execute(
        "SELECT serial, revoked_at FROM revoked_certificates WHERE not_after > now()"
        " ORDER BY revoked_at, serial"
    ).fetchall()
    return [(int(serial, 16), when) for serial, when in rows]


@dataclass(frozen=True)
class Deleted:
    revoked: Revoked | None  # its account, when it still had one


def delete(conn: Conn, agent_id: str) -> Deleted | None:
    """Remove the agent from the registry (its account first, if any), with what hangs
    off its row: inventory, changes, per-deployment status, and its tasks (a task
    needs its agent). Time series (telemetry, status history, task and deployment
    events), security events and its revoked certificates stay. None when there was
    no such agent."""
    lock(conn)
    row = conn.execute(
        f"SELECT {HAS_ACCOUNT} FROM agents WHERE agent_id = %s FOR UPDATE", (agent_id,)
    ).fetchone()
    if row is None:
        return None
    revoked = revoke(conn, agent_id, reason="deleted") if row[0] else None
    conn.execute("DELETE FROM tasks WHERE agent_id = %s", (agent_id,))
    conn.execute("DELETE FROM agents WHERE agent_id = %s", (agent_id,))
    security_event(conn, "deleted", [(agent_id, {})])
    return Deleted(revoked)


def account_hashes(conn: Conn, agent_ids: Iterable[str] | None = None) -> dict[str, str]:
    """agent_id -> password hash of every agent with an account (to rebuild the file)."""
    rows = conn.execute(
        "SELECT agent_id, password_hash FROM agents WHERE password_hash IS NOT NULL"
        " ORDER BY agent_id"
    ).fetchall()
    wanted = set(agent_ids) if agent_ids is not None else None
    return {a: h for a, h in rows if wanted is None or a in wanted}
