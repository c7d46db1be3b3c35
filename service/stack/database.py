"""A private PostgreSQL cluster in a folder, made with the system's own binaries."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from service.stack.process import (
    StackError,
    alive,
    check_reachable,
    chown_tree,
    port_open,
    service_user,
    wait_for,
)

SUPERUSER = "eucora"
DATABASE = "eucora"


def find_bindir() -> Path:
    """The newest PostgreSQL server binaries installed (Debian keeps them out of PATH)."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise StackError("PostgreSQL server binaries not found: apt-get install postgresql")


def timescaledb_installed(bindir: Path) -> bool:
    libdir = bindir.parent / "lib"
    return any(libdir.glob("timescaledb*.so"))


@dataclass
class Cluster:
    """`initdb` once, then start/stop with pg_ctl. Runs as 'postgres' when we are root."""

    root: Path
    port: int
    password: str = field(repr=False)
    # Tests trade crash safety of the *database server* for speed; the demo stack does not.
    durable: bool = True

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgresql.log"

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}:{quote(self.password)}@127.0.0.1:{self.port}/{dbname}"

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        return alive(self.pid)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        user = service_user("postgres")
        cmd = list(args)
        if user:  # initdb and postgres refuse to run as root
            cmd = ["runuser", "-u", user.pw_name, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        bindir = find_bindir()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        user = service_user("postgres")
        if user:
            check_reachable(self.root.parent, user)
            chown_tree(self.root, user)
        try:
            done = self._run(
                str(bindir / "initdb"),
                "-D", str(self.data_dir),
                "-U", SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=peer" if user else "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-instructions",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise StackError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self, timeout: float = 30.0) -> None:
        self.init()
        if self.running:
            return
        if port_open("127.0.0.1", self.port):
            raise StackError(f"port {self.port} is already in use: choose another --db-port")
        bindir = find_bindir()
        opts = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            f"-c unix_socket_directories={self.root}",
            "-c max_connections=200",
        ]
        if timescaledb_installed(bindir):
            # No usage reports: the extension would schedule a job that phones home.
            opts += [
                "-c shared_preload_libraries=timescaledb",
                "-c timescaledb.telemetry_level=off",
            ]
        if not self.durable:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        done = self._run(
            str(bindir / "pg_ctl"), "start", "-D", str(self.data_dir), "-l", str(self.log_file),
            "-o", " ".join(opts), "-w", "-t", str(int(timeout)),
        )  # fmt: skip
        if done.returncode != 0:
            raise StackError(
                f"PostgreSQL did not start: {done.stderr.strip() or done.stdout.strip()} "
                f"(log: {self.log_file})"
            )
        wait_for(lambda: port_open("127.0.0.1", self.port), timeout, "PostgreSQL to listen")
        self.ensure_database(DATABASE)

    def stop(self, mode: str = "fast") -> None:
        if not self.running:
            return
        done = self._run(
            str(find_bindir() / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w"
        )
        if done.returncode != 0 and self.running:
            raise StackError(f"PostgreSQL did not stop: {done.stderr.strip()}")

    def ensure_database(self, name: str) -> str:
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)
