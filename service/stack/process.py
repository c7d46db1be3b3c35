"""Small helpers for the processes the local stack owns: ports, pids, waiting."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class StackError(RuntimeError):
    """Something the stack could not start or stop; the message is for an operator."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_port_range(n: int) -> int:
    """A first port with the n - 1 after it free too (brokers take consecutive ports),
    below the ephemeral range, where outgoing connections could take one meanwhile."""
    rng = random.Random()  # noqa: S311 (a port, not a secret)
    while True:
        first = rng.randrange(20000, 32000)
        if all(_bindable(first + i) for i in range(n)):
            return first


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    for child in _CHILDREN:
        if child.pid == pid:  # our own child: poll() reaps it and records its exit
            return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    """Poll `check` every `every` s until it holds; raise StackError naming `what` after
    `timeout` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def stop_pid(pid: int | None, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal a process and wait for it to go; SIGKILL if it outstays `timeout`."""
    if not alive(pid):
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    try:
        wait_for(lambda: not alive(pid), timeout, f"process {pid} to exit")
    except StackError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 5, f"process {pid} to die")


def service_user(name: str) -> pwd.struct_passwd | None:
    """The unprivileged account a service should run as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, user.pw_uid, user.pw_gid)


def check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """A service dropped to `user` must be able to walk down to `path`."""
    for parent in [path, *path.parents]:
        st = parent.stat()
        if st.st_uid != user.pw_uid and not st.st_mode & 0o001:
            raise StackError(
                f"{parent} is not searchable by the '{user.pw_name}' account the service "
                f"runs as; choose a stack --dir under a world-searchable folder (e.g. /var/tmp)"
            )


# Services outlive the command that starts them; holding their Popen objects keeps
# Python from warning about (and us from forgetting) children still running.
_CHILDREN: list[subprocess.Popen[bytes]] = []


def spawn(
    argv: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    user: pwd.struct_passwd | None = None,
) -> subprocess.Popen[bytes]:
    """Start a service in its own session (a Ctrl-C in the terminal does not reach it),
    as `user` when given (a service that cannot drop privileges itself)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )  # fmt: skip
    _CHILDREN.append(proc)
    return proc


def find_program(name: str, package: str) -> str:
    """A Debian daemon's binary: on PATH, or in /usr/sbin (not on every user's PATH)."""
    found = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if not found:
        raise StackError(f"{name} not found: apt-get install {package}")
    return found


def log_tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file on one line (for an error message), or ""."""
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
