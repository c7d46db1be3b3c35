"""`eucora agents provision ID` / `eucora agents revoke ID`: an agent's broker identity.

Both talk to the broker's dynamic security plugin with the admin account
(EUCORA_MQTT_ADMIN_URL) and take effect at once, without a broker restart.
docs/broker.md explains the security model.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from cli.common import emit_json, fail
from schemas.config import DEFAULT_TOPIC_ROOT, ConfigError, MqttUrl, check_topic_root
from schemas.topics import TopicTree, is_agent_id
from service import dynsec
from service.broker_admin import BrokerAdmin
from service.config import ADMIN_URL_ENV

AdminUrlOption = Annotated[
    str | None,
    typer.Option(
        envvar=ADMIN_URL_ENV,
        show_envvar=True,
        help="the broker's admin account: mqtt://eucora-admin:PASSWORD@host:port",
    ),
]
CaFileOption = Annotated[
    Path | None,
    typer.Option(
        envvar="EUCORA_CA_FILE",
        show_envvar=True,
        help="CA certificate of the broker's TLS listener (for mqtts:// URLs)",
    ),
]
TopicRootOption = Annotated[
    str,
    typer.Option(
        envvar="EUCORA_TOPIC_ROOT", show_envvar=True, help="the topic root of the agents' ACLs"
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON document")]


def _admin(admin_url: str | None, ca_file: Path | None, topic_root: str) -> BrokerAdmin:
    if not admin_url:
        fail(f"{ADMIN_URL_ENV} is not set (`eucora stack env` prints it for the local stack)")
    try:
        url = MqttUrl.parse(admin_url, var=ADMIN_URL_ENV)
        tree = TopicTree(check_topic_root(topic_root))
    except ConfigError as exc:
        fail(str(exc))
    return BrokerAdmin(url, tree=tree, ca_file=str(ca_file) if ca_file else None)


def _check_id(agent_id: str) -> None:
    if not is_agent_id(agent_id):
        fail(
            f"invalid agent id {agent_id!r}: 1-64 characters, letters, digits, '_', '.' "
            "and '-', starting with a letter or digit"
        )


def _agent_endpoint(agent_url: str | None, mqtt_url: str | None, admin_url: str) -> MqttUrl:
    """Where agents connect: --agent-url, else the host and port of EUCORA_MQTT_URL,
    else those of the admin URL. Credentials in these URLs are never passed on."""
    for value, var in (
        (agent_url, "EUCORA_AGENT_MQTT_URL"),
        (mqtt_url, "EUCORA_MQTT_URL"),
        (admin_url, ADMIN_URL_ENV),
    ):
        if value:
            try:
                return MqttUrl.parse(value, var=var)
            except ConfigError as exc:
                fail(str(exc))
    raise AssertionError("the admin URL is always set here")


def _stage_output(path: Path, doc: dict[str, Any]) -> Path:
    """Write the config next to `path` (mode 0600) before the account exists, so a
    folder we cannot write is found before a password is issued that nobody keeps;
    the caller renames it into place once the broker has accepted the account."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    return Path(tmp)


def provision(
    agent_id: Annotated[
        str, typer.Argument(help="the agent's id: its MQTT client id and username")
    ],
    rotate: Annotated[
        bool,
        typer.Option(
            "--rotate",
            help="the agent exists: give it a new password (a connected agent is "
            "disconnected and must reconnect with the new one)",
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="write the agent's config (JSON, with the password) to this file, mode "
            "0600; the password is then not printed",
        ),
    ] = None,
    json: JsonOption = False,
    admin_url: AdminUrlOption = None,
    agent_url: Annotated[
        str | None,
        typer.Option(
            envvar="EUCORA_AGENT_MQTT_URL",
            show_envvar=True,
            help="the URL agents connect to (default: host and port of EUCORA_MQTT_URL)",
        ),
    ] = None,
    mqtt_url: Annotated[str | None, typer.Option(envvar="EUCORA_MQTT_URL", hidden=True)] = None,
    ca_file: CaFileOption = None,
    topic_root: TopicRootOption = DEFAULT_TOPIC_ROOT,
) -> None:
    """Create an agent's broker account, allowed exactly its own topics; print its config.

    The password is shown (or written) once: the broker keeps only a hash.
    """
    _check_id(agent_id)
    admin = _admin(admin_url, ca_file, topic_root)
    assert admin_url is not None
    endpoint = _agent_endpoint(agent_url, mqtt_url, admin_url)
    password = dynsec.new_password()
    doc: dict[str, Any] = {
        "agent_id": agent_id,
        "mqtt_url": endpoint.endpoint,
        "username": agent_id,
        "password": password,
        # Without TLS there is nothing to trust; with mqtts and no --ca-file the
        # broker's certificate must chain to the agent's system trust store.
        "ca_file": str(ca_file.resolve()) if endpoint.tls and ca_file else None,
    }
    if output is not None and output.is_dir():
        fail(f"--output {output} is a folder: name the file to write")
    staged = _stage_output(output, doc) if output else None
    try:
        with admin:
            kind = admin.is_agent(agent_id)
            if kind is False:
                fail(f"{agent_id!r} is a service account, not an agent", code=1)
            if kind is None and rotate:
                fail(f"no agent {agent_id!r} on the broker: provision it without --rotate", code=1)
            if kind and not rotate:
                fail(
                    f"agent {agent_id!r} already has broker credentials: use --rotate for a "
                    "new password, or `eucora agents revoke` first",
                    code=1,
                )
            if rotate:
                admin.rotate(agent_id, password)
            else:
                admin.provision(agent_id, password)
            if staged is not None and output is not None:
                try:
                    os.replace(staged, output)
                    staged = None
                except OSError as exc:
                    if not rotate:  # nobody would know the password: undo
                        admin.revoke(agent_id)
                        fail(f"cannot write {output}: {exc.strerror}; {agent_id!r} not provisioned")
                    kept, staged = staged, None  # the only copy of the new password
                    fail(f"cannot write {output}: {exc.strerror}; the new password is in {kept}")
    except (ConnectionError, TimeoutError, dynsec.DynsecError) as exc:
        fail(f"cannot provision {agent_id!r}: {exc}", code=1)
    finally:
        if staged is not None:
            with contextlib.suppress(OSError):
                staged.unlink()
    action = "rotated" if rotate else "provisioned"
    if output:
        shown = {**doc, "password": None, "config_file": str(output.resolve())}
        if json:
            emit_json(shown)
        else:
            typer.echo(f"agent {agent_id} {action}: config with its password in {output}")
        return
    if json:
        emit_json(doc)
        return
    typer.echo(f"agent {agent_id} {action}")
    for key in ("mqtt_url", "username", "password", "ca_file"):
        typer.echo(f"  {key:<9} {doc[key] if doc[key] is not None else '-'}")
    typer.echo("The password is shown once; the broker keeps only its hash.")


def revoke(
    agent_id: Annotated[str, typer.Argument(help="the agent's id")],
    json: JsonOption = False,
    admin_url: AdminUrlOption = None,
    ca_file: CaFileOption = None,
    topic_root: TopicRootOption = DEFAULT_TOPIC_ROOT,
) -> None:
    """Delete an agent's broker account now: a connected agent is disconnected and
    cannot reconnect. Its records in the database stay."""
    _check_id(agent_id)
    admin = _admin(admin_url, ca_file, topic_root)
    try:
        with admin:
            kind = admin.is_agent(agent_id)
            if kind is None:
                fail(f"no agent {agent_id!r} on the broker", code=1)
            if kind is False:
                fail(f"{agent_id!r} is a service account, not an agent", code=1)
            admin.revoke(agent_id)
    except (ConnectionError, TimeoutError, dynsec.DynsecError) as exc:
        fail(f"cannot revoke {agent_id!r}: {exc}", code=1)
    if json:
        emit_json({"agent_id": agent_id, "revoked": True})
    else:
        typer.echo(f"agent {agent_id} revoked: its broker account is deleted")
