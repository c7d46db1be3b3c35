"""`eucora agents provision / revoke / delete`: agents' broker identities.

The registry (database) records each account's password hash and home broker; the
brokers read the accounts from the auth folder's password file (EUCORA_AUTH_DIR),
which these commands change and then reload every broker with SIGHUP. The database
change commits only after the files were written, so a failure leaves the registry
as it was. With `--cert` an agent gets a client certificate instead (cli/certs.py):
no file of the brokers changes. docs/broker.md explains the model.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import orjson
import typer

from cli import certs
from cli.common import EXIT_UNREACHABLE, emit_json, fail, open_database
from cli.db import DATABASE_URL_OPTION
from schemas.config import MqttUrl
from schemas.topics import is_agent_id
from service import identity
from service.domains import accounts

if TYPE_CHECKING:
    import psycopg

AuthDirOption = Annotated[
    Path | None,
    typer.Option(
        envvar=identity.AUTH_DIR_ENV,
        show_envvar=True,
        help="the auth folder the brokers read their accounts from (`eucora stack env`)",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON document")]


def auth_folder(auth_dir: Path | None) -> identity.AuthDir:
    if auth_dir is None:
        fail(f"{identity.AUTH_DIR_ENV} is not set (`eucora stack env` prints it)")
    if not auth_dir.is_dir():
        fail(f"auth folder {auth_dir} does not exist ({identity.AUTH_DIR_ENV}, --auth-dir)")
    return identity.AuthDir(auth_dir.resolve())


def _check_id(agent_id: str, where: str = "") -> None:
    if not is_agent_id(agent_id):
        fail(
            f"invalid agent id {agent_id!r}{where}: 1-64 characters, letters, digits, '_', "
            "'.' and '-', starting with a letter or digit"
        )
    if agent_id in identity.SERVICE_USERS:
        fail(f"{agent_id!r} is a service account, not an agent", code=1)


def read_ids(agent_ids: list[str], from_file: Path | None) -> list[str]:
    """The ids to provision: arguments, then F's lines (blank and `#` lines skipped,
    `-` = standard input); each checked, none twice."""
    found: list[str] = []
    for agent_id in agent_ids:
        _check_id(agent_id)
        found.append(agent_id)
    if from_file is not None:
        name = "standard input" if str(from_file) == "-" else str(from_file)
        try:
            text = sys.stdin.read() if str(from_file) == "-" else from_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}")
        for number, line in enumerate(text.splitlines(), 1):
            agent_id = line.strip()
            if agent_id and not agent_id.startswith("#"):
                _check_id(agent_id, f" (line {number} of {name})")
                found.append(agent_id)
    if not found:
        fail("no agent id given: name them, or --from-file F")
    seen: set[str] = set()
    for agent_id in found:
        if agent_id in seen:
            fail(f"agent id {agent_id!r} is given twice")
        seen.add(agent_id)
    return found


def _staged(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """A file (a config, a key: mode 0600; a certificate: 0644) written beside `path`
    before the registry commits, so a folder we cannot write is found before a
    credential is issued that nobody keeps; renamed into place after the COMMIT."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
    return Path(tmp)


def _config_bytes(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


def _targets(output: Path, ids: list[str], *, folder: bool = False) -> dict[str, Path]:
    """--output: the file for one agent; a folder (ID.json each) for several, or for
    one when `folder` (a certificate agent's three files)."""
    if len(ids) == 1 and not output.is_dir():
        return {ids[0]: output}
    if not output.is_dir():
        fail(f"--output {output}: with several agents, name an existing folder")
    if len(ids) == 1 and not folder:
        fail(f"--output {output} is a folder: name the file to write")
    return {a: output / f"{a}.json" for a in ids}


def provision(
    agent_ids: Annotated[
        list[str] | None,
        typer.Argument(help="the agents' ids: each its MQTT client id and username"),
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from-file",
            help="more ids, one per line (blank lines and lines starting with # are "
            "skipped); - reads standard input",
        ),
    ] = None,
    rotate: Annotated[
        bool,
        typer.Option(
            "--rotate",
            help="the agents have accounts: give them new passwords (a connected agent is "
            "disconnected and must reconnect with the new one)",
        ),
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="write each agent's config (JSON, with the password) to this file (a "
            "folder, ID.json each, for several agents), mode 0600; passwords are then "
            "not printed. With --cert the certificate and key go beside it (ID.crt, "
            "ID.key)",
        ),
    ] = None,
    cert: Annotated[
        bool,
        typer.Option(
            "--cert",
            help="a client certificate (CN = the agent id, signed with --ca-key) instead of"
            " a password, for the brokers' certificate listeners: nothing on the brokers"
            " changes; needs --output",
        ),
    ] = False,
    json: JsonOption = False,
    database_url: str | None = DATABASE_URL_OPTION,
    auth_dir: AuthDirOption = None,
    ca_file: certs.CaFileOption = None,
    ca_key: certs.CaKeyOption = None,
) -> None:
    """Give agents broker accounts, each allowed exactly its own topics, on a home
    broker; print their configs (one object for one id, a list for several).

    Passwords are shown (or written) once: the registry and the brokers keep hashes.
    Private keys (--cert) are written once, to --output: the registry keeps serials.
    """
    ids = read_ids(agent_ids or [], from_file)
    if cert:
        _provision_certificates(ids, output, json, database_url, ca_file, ca_key, rotate)
        return
    auth = auth_folder(auth_dir)
    passwords = {a: identity.new_password() for a in ids}
    hashes = {a: identity.hash_password(p) for a, p in passwords.items()}
    docs: dict[str, dict[str, Any]] = {}
    staged: dict[Path, Path] = {}
    targets = _targets(output, ids) if output is not None else {}
    conn = open_database(database_url)
    try:
        with conn:
            with conn.transaction():
                done = accounts.provision(conn, hashes, rotate=rotate)
                for p in done:
                    docs[p.agent_id] = _config(p, ca_file, password=passwords[p.agent_id])
                staged = {t: _staged(t, _config_bytes(docs[a])) for a, t in targets.items()}
                # Files before COMMIT: a failure here rolls the registry back.
                change = identity.replace_agents if rotate else identity.add_agents
                told = change(auth, hashes)
            _place(staged)
    except accounts.AccountError as exc:
        fail(str(exc), code=1)
    except psycopg_error() as exc:
        database_failed(exc, "cannot provision")
    except (identity.IdentityError, OSError) as exc:
        fail(f"cannot provision: {exc}", code=1)
    finally:
        _discard(staged)
    if told == 0:
        typer.echo(
            f"warning: no running broker reads {auth.path}: the accounts apply when one starts",
            err=True,
        )
    _print(docs, targets, ids, json, "rotated" if rotate else "provisioned")


def _provision_certificates(
    ids: list[str],
    output: Path | None,
    as_json: bool,
    database_url: str | None,
    ca_file: Path | None,
    ca_key: Path | None,
    rotate: bool,
) -> None:
    """`provision --cert`: a key and a certificate per agent, signed here, and one
    COPY into the registry; no broker file, no reload (the certificate listeners trust
    the CA). Key, certificate and config go to files: a private key is never printed."""
    if rotate:
        fail("--rotate does not renew certificates: `eucora agents revoke ID`, then"
             " `eucora agents provision ID --cert` again")  # fmt: skip
    if output is None:
        fail("--cert writes each agent's private key to a file: give --output FILE (one"
             " agent) or --output DIR (DIR/ID.json, ID.crt, ID.key)")  # fmt: skip
    targets = _targets(output, ids, folder=True)
    sign = certs.signer(ca_file, ca_key, "--cert")
    assert ca_file is not None  # certs.signer exits without it
    issued = {a: sign.issue_client(a) for a in ids}
    files = {a: certs.paths(t, a) for a, t in targets.items()}
    docs: dict[str, dict[str, Any]] = {}
    staged: dict[Path, Path] = {}
    conn = open_database(database_url)
    try:
        with conn:
            with conn.transaction():
                done = accounts.provision(
                    conn,
                    {},
                    certificates={
                        a: accounts.Certificate(c.serial, c.not_after) for a, c in issued.items()
                    },
                )
                for p in done:
                    crt, key = files[p.agent_id]
                    docs[p.agent_id] = _config(p, ca_file, cert_file=crt, key_file=key)
                for a, target in targets.items():
                    crt, key = files[a]
                    staged[key] = _staged(key, issued[a].key_pem, 0o600)
                    staged[crt] = _staged(crt, issued[a].cert_pem, 0o644)
                    staged[target] = _staged(target, _config_bytes(docs[a]))
            _place(staged)
    except accounts.AccountError as exc:
        fail(str(exc), code=1)
    except psycopg_error() as exc:
        database_failed(exc, "cannot provision")
    except OSError as exc:
        fail(f"cannot provision: {exc}", code=1)
    finally:
        _discard(staged)
    _print(docs, targets, ids, as_json, "provisioned")


def _place(staged: dict[Path, Path]) -> None:
    """Rename the staged files into place (after the COMMIT)."""
    for path in list(staged):
        os.replace(staged.pop(path), path)


def _discard(staged: dict[Path, Path]) -> None:
    for tmp in staged.values():
        with contextlib.suppress(OSError):
            tmp.unlink()


def _config(
    p: accounts.Provisioned,
    ca_file: Path | None,
    *,
    password: str | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> dict[str, Any]:
    tls = p.agent_url.startswith("mqtts://")
    return {
        "agent_id": p.agent_id,
        "mqtt_url": p.agent_url,
        "username": p.agent_id,
        "password": password,  # None with a certificate identity
        # Without TLS there is nothing to trust; with mqtts and no CA file the broker's
        # certificate must chain to the agent's system trust store.
        "ca_file": str(ca_file.resolve()) if tls and ca_file else None,
        # A certificate identity's files (absolute paths); None with a password.
        "cert_file": str(cert_file.resolve()) if cert_file else None,
        "key_file": str(key_file.resolve()) if key_file else None,
    }


def _print(
    docs: dict[str, dict[str, Any]],
    targets: dict[str, Path],
    ids: list[str],
    as_json: bool,
    action: str,
) -> None:
    shown = []
    for a in ids:
        doc = docs[a]
        if a in targets:
            doc = {**doc, "password": None, "config_file": str(targets[a].resolve())}
        shown.append(doc)
    if as_json:
        emit_json(shown[0] if len(shown) == 1 else shown)
        return
    for doc in shown:
        if doc["cert_file"]:
            typer.echo(f"agent {doc['agent_id']} {action}: config in {doc['config_file']},"
                       f" certificate {doc['cert_file']}, key {doc['key_file']}")  # fmt: skip
            continue
        if "config_file" in doc:
            typer.echo(f"agent {doc['agent_id']} {action}: config with its password in "
                       f"{doc['config_file']}")  # fmt: skip
            continue
        typer.echo(f"agent {doc['agent_id']} {action}")
        for key in ("mqtt_url", "username", "password", "ca_file"):
            typer.echo(f"  {key:<9} {doc[key] if doc[key] is not None else '-'}")
    if any("config_file" not in d for d in shown):
        typer.echo("Passwords are shown once; the registry and the brokers keep only hashes.")


def revoke(
    agent_id: Annotated[str, typer.Argument(help="the agent's id")],
    json: JsonOption = False,
    database_url: str | None = DATABASE_URL_OPTION,
    auth_dir: AuthDirOption = None,
    mqtt_url: certs.MqttUrlOption = None,
    ca_file: certs.CaFileOption = None,
    ca_key: certs.CaKeyOption = None,
) -> None:
    """Take an agent's broker account away now: every broker drops it if connected and
    refuses it from then on; the registry shows it disconnected (revoked) at once.
    Its records stay. An agent with a certificate needs the operator's account
    (EUCORA_MQTT_URL) and the CA key: its certificate is listed in the CRL and its
    connection taken over on every broker."""
    _check_id(agent_id)
    auth = auth_folder(auth_dir)
    conn = open_database(database_url)
    takeover: list[MqttUrl] = []
    try:
        with conn, conn.transaction():
            revoked = accounts.revoke(conn, agent_id)
            if revoked is None:
                fail(f"no agent {agent_id!r} in the registry", code=1)
            takeover = _withdraw(conn, auth, agent_id, revoked, mqtt_url, ca_file, ca_key)
    except accounts.AccountError as exc:
        fail(str(exc), code=1)
    except psycopg_error() as exc:
        database_failed(exc, f"cannot revoke {agent_id!r}")
    except (identity.IdentityError, OSError) as exc:
        fail(f"cannot revoke {agent_id!r}: {exc}", code=1)
    if takeover:
        certs.drop(agent_id, takeover, ca_file)
    if json:
        emit_json({"agent_id": agent_id, "revoked": True})
    else:
        typer.echo(f"agent {agent_id} revoked: its broker account is deleted")


def _withdraw(
    conn: psycopg.Connection[Any],
    auth: identity.AuthDir,
    agent_id: str,
    revoked: accounts.Revoked | None,
    mqtt_url: str | None,
    ca_file: Path | None,
    ca_key: Path | None,
) -> list[MqttUrl]:
    """The brokers' side of a revocation, before COMMIT: a password leaves the file
    (and every broker reloads); a certificate goes into the CRL (the same), and the
    service listeners where its connection must then be taken over are returned."""
    if revoked is not None and revoked.certificate:
        return certs.revoke_certificate(
            conn, auth, agent_id, mqtt_url=mqtt_url, ca_file=ca_file, ca_key=ca_key
        )
    identity.remove_agents(auth, [agent_id])
    return []


def delete(
    agent_id: Annotated[str, typer.Argument(help="the agent's id")],
    json: JsonOption = False,
    database_url: str | None = DATABASE_URL_OPTION,
    auth_dir: AuthDirOption = None,
    mqtt_url: certs.MqttUrlOption = None,
    ca_file: certs.CaFileOption = None,
    ca_key: certs.CaKeyOption = None,
) -> None:
    """Revoke an agent and remove it from the registry, with its inventory and tasks.
    Its telemetry, status history and security events stay (and a revoked
    certificate stays in the CRL until it expires)."""
    _check_id(agent_id)
    auth = auth_folder(auth_dir)
    conn = open_database(database_url)
    takeover: list[MqttUrl] = []
    try:
        with conn, conn.transaction():
            deleted = accounts.delete(conn, agent_id)
            if deleted is None:
                fail(f"no agent {agent_id!r} in the registry", code=1)
            takeover = _withdraw(conn, auth, agent_id, deleted.revoked, mqtt_url, ca_file, ca_key)
    except psycopg_error() as exc:
        database_failed(exc, f"cannot delete {agent_id!r}")
    except (identity.IdentityError, OSError) as exc:
        fail(f"cannot delete {agent_id!r}: {exc}", code=1)
    if takeover:
        certs.drop(agent_id, takeover, ca_file)
    if json:
        emit_json({"agent_id": agent_id, "deleted": True})
    else:
        typer.echo(f"agent {agent_id} deleted from the registry and the brokers")


def provision_fleet(
    conn: psycopg.Connection[Any], auth: identity.AuthDir, passwords: Mapping[str, str]
) -> dict[str, str]:
    """Accounts for a whole fleet, whether or not its agents had one before (the
    simulator's, a benchmark's): one transaction, one file write, one reload of every
    broker. Returns agent_id -> the home broker's agent URL."""
    hashes = {a: identity.hash_password(p) for a, p in passwords.items()}
    with conn.transaction():
        have = accounts.account_hashes(conn, hashes)
        done = accounts.provision(conn, {a: h for a, h in hashes.items() if a not in have})
        if have:
            done += accounts.provision(conn, {a: hashes[a] for a in have}, rotate=True)
            identity.replace_agents(auth, hashes)
        else:
            identity.add_agents(auth, hashes)
    return {p.agent_id: p.agent_url for p in done}


def database_failed(exc: Exception, doing: str) -> NoReturn:
    """A database error in the middle of a command: a lost connection is exit 4 (try
    again later), like a database that cannot be reached at all; anything else 1. The
    registry keeps what it had unless the connection went during COMMIT itself (then
    `agents show` tells)."""
    import psycopg

    from service.db.connect import connection_error_reason

    if isinstance(exc, psycopg.OperationalError):
        fail(
            f"lost the database in the middle of the command: {connection_error_reason(exc)};"
            " run it again once the database is back",
            EXIT_UNREACHABLE,
        )
    fail(f"{doing}: {exc}", code=1)


def psycopg_error() -> type[Exception]:
    """The database driver's base error (imported when a command runs, not at start)."""
    import psycopg

    return psycopg.Error
