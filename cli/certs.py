"""Certificate identities for `eucora agents provision --cert` and `revoke`/`delete`.

Provisioning signs each agent's certificate (CN = agent_id) with the fleet's CA key
and writes key, certificate and config to files: nothing on the brokers changes.
Revoking one lists its serial in the CRL, reloads the brokers and takes its client id
over on each broker's service listener with the operator's account, which drops the
connected agent (service/revocation.py; docs/broker.md, "Certificate identities").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import fail
from schemas.config import ConfigError, MqttUrl

if TYPE_CHECKING:
    import psycopg

    from service.identity import AuthDir
    from service.stack.tls import Signer

CA_KEY_ENV = "EUCORA_CA_KEY"
CaKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--ca-key",
        envvar=CA_KEY_ENV,
        show_envvar=True,
        help="the fleet CA's private key (`eucora stack env` prints it): signs agents'"
        " certificates and the list of revoked ones",
    ),
]
CaFileOption = Annotated[
    Path | None,
    typer.Option(
        envvar="EUCORA_CA_FILE",
        show_envvar=True,
        help="CA certificate of the brokers' TLS listeners, given to agents (mqtts://)",
    ),
]
MqttUrlOption = Annotated[
    str | None,
    typer.Option(
        "--mqtt-url",
        envvar="EUCORA_MQTT_URL",
        show_envvar=True,
        help="the operator's broker account (mqtt://eucora-operator:PASSWORD@host:port):"
        " revoking a certificate drops the connected agent with it on every broker",
    ),
]


def signer(ca_file: Path | None, ca_key: Path | None, doing: str) -> Signer:
    """The CA to sign with, or exit 2 saying which setting is missing."""
    from service.stack.tls import Signer

    if ca_key is None:
        fail(f"{doing} needs the CA's private key: set {CA_KEY_ENV} or --ca-key"
             " (`eucora stack env` prints it)")  # fmt: skip
    if ca_file is None:
        fail(f"{doing} needs the CA certificate: set EUCORA_CA_FILE or --ca-file")
    try:
        return Signer.load(ca_file, ca_key)
    except (OSError, ValueError) as exc:
        fail(f"cannot use the CA key {ca_key}: {getattr(exc, 'strerror', None) or exc}")


def operator_url(mqtt_url: str | None, agent_id: str) -> MqttUrl:
    """The operator's account, required to drop a connected certificate agent."""
    if not mqtt_url:
        fail(
            f"{agent_id!r} has a certificate: revoking it drops its connection with the"
            " operator's broker account; set EUCORA_MQTT_URL or --mqtt-url (`eucora stack"
            " env` prints it). Nothing was changed"
        )
    try:
        url = MqttUrl.parse(mqtt_url, var="--mqtt-url / EUCORA_MQTT_URL")
    except ConfigError as exc:
        fail(str(exc))
    if not url.username or not url.password:
        fail("EUCORA_MQTT_URL must carry the operator's account (mqtt://USER:PASSWORD@...)")
    return url


def paths(config: Path, agent_id: str) -> tuple[Path, Path]:
    """Where an agent's certificate and key go: beside its config, named by its id."""
    cert, key = config.parent / f"{agent_id}.crt", config.parent / f"{agent_id}.key"
    if config in (cert, key):
        fail(f"--output {config}: name the config file something else than {config.name}")
    return cert, key


def revoke_certificate(
    conn: psycopg.Connection[Any],
    auth: AuthDir,
    agent_id: str,
    *,
    mqtt_url: str | None,
    ca_file: Path | None,
    ca_key: Path | None,
) -> list[MqttUrl]:
    """In the revoking transaction: the CRL rewritten from the registry's revoked
    certificates and every broker of the folder reloaded. Returns the brokers' service
    listeners with the operator's account, where the caller then takes the agent's
    client id over (after COMMIT). Exits 2, changing nothing, without the operator's
    account or the CA key."""
    from service import revocation
    from service.domains import accounts
    from service.domains.brokers import with_credentials

    operator = operator_url(mqtt_url, agent_id)
    sign = signer(ca_file, ca_key, f"revoking {agent_id!r} (a certificate)")
    urls = [with_credentials(b, operator) for b in accounts.brokers(conn)]
    revocation.publish_crl(auth, sign, accounts.revoked_certificates(conn))
    return urls


def drop(agent_id: str, urls: list[MqttUrl], ca_file: Path | None) -> None:
    """Take the agent's client id over on every broker: its connections end now."""
    from service import revocation

    failed = revocation.drop_connections(agent_id, urls, ca_file=str(ca_file) if ca_file else None)
    if failed:
        fail(
            f"{agent_id!r} is revoked (registry, CRL, brokers reloaded: no new connection),"
            f" but a connection it has open stays until it reconnects on: {'; '.join(failed)}",
            code=1,
        )
