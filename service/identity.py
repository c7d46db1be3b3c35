"""Broker identities in files: Mosquitto's `password_file` + `acl_file` (docs/broker.md).

Every broker of one host reads the same *auth folder* (`EUCORA_AUTH_DIR`, the stack's
`D/auth/`):

    agents.passwd   one `agent_id:$7$...` line per provisioned agent (the agent listener)
    agents.acl      `pattern` lines: each agent its own topics, by username (%u)
    service.passwd  the bridge and operator accounts (the service listener)
    service.acl     what those accounts may do
    agents.crl      the certificates the certificate listeners refuse (service/revocation.py)
    pids/NAME.pid   the pid of each broker started on these files (who gets SIGHUP)

The database is the source of truth (agents.password_hash, migration 0007); these
files are what Mosquitto reads. Adding agents appends lines; revoking rewrites the
file without them (temp file + rename, so a broker never reads half a file); either
way every broker is then told to reload with SIGHUP, which re-reads both files, drops
a connected client whose account is gone or whose password changed, and keeps the
others. A lock file serialises writers, so a provisioning that appends while a
revocation rewrites loses nothing.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import secrets
import signal
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from schemas.topics import Kind, TopicTree

AUTH_DIR_ENV = "EUCORA_AUTH_DIR"
BRIDGE_USER = "eucora-bridge"
OPERATOR_USER = "eucora-operator"
SERVICE_USERS = (BRIDGE_USER, OPERATOR_USER)
# Mosquitto's own default for `$7$` (PBKDF2-SHA512) hashes. Every password we issue is
# 256 random bits, so key stretching would only add connect-time CPU for a whole fleet.
ITERATIONS = 101
SALT_BYTES = 12  # what mosquitto_passwd uses

# What an agent may publish: every agent kind except the tasks it receives.
AGENT_PUBLISH_KINDS = (
    Kind.STATUS, Kind.REGISTER, Kind.HEARTBEAT, Kind.TELEMETRY, Kind.INVENTORY,
    Kind.TASK_STATUS, Kind.DEPLOYMENT_STATUS,
)  # fmt: skip
# What it may read: its tasks, and its own status (to repair a stale last will).
AGENT_READ_KINDS = (Kind.TASKS, Kind.STATUS)
# What operators may read: what `eucora agents watch` shows (telemetry stays in the
# database: a fleet's samples are no operator's live stream).
OPERATOR_READ_KINDS = (Kind.STATUS, Kind.REGISTER, Kind.TASK_STATUS, Kind.DEPLOYMENT_STATUS)


class IdentityError(RuntimeError):
    """The auth folder cannot be used; the message is for an operator."""


def new_password() -> str:
    return secrets.token_urlsafe(32)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A mosquitto `$7$` hash: `$7$ITERATIONS$base64(salt)$base64(PBKDF2-SHA512)`, as
    mosquitto_passwd writes it (PBKDF2 over the raw salt bytes)."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, hashed: str) -> bool:
    _, seven, iterations, salt, digest = hashed.split("$")
    if seven != "7":
        return False
    computed = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), base64.b64decode(salt), int(iterations)
    )
    return secrets.compare_digest(base64.b64encode(computed).decode(), digest)


def agent_acl(tree: TopicTree) -> str:
    """One set of patterns for the whole fleet: %u is the connecting agent's username,
    which is also its client id on the agent listener (use_username_as_clientid)."""
    agent = f"{tree.root}/agents/%u"
    lines = ["# Written by eucora (service/identity.py): every agent its own topics only."]
    lines += [f"pattern write {agent}/{k.value}" for k in AGENT_PUBLISH_KINDS]
    lines += [f"pattern read {agent}/{k.value}" for k in AGENT_READ_KINDS]
    return "\n".join(lines) + "\n"


def service_acl(tree: TopicTree) -> str:
    """The bridge reads every agent topic (also through `$share/GROUP/...`, which the
    broker checks against the topic itself) and writes tasks; operators read status,
    registrations and task and deployment reports (`eucora agents watch`)."""
    return "\n".join([
        "# Written by eucora (service/identity.py): the service listener's accounts.",
        f"user {BRIDGE_USER}",
        f"topic read {tree.root}/agents/#",
        f"topic write {tree.wildcard(Kind.TASKS)}",
        "",
        f"user {OPERATOR_USER}",
        *(f"topic read {tree.wildcard(k)}" for k in OPERATOR_READ_KINDS),
    ]) + "\n"  # fmt: skip


def password_lines(hashes: Mapping[str, str]) -> str:
    return "".join(f"{user}:{hashed}\n" for user, hashed in hashes.items())


@dataclass(frozen=True)
class AuthDir:
    """The auth folder shared by the brokers of one host."""

    path: Path

    @property
    def agents_file(self) -> Path:
        return self.path / "agents.passwd"

    @property
    def agents_acl(self) -> Path:
        return self.path / "agents.acl"

    @property
    def service_file(self) -> Path:
        return self.path / "service.passwd"

    @property
    def service_acl(self) -> Path:
        return self.path / "service.acl"

    @property
    def crl_file(self) -> Path:
        return self.path / "agents.crl"

    @property
    def pid_dir(self) -> Path:
        return self.path / "pids"

    # --- writing ------------------------------------------------------------------
    def prepare(
        self, tree: TopicTree, service_passwords: Mapping[str, str], *, owner: int | None = None
    ) -> None:
        """Write the ACLs and the service accounts (rendered each time: they follow the
        topic root and the secrets); create an empty agents file the first time.
        `owner`: the uid the broker runs as (files are private to it and to us)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.pid_dir.mkdir(exist_ok=True)
        os.chmod(self.path, 0o700)
        if owner is not None:
            os.chown(self.path, owner, -1)
        with self.lock():
            self._write(self.agents_acl, agent_acl(tree))
            self._write(self.service_acl, service_acl(tree))
            hashes = {u: hash_password(service_passwords[u]) for u in SERVICE_USERS}
            self._write(self.service_file, password_lines(hashes))
            if not self.agents_file.exists():
                self._write(self.agents_file, "")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive among eucora processes writing this folder (flock on `.lock`)."""
        if not self.path.is_dir():
            raise IdentityError(
                f"auth folder {self.path} does not exist (set {AUTH_DIR_ENV} or --auth-dir "
                "to the folder the brokers read: `eucora stack env` prints it)"
            )
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, path: Path, text: str) -> None:
        """Replace `path` atomically, owned like the folder (the broker's account must
        read it on SIGHUP, also when we run as root), mode 0600."""
        tmp = path.with_name(f".{path.name}.new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        folder = self.path.stat()
        if os.geteuid() == 0:
            os.chown(tmp, folder.st_uid, folder.st_gid)
        os.replace(tmp, path)

    def write_crl(self, pem: bytes) -> None:
        """Replace the CRL (the caller holds lock()): renamed into place like the other
        files, so a broker reloading never reads half of it."""
        self._write(self.crl_file, pem.decode("ascii"))

    def append_agents(self, hashes: Mapping[str, str]) -> None:
        """Add agents' lines: one write, whatever the number (the caller holds lock())."""
        with open(self.agents_file, "a") as f:
            f.write(password_lines(hashes))
            f.flush()
            os.fsync(f.fileno())

    def rewrite_agents(
        self, *, remove: Iterable[str] = (), hashes: Mapping[str, str] | None = None
    ) -> None:
        """Rewrite the agents file without `remove`, with `hashes` replacing or adding
        lines (the caller holds lock())."""
        hashes = hashes or {}
        gone = frozenset(remove) | frozenset(hashes)
        kept = [
            line
            for line in self.agents_file.read_text().splitlines(keepends=True)
            if line.partition(":")[0] not in gone
        ]
        self._write(self.agents_file, "".join(kept) + password_lines(hashes))

    def remove_agents(self, agent_ids: Iterable[str]) -> None:
        self.rewrite_agents(remove=agent_ids)

    def agents(self) -> set[str]:
        """The usernames in the agents file."""
        try:
            text = self.agents_file.read_text()
        except FileNotFoundError:
            return set()
        return {line.partition(":")[0] for line in text.splitlines() if line}

    # --- the brokers that read this folder -----------------------------------------
    def pid_file(self, name: str) -> Path:
        return self.pid_dir / f"{name}.pid"

    def broker_pids(self) -> dict[str, int]:
        """name -> pid of every broker recorded here that still runs."""
        found: dict[str, int] = {}
        for f in sorted(self.pid_dir.glob("*.pid")):
            try:
                pid = int(f.read_text())
            except (OSError, ValueError):
                continue
            if _is_mosquitto(pid):
                found[f.stem] = pid
        return found

    def reload(self) -> int:
        """SIGHUP every running broker of this folder; how many were told."""
        told = 0
        for pid in self.broker_pids().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
                told += 1
        return told


def _is_mosquitto(pid: int) -> bool:
    """A recorded pid may have been reused by another process after a crash: only a
    mosquitto gets our SIGHUP (whose default action would kill anything else)."""
    try:
        exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    return os.path.basename(exe).startswith(b"mosquitto")


# --- what provisioning does to the files: change, then reload every broker ---------


def add_agents(auth: AuthDir, hashes: Mapping[str, str]) -> int:
    """Append agents (one write for any number) and reload; how many brokers were told.

    A reload takes effect before the broker reads any connection made after this
    returns (Mosquitto handles the signal before its next wait for network events).
    """
    with auth.lock():
        auth.append_agents(hashes)
        return auth.reload()


def replace_agents(auth: AuthDir, hashes: Mapping[str, str]) -> int:
    """New passwords for existing agents: a session opened with the old one is dropped."""
    with auth.lock():
        auth.rewrite_agents(hashes=hashes)
        return auth.reload()


def remove_agents(auth: AuthDir, agent_ids: Iterable[str]) -> int:
    """Remove agents and reload: a connected one is dropped and cannot come back."""
    with auth.lock():
        auth.remove_agents(agent_ids)
        return auth.reload()
