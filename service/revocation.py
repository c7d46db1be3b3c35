"""Certificate identities on the brokers: the CRL they read, and revocation.

An agent with a certificate (CN = agent_id, signed by the fleet's CA) connects on a
broker's certificate listener, which needs no account file: a new agent costs the
brokers nothing. Revoking one takes three steps (docs/broker.md, "Certificate
identities"), because Mosquitto 2.0 checks a certificate only at the TLS handshake:

1. the CRL (`AUTH_DIR/agents.crl`, every revoked certificate not yet expired, signed
   by the CA) is rewritten, temp file + rename;
2. every broker of the auth folder gets a SIGHUP: it re-creates the certificate
   listener's TLS context with the new CRL, so every later handshake checks it;
3. a connection already open is not checked again, so it is ended by taking over its
   client id (= its CN) on each broker's service listener with the operator's
   account: MQTT 5, clean start, no session kept, then a normal DISCONNECT. The
   takeover connects after the SIGHUP was sent, and Mosquitto handles the signal
   before it reads a connection made later, so the agent's reconnect meets the CRL.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterable, Sequence

from cryptography import x509

from schemas.config import MqttUrl
from service.identity import AuthDir
from service.mqtt import MqttConnectError, connect, connect_properties, make_client
from service.stack.tls import CRL_DAYS, Signer, crl_serials

# A CRL this close to its nextUpdate is signed again when a broker starts.
RENEW_BEFORE = datetime.timedelta(days=CRL_DAYS // 2)


def publish_crl(
    auth: AuthDir, signer: Signer, revoked: Iterable[tuple[int, datetime.datetime]]
) -> int:
    """Write the CRL of `revoked` (serial, revoked_at) and reload every broker of the
    folder (how many were told)."""
    pem = signer.crl(revoked)
    with auth.lock():
        auth.write_crl(pem)
        return auth.reload()


def ensure_crl(auth: AuthDir, signer: Signer) -> None:
    """Before a broker with a certificate listener starts (Mosquitto refuses to start
    it without a readable CRL): an empty CRL when there is none, or none of this CA;
    the same entries signed again when it would expire within RENEW_BEFORE (an expired
    CRL fails every handshake). `stack up` then rewrites it from the registry."""
    try:
        crl = x509.load_pem_x509_crl(auth.crl_file.read_bytes())
        ours = crl.issuer == signer.cert.subject and crl.is_signature_valid(signer.key.public_key())
    except (OSError, ValueError):
        crl, ours = None, False
    now = datetime.datetime.now(datetime.UTC)
    if crl is not None and ours:
        next_update = crl.next_update_utc
        if next_update is not None and next_update - now > RENEW_BEFORE:
            return
        entries = [(r.serial_number, r.revocation_date_utc) for r in crl]
    else:
        entries = []
    with auth.lock():
        auth.write_crl(signer.crl(entries))


def listed(auth: AuthDir) -> set[int]:
    """The serials the CRL file lists now (none when it is missing or unreadable)."""
    try:
        return crl_serials(auth.crl_file.read_bytes())
    except (OSError, ValueError):
        return set()


async def _take_over(url: MqttUrl, agent_id: str, ca_file: str | None, connack_s: float) -> None:
    client = make_client(url, agent_id, ca_file=ca_file)
    try:
        await connect(
            client,
            url,
            clean_start=True,
            properties=connect_properties(session_expiry=0),
            connack_timeout=connack_s,
        )
    except TimeoutError:
        raise MqttConnectError(f"no answer from broker {url} within {connack_s:g} s") from None

    def leave() -> None:
        client.disconnect()
        client.loop_stop()

    await asyncio.to_thread(leave)


async def _take_over_all(
    urls: Sequence[MqttUrl], agent_id: str, ca_file: str | None, connack_s: float
) -> list[str]:
    results = await asyncio.gather(
        *(_take_over(u, agent_id, ca_file, connack_s) for u in urls), return_exceptions=True
    )
    failed: list[str] = []
    for url, result in zip(urls, results, strict=True):
        if isinstance(result, BaseException):
            mqtt = isinstance(result, MqttConnectError)  # its message names the broker
            failed.append(str(result) if mqtt else f"{url.endpoint}: {result!r}")
    return failed


def confirm_reload(urls: Sequence[MqttUrl], *, connack_s: float = 10.0) -> list[str]:
    """Wait until each broker has applied a reload signalled before this call: a
    connection made now is answered only after it (Mosquitto handles the signal
    before it reads that CONNECT). Needed for the CRL alone: a TLS connection is bound
    to the listener's context when it is accepted, so one accepted in the loop round
    of the signal would still be checked against the old CRL. The brokers that did not
    answer, one line each."""
    return asyncio.run(_take_over_all(urls, "eucora-reload-check", None, connack_s))


def drop_connections(
    agent_id: str, urls: Sequence[MqttUrl], *, ca_file: str | None = None, connack_s: float = 10.0
) -> list[str]:
    """End the agent's connection (and session) on each broker by taking over its
    client id with the accounts in `urls` (the brokers' service listeners, all at
    once). The brokers that could not be reached or refused us, one line each
    (without passwords); empty when every one was done."""
    return asyncio.run(_take_over_all(urls, agent_id, ca_file, connack_s))
