"""Certificate identities: `eucora agents provision --cert` gives an agent a client
certificate (CN = agent_id, signed by the fleet's CA) for the brokers' certificate
listener; `revoke` lists it in the CRL, reloads the brokers and takes its connection
over. Real Mosquittos from mosquitto/eucora.conf, a real registry (docs/broker.md,
"Certificate identities").
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import socket
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner, Result

from agent import config as agent_config
from cli.main import app as eucora
from schemas.config import ConfigError, MqttUrl
from schemas.topics import AGENT_KINDS, Kind
from service import identity, revocation
from service.db.connect import connect
from service.stack.broker import Broker
from service.stack.stack import Stack
from service.stack.tls import CertificateAuthority, ClientCertificate, Signer, crl_serials
from tests.test_agents_support import LoopThread, loop_thread, wait
from tests.test_security import (
    TIMEOUT,
    TREE,
    Probe,
    cli,
    cli_env,
    query,
    register,
    service_probe,
)
from tests.test_shards import probes, shards

__all__ = ["loop_thread", "probes", "shards"]  # fixtures

runner = CliRunner()
RELOAD = "Reloading config."  # what Mosquitto 2.0.11 logs on SIGHUP (src/loop.c)


@pytest.fixture
def tls_broker(broker_factory: Callable[..., Broker], database: str) -> Broker:
    """A broker with TLS (so a certificate listener too), registered."""
    broker = broker_factory(tls=True)
    assert broker.cert_agent_url is not None
    register(broker, database)
    return broker


def env_of(broker: Broker, database: str, **more: str | None) -> dict[str, str | None]:
    """What `eval "$(eucora stack env)"` gives an operator, for one broker."""
    return cli_env(broker, database, **{
        "EUCORA_CA_FILE": str(broker.ca.cert_file),
        "EUCORA_CA_KEY": str(broker.ca.key_file),
        "EUCORA_MQTT_URL": broker.url(identity.OPERATOR_USER),
        **more,
    })  # fmt: skip


def run(env: dict[str, str | None], *args: str) -> Result:
    return runner.invoke(cli, list(args), env=env)


def provision_cert(env: dict[str, str | None], out: Path, *ids: str) -> Any:
    result = run(env, "provision", *ids, "--cert", "--output", str(out), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def cert_probe(
    probes: list[Probe], doc: dict[str, Any], *, client_id: str | None = None,
    url: str | None = None,
) -> Probe:  # fmt: skip
    """The agent as it connects: its certificate and key, no password."""
    target = MqttUrl.parse(url or doc["mqtt_url"])
    p = Probe(target.port, doc["username"], None, client_id or doc["agent_id"], tls=True,
              ca_file=doc["ca_file"], cert=(doc["cert_file"], doc["key_file"]))  # fmt: skip
    probes.append(p)
    return p


# An MQTT 3.1.1 CONNECT (client id "probe", clean session, keepalive 60).
CONNECT = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05probe"


def handshake(port: int, ca_file: str | Path, cert: tuple[str, str] | None = None) -> str:
    """What a TLS client with `cert` meets on `port`: "CONNACK 0" (accepted), another
    CONNACK code, or the TLS error the broker's refusal caused (TLS 1.3 sends it after
    the client's side of the handshake, so it shows at the first read; the alert's
    text, e.g. "certificate revoked", may be lost when the broker closes first)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if cert:
        context.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(CONNECT)
                answer = tls.recv(4)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
            return f"refused: {exc}"
    if answer[:2] == b"\x20\x02":
        return f"CONNACK {answer[3]}"
    return f"closed: {answer!r}"


def until(probe: Probe, match: Callable[[Any], bool], limit: int = 100) -> Any:
    """The first message `probe` receives that matches (each read waits TIMEOUT)."""
    for _ in range(limit):
        msg = probe.next_message()
        if match(msg):
            return msg
    raise AssertionError("no matching message")


def reloads(broker: Broker) -> int:
    return broker.log_file.read_text(errors="replace").count(RELOAD)


# --- provisioning and what a certificate agent can do ---------------------------------


def test_a_certificate_agent_works_on_the_certificate_listener(
    tls_broker: Broker, database: str, probes: list[Probe], tmp_path: Path,
    loop_thread: LoopThread,
) -> None:  # fmt: skip
    env = env_of(tls_broker, database)
    doc = provision_cert(env, tmp_path, "cert-1")
    crt, key, conf = (tmp_path / f"cert-1.{ext}" for ext in ("crt", "key", "json"))
    assert doc == {
        "agent_id": "cert-1", "mqtt_url": tls_broker.cert_agent_url, "username": "cert-1",
        "password": None, "ca_file": str(tls_broker.ca.cert_file), "cert_file": str(crt),
        "key_file": str(key), "config_file": str(conf),
    }  # fmt: skip
    saved = json.loads(conf.read_text())
    assert saved == {k: v for k, v in doc.items() if k != "config_file"}
    assert [stat.S_IMODE(p.stat().st_mode) for p in (key, crt, conf)] == [0o600, 0o644, 0o600]
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cert-1"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # The registry keeps the serial, no password; the audit trail says which identity.
    rows = query(database, "SELECT password_hash, cert_serial, broker_id FROM agents"
                 " WHERE agent_id = 'cert-1'")  # fmt: skip
    assert rows == [(None, format(cert.serial_number, "x"), 1)]
    (detail,) = query(database, "SELECT detail FROM security_events WHERE agent_id = 'cert-1'"
                      " AND event = 'provisioned'")  # fmt: skip
    assert detail[0]["identity"] == "certificate"

    # The config file is what the reference agent reads.
    config = agent_config.load(env={}, config_file=conf)
    assert (config.cert_file, config.key_file, config.password) == (str(crt), str(key), None)

    # Everything an agent publishes and receives, with its certificate alone.
    bridge = service_probe(probes, tls_broker, identity.BRIDGE_USER)
    assert bridge.subscribe(f"{TREE.root}/agents/#") == ["Granted QoS 1"]
    agent = cert_probe(probes, doc)
    assert agent.connect(clean_start=False, session_expiry=3600) == "Success"
    assert agent.subscribe(TREE.agent("cert-1", Kind.TASKS)) == ["Granted QoS 1"]
    for kind in AGENT_KINDS:
        assert agent.publish(TREE.agent("cert-1", kind), kind.encode()) == "Success"
    assert {bridge.next_message().topic for _ in AGENT_KINDS} == {
        TREE.agent("cert-1", k) for k in AGENT_KINDS
    }
    assert bridge.publish(TREE.agent("cert-1", Kind.TASKS), b'{"task":1}') == "Success"
    assert agent.next_message().payload == b'{"task":1}'
    # Another agent's topics stay closed to it.
    assert agent.publish(TREE.agent("cert-2", Kind.HEARTBEAT)) == "Not authorized"
    assert agent.publish(TREE.agent("cert-2", Kind.STATUS)) == "Not authorized"
    agent.close()

    # The reference agent's session, from that config: online, then its task.
    tasks: queue.Queue[bytes] = queue.Queue()
    loop_thread.session_at(
        config.mqtt, "cert-1", ca_file=config.ca_file, cert_file=config.cert_file,
        key_file=config.key_file, on_task=lambda payload: tasks.put(bytes(payload)),
    )  # fmt: skip
    until(
        bridge, lambda m: m.topic == TREE.agent("cert-1", Kind.STATUS) and b'"online"' in m.payload
    )
    assert bridge.publish(TREE.agent("cert-1", Kind.TASKS), b'{"task":2}') == "Success"
    assert tasks.get(timeout=TIMEOUT) == b'{"task":2}'


def test_the_client_id_is_the_certificates_cn(
    tls_broker: Broker, database: str, probes: list[Probe], tmp_path: Path
) -> None:
    """B's certificate under A's client id opens B's session, not A's: A stays connected
    and its tasks stay its own (use_identity_as_username + use_username_as_clientid)."""
    docs = {d["agent_id"]: d for d in provision_cert(env_of(tls_broker, database), tmp_path,
                                                      "cert-a", "cert-b")}  # fmt: skip
    a = cert_probe(probes, docs["cert-a"])
    assert a.connect(clean_start=False, session_expiry=3600) == "Success"
    assert a.subscribe(TREE.agent("cert-a", Kind.TASKS)) == ["Granted QoS 1"]
    thief = cert_probe(probes, docs["cert-b"], client_id="cert-a")
    assert thief.connect(clean_start=False, session_expiry=3600) == "Success"
    bridge = service_probe(probes, tls_broker, identity.BRIDGE_USER)
    assert bridge.publish(TREE.agent("cert-a", Kind.TASKS), b'{"for":"a"}') == "Success"
    assert a.next_message().payload == b'{"for":"a"}'
    assert thief.messages.empty()
    assert thief.publish(TREE.agent("cert-a", Kind.HEARTBEAT)) == "Not authorized"
    assert thief.publish(TREE.agent("cert-b", Kind.HEARTBEAT)) != "Not authorized"  # it is B
    assert not a.disconnected.is_set()
    assert a.publish(TREE.agent("cert-a", Kind.HEARTBEAT)) != "Not authorized"


def test_the_certificate_listener_refuses_everyone_else(
    tls_broker: Broker, database: str, probes: list[Probe], tmp_path: Path
) -> None:
    env = env_of(tls_broker, database)
    doc = provision_cert(env, tmp_path, "cert-ok")
    port, ca = tls_broker.cert_port, tls_broker.ca.cert_file
    assert port is not None
    assert handshake(port, ca, (doc["cert_file"], doc["key_file"])) == "CONNACK 0"
    # No certificate: TLS alone is not enough here.
    assert handshake(port, ca).startswith("refused")
    # A certificate with the right CN from another CA.
    other = CertificateAuthority(tmp_path / "other-ca").ensure("someone else's CA")
    forged = other.signer().issue_client("cert-ok")
    assert handshake(port, ca, files(tmp_path / "forged", forged)).startswith("refused")
    # Our CA's certificate, expired.
    expired = expired_certificate(tls_broker.ca.signer(), "cert-ok")
    assert handshake(port, ca, files(tmp_path / "expired", expired)).startswith("refused")
    # A password agent has no business here, nor a certificate on the password listener.
    password_agent = run(env, "provision", "pw-1", "--json")
    assert password_agent.exit_code == 0, password_agent.output
    assert handshake(port, ca).startswith("refused")
    assert tls_broker.tls_port is not None
    mine = (doc["cert_file"], doc["key_file"])
    on_password_listener = Probe(tls_broker.tls_port, "cert-ok", None, "cert-ok", tls=True,
                                 ca_file=str(ca), cert=mine)  # fmt: skip
    probes.append(on_password_listener)
    assert on_password_listener.connect() == "Not authorized"


def expired_certificate(signer: Signer, common_name: str) -> ClientCertificate:
    """Signed by the fleet's CA, valid yesterday only."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(signer.key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ClientCertificate(cert.public_bytes(pem), key_pem, cert.serial_number, now)


def files(folder: Path, cert: ClientCertificate) -> tuple[str, str]:
    folder.mkdir()
    (folder / "c.crt").write_bytes(cert.cert_pem)
    (folder / "c.key").write_bytes(cert.key_pem)
    return str(folder / "c.crt"), str(folder / "c.key")


def test_provisioning_a_certificate_agent_reloads_no_broker(
    tls_broker: Broker, database: str, probes: list[Probe], tmp_path: Path
) -> None:
    """The point of certificates: one more agent changes nothing a broker reads."""
    env = env_of(tls_broker, database)
    before = reloads(tls_broker)
    watched = [tls_broker.auth.agents_file, tls_broker.auth.crl_file]
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in watched]
    (tmp_path / "more").mkdir()
    provision_cert(env, tmp_path, "quiet-1")
    provision_cert(env, tmp_path / "more", "quiet-2", "quiet-3")
    assert cert_probe(probes, json.loads((tmp_path / "quiet-1.json").read_text())).connect() == (
        "Success"
    )
    assert [(p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in watched] == stamps
    assert reloads(tls_broker) == before
    # The control: a password agent, and a revocation, do reload every broker.
    assert run(env, "provision", "loud-1").exit_code == 0
    wait(lambda: reloads(tls_broker) == before + 1, TIMEOUT, "the broker to log its reload")


# --- revocation -----------------------------------------------------------------------


def test_revoke_drops_the_agent_on_every_broker_and_every_broker_refuses_it(
    shards: Stack, database: str, probes: list[Probe], tmp_path: Path
) -> None:
    env: dict[str, str | None] = {**shards.env()}
    assert env["EUCORA_CA_KEY"] == str(shards.dir / "ca" / "ca.key")  # `stack env` prints it
    brokers = shards.brokers()
    urls = [b.cert_agent_url for b in brokers]
    docs = {d["agent_id"]: d for d in provision_cert(env, tmp_path, "rv-1", "rv-2", "rv-3")}
    assert {d["mqtt_url"] for d in docs.values()} == set(urls)  # homes on both brokers
    victim = docs["rv-2"]
    # Connected to both brokers (its home with a persistent session), a bystander too.
    connections = [cert_probe(probes, victim, url=u) for u in urls]
    assert [c.connect(clean_start=False, session_expiry=3600) for c in connections] == [
        "Success",
        "Success",
    ]
    bystander = cert_probe(probes, docs["rv-3"])
    assert bystander.connect() == "Success"
    mine = (victim["cert_file"], victim["key_file"])

    result = runner.invoke(cli, ["revoke", "rv-2", "--json"], env=env)
    assert result.exit_code == 0, result.output
    for c in connections:
        assert c.disconnected.wait(TIMEOUT), "still connected after revoke"
    for b in brokers:
        assert b.cert_port is not None
        assert handshake(b.cert_port, victim["ca_file"], mine).startswith("refused")
    assert not bystander.disconnected.is_set()
    assert bystander.publish(TREE.agent("rv-3", Kind.HEARTBEAT)) != "Not authorized"
    # `agents list` shows it revoked and disconnected at once.
    listed = runner.invoke(eucora, ["agents", "list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    row = next(a for a in json.loads(listed.stdout) if a["agent_id"] == "rv-2")
    assert (row["state"], row["connected"]) == ("revoked", False)
    serial = format(x509.load_pem_x509_certificate(Path(mine[0]).read_bytes()).serial_number, "x")
    events = query(database, "SELECT event, detail->>'serial' FROM security_events"
                   " WHERE agent_id = 'rv-2' ORDER BY time")  # fmt: skip
    assert events == [("provisioned", serial), ("credentials_revoked", serial)]
    assert crl_serials(shards.auth_dir.joinpath("agents.crl").read_bytes()) == {int(serial, 16)}


def test_a_revoked_certificate_stays_revoked_through_reprovision_and_delete(
    tls_broker: Broker, database: str, probes: list[Probe], tmp_path: Path
) -> None:
    env = env_of(tls_broker, database)
    port = tls_broker.cert_port
    assert port is not None
    folders = [tmp_path / str(i) for i in range(3)]
    for f in folders:
        f.mkdir()
    first = provision_cert(env, folders[0], "again-1")
    assert run(env, "revoke", "again-1").exit_code == 0
    # Provisioned again: a new certificate that works; the old one stays refused.
    second = provision_cert(env, folders[1], "again-1")
    old, new = ((d["cert_file"], d["key_file"]) for d in (first, second))
    assert handshake(port, tls_broker.ca.cert_file, new) == "CONNACK 0"
    assert handshake(port, tls_broker.ca.cert_file, old).startswith("refused")
    # Deleted: both serials stay listed, also when the CRL is rebuilt for someone else.
    assert run(env, "delete", "again-1").exit_code == 0
    assert query(database, "SELECT 1 FROM agents WHERE agent_id = 'again-1'") == []
    provision_cert(env, folders[2], "later-1")
    assert run(env, "revoke", "later-1").exit_code == 0
    serials = {
        x509.load_pem_x509_certificate(Path(d["cert_file"]).read_bytes()).serial_number
        for d in (first, second)
    }
    assert serials < crl_serials(tls_broker.auth.crl_file.read_bytes())
    assert handshake(port, tls_broker.ca.cert_file, new).startswith("refused")
    crl = tls_broker.auth.crl_file
    assert stat.S_IMODE(crl.stat().st_mode) == 0o600
    assert crl.stat().st_uid == tls_broker.auth.path.stat().st_uid


def test_certificate_errors(
    tls_broker: Broker, broker_factory: Callable[..., Broker], database: str,
    probes: list[Probe], tmp_path: Path,
) -> None:  # fmt: skip
    env = env_of(tls_broker, database)
    out = str(tmp_path)
    no_output = run(env, "provision", "e-1", "--cert")
    assert no_output.exit_code == 2
    assert no_output.stderr.startswith("error: --cert writes each agent's private key to a file")
    no_key = run({**env, "EUCORA_CA_KEY": None}, "provision", "e-1", "--cert", "-o", out)
    assert no_key.exit_code == 2 and "EUCORA_CA_KEY" in no_key.stderr
    other = CertificateAuthority(tmp_path / "other").ensure()
    wrong = run({**env, "EUCORA_CA_KEY": str(other.key_file)}, "provision", "e-1", "--cert",
                "-o", out)  # fmt: skip
    assert wrong.exit_code == 2 and "is not the key of the CA certificate" in wrong.stderr
    rotate = run(env, "provision", "e-1", "--cert", "--rotate", "-o", out)
    assert rotate.exit_code == 2 and "agents revoke" in rotate.stderr
    assert query(database, "SELECT 1 FROM agents WHERE agent_id = 'e-1'") == []
    assert os.listdir(tmp_path) == ["other"]  # no key left behind

    doc = provision_cert(env, tmp_path, "e-2")
    twice = run(env, "provision", "e-2", "--cert", "-o", str(tmp_path / "other"))
    assert twice.exit_code == 1 and "already has broker credentials" in twice.stderr
    new_password = run(env, "provision", "e-2", "--rotate")
    assert (
        new_password.exit_code == 1 and "has a certificate, not a password" in new_password.stderr
    )
    unknown = run(env, "revoke", "nobody")
    assert unknown.exit_code == 1
    assert unknown.stderr.strip() == "error: no agent 'nobody' in the registry"

    # Without the operator's account a certificate agent is not revoked at all: it
    # would stay connected.
    agent = cert_probe(probes, doc)
    assert agent.connect() == "Success"
    refused = run({**env, "EUCORA_MQTT_URL": None}, "revoke", "e-2")
    assert refused.exit_code == 2
    assert "EUCORA_MQTT_URL" in refused.stderr and "Nothing was changed" in refused.stderr
    assert query(database, "SELECT cert_serial IS NOT NULL, revoked_at FROM agents"
                 " WHERE agent_id = 'e-2'") == [(True, None)]  # fmt: skip
    assert crl_serials(tls_broker.auth.crl_file.read_bytes()) == set()
    assert agent.publish(TREE.agent("e-2", Kind.HEARTBEAT)) != "Not authorized"
    # A wrong operator password: revoked (no new connection), but the open one stays,
    # and the command says so without printing the password.
    bad = "wrong-" + identity.new_password()
    wrong_operator = run({**env, "EUCORA_MQTT_URL": f"mqtt://{identity.OPERATOR_USER}:{bad}@"
                          f"127.0.0.1:{tls_broker.service_port}"}, "revoke", "e-2")  # fmt: skip
    assert wrong_operator.exit_code == 1
    assert "stays until it reconnects" in wrong_operator.stderr
    assert bad not in wrong_operator.output
    assert not agent.disconnected.is_set()
    mine = (doc["cert_file"], doc["key_file"])
    assert handshake(tls_broker.cert_port or 0, doc["ca_file"], mine).startswith("refused")

    # A home broker without a certificate listener.
    plain = broker_factory()
    register(plain, database, broker_id=2)
    with connect(database) as conn:
        conn.execute("UPDATE brokers SET accepting = false WHERE broker_id = 1")
        conn.commit()
    no_listener = run(env, "provision", "e-3", "--cert", "-o", str(tmp_path / "other"))
    assert no_listener.exit_code == 1
    assert "has no certificate listener" in no_listener.stderr


def test_agent_config_needs_both_certificate_files(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca").ensure()
    crt, key = files(tmp_path / "agent", ca.signer().issue_client("cfg-1"))
    base = {"EUCORA_AGENT_ID": "cfg-1", "EUCORA_MQTT_URL": "mqtts://127.0.0.1:19883",
            "EUCORA_CA_FILE": str(ca.cert_file)}  # fmt: skip
    config = agent_config.load(env={**base, "EUCORA_CERT_FILE": crt, "EUCORA_KEY_FILE": key})
    assert (config.cert_file, config.key_file, config.password) == (crt, key, None)
    missing = {**base, "EUCORA_CERT_FILE": crt + ".gone", "EUCORA_KEY_FILE": key}
    with pytest.raises(ConfigError, match=r"certificate file .*\.gone \(from EUCORA_CERT_FILE\)"):
        agent_config.load(env=missing)
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        agent_config.load(env={**base, "EUCORA_CERT_FILE": crt})
    other = files(tmp_path / "other", ca.signer().issue_client("cfg-1"))
    with pytest.raises(ConfigError, match="cannot use the certificate"):
        agent_config.load(env={**base, "EUCORA_CERT_FILE": crt, "EUCORA_KEY_FILE": other[1]})
    with pytest.raises(ConfigError, match="no password"):
        agent_config.load(env=base)


def test_a_lost_crl_comes_back_from_the_registry(
    shards: Stack, database: str, tmp_path: Path
) -> None:
    env: dict[str, str | None] = {**shards.env()}
    doc = provision_cert(env, tmp_path, "lost-1")
    assert runner.invoke(cli, ["revoke", "lost-1"], env=env).exit_code == 0
    shards.down()
    (shards.auth_dir / "agents.crl").unlink()
    shards.up(bridge=False)
    serial = x509.load_pem_x509_certificate(Path(doc["cert_file"]).read_bytes()).serial_number
    assert crl_serials((shards.auth_dir / "agents.crl").read_bytes()) == {serial}
    port = shards.broker(1).cert_port
    assert port is not None
    assert handshake(port, doc["ca_file"], (doc["cert_file"], doc["key_file"])).startswith(
        "refused"
    )


def test_a_crl_close_to_its_next_update_is_signed_again(tmp_path: Path) -> None:
    """An expired CRL would fail every handshake: a broker start renews it early."""
    ca = CertificateAuthority(tmp_path / "ca").ensure()
    auth = identity.AuthDir(tmp_path / "auth")
    auth.path.mkdir()
    when = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    auth.write_crl(ca.signer().crl([(12345, when)], days=30))
    revocation.ensure_crl(auth, ca.signer())
    crl = x509.load_pem_x509_crl(auth.crl_file.read_bytes())
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - when > datetime.timedelta(days=3000)
    assert [(r.serial_number, r.revocation_date_utc) for r in crl] == [(12345, when)]
