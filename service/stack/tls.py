"""A private certificate authority for the local stack's TLS listeners: the fleet's CA.

`eucora stack up` (and the tests) make a CA once per stack folder and a server
certificate signed by it for the broker. Agents trust the CA file (`ca_file` in the
output of `eucora agents provision`); a client with only the system's trust store is
refused, which is the point. ECDSA P-256 keys: generated in about a millisecond,
so a test can afford a fresh CA, and supported by every TLS stack agents run on.

The same CA signs agents' client certificates (`eucora agents provision --cert`: CN =
agent_id) and the revocation list the certificate listener checks them against
(`Signer.crl`), see docs/broker.md, "Certificate identities".
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest lifetime clients such as Apple's accept for a server cert
# An agent's certificate: renewed by revoking and provisioning it again. The CRL keeps a
# revoked serial until the certificate expires, so this also bounds the CRL's growth.
CLIENT_DAYS = 825
# OpenSSL refuses EVERY handshake of a listener whose CRL is past its nextUpdate (not
# only revoked certificates): the list must never expire while brokers use it. It is
# re-signed at each revocation and each `stack up`; ten years is "never" here.
CRL_DAYS = 3650


# A DNS name in a certificate: dot-separated labels of letters, digits and '-', the
# first one possibly a '*' wildcard (RFC 5280 4.2.1.6, RFC 6125 6.4.3).
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def check_name(name: str) -> str:
    """A name the server certificate may carry: an IP address (returned in its
    canonical form) or a DNS name; ValueError otherwise."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_NAME.match(name):
        raise ValueError(f"{name!r} is neither an IP address nor a DNS name")
    return name.lower()


@dataclass(frozen=True)
class ServerFiles:
    """What a broker's TLS listener needs: `cafile`, `certfile`, `keyfile`."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode: a private key is never readable by others, not even
    # between open() and chmod().
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    return key


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA's certificate (public, given to agents) and key (mode 0600, stays here)."""

    dir: Path

    @property
    def cert_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def key_file(self) -> Path:
        return self.dir / "ca.key"

    def ensure(self, name: str = "EUCORA local CA") -> CertificateAuthority:
        """Create the CA the first time; later calls reuse it (agents already trust it)."""
        if self.cert_file.exists() and self.key_file.exists():
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write(self.key_file, _key_pem(key), 0o600)
        _write(self.cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return self

    def signer(self) -> Signer:
        """The CA's certificate and key, to sign with (the key must be readable)."""
        return Signer.load(self.cert_file, self.key_file)

    def issue_server(self, out_dir: Path, hosts: list[str]) -> ServerFiles:
        """A server certificate for `hosts` (DNS names or IP addresses) in `out_dir`.

        Reissued on every call: it is cheap, and a changed bind address or host name
        is then always in the certificate.
        """
        signer = self.signer()
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for h in dict.fromkeys(hosts):  # ordered, without duplicates
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        cert = (
            signer.builder(hosts[0], key, SERVER_DAYS)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .sign(signer.key, hashes.SHA256())
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        files = ServerFiles(
            ca_file=out_dir / "ca.pem",
            cert_file=out_dir / "server.pem",
            key_file=out_dir / "server.key",
        )
        _write(files.key_file, _key_pem(key), 0o600)
        _write(files.cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        # The broker gets its own copy of the CA certificate: its data folder is then
        # self-contained, and the CA's folder (with the CA key) need not be readable
        # by the account the broker runs as.
        _write(files.ca_file, self.cert_file.read_bytes(), 0o644)
        return files


@dataclass(frozen=True)
class ClientCertificate:
    """An agent's certificate and key (PEM), and what revoking it needs."""

    cert_pem: bytes
    key_pem: bytes
    serial: int
    not_after: datetime.datetime


@dataclass(frozen=True)
class Signer:
    """A CA certificate with its key: signs server and client certificates and CRLs."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> Signer:
        """ValueError (for an operator) when the files are not a matching CA pair."""
        key = _load_key(key_file)
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*pem) != key.public_key().public_bytes(*pem):
            raise ValueError(f"{key_file} is not the key of the CA certificate {cert_file}")
        return cls(cert, key)

    def builder(
        self, common_name: str, key: ec.EllipticCurvePrivateKey, days: int
    ) -> x509.CertificateBuilder:
        """A leaf certificate for `key` issued by this CA, valid from five minutes ago
        (clocks differ) for `days`; the caller adds its names and usage, then signs."""
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )

    def issue_client(self, common_name: str, days: int = CLIENT_DAYS) -> ClientCertificate:
        """An agent's certificate: subject CN = its agent_id (the broker's username and
        client id for it), a random 159-bit serial, usable for TLS client auth only."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self.builder(common_name, key, days)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(self.key, hashes.SHA256())
        )
        return ClientCertificate(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_key_pem(key),
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,
        )

    def crl(self, revoked: Iterable[tuple[int, datetime.datetime]], days: int = CRL_DAYS) -> bytes:
        """A CRL (PEM) of (serial, revoked_at), valid for `days` (see CRL_DAYS)."""
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=days))
        )
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def crl_serials(pem: bytes) -> set[int]:
    """The serials a CRL lists."""
    return {r.serial_number for r in x509.load_pem_x509_crl(pem)}
