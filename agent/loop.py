"""Many paho clients on one thread: paho's external-loop API driven by a selector.

A paho client started with loop_start() owns a thread; a thousand simulated agents
would be a thousand threads fighting for one GIL. Here one thread waits on every
client's socket (epoll), calls loop_read when a socket is ready, writes what the
round's callbacks and timers queued at its end (loop_write; the socket is watched for
writability only while the kernel's buffer is full), calls loop_misc once a second
(keepalive pings), and runs timers. Every paho callback, and
so all agent logic, runs on that thread: sessions need no locks.

The one blocking step, connecting (DNS, TCP, the TLS handshake: up to paho's connect
timeout, 5 s, on a link that stalls), runs on a small pool of worker threads
(`connect_in_background`): the loop leaves that client alone meanwhile, so timers
(sampling, heartbeats) and every other client go on.

The reference agent uses the same loop with a single client.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

log = logging.getLogger("eucora.agent.loop")

MISC_INTERVAL_S = 1.0


@dataclass
class Timer:
    when: float
    fn: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class ConnectGate:
    """At most `limit` connects between their start and the broker's answer (None: no
    bound). A fleet on one process must not start connects faster than it, its brokers
    and the bridge can finish them: past that, the loop's rounds grow to seconds
    (every CONNACK sets off an agent's first publishes), CONNACK waits pass, the agents
    retry, and the ramp collapses (seen at 15,000 agents a process on 2 cores). With a
    bound, the ramp goes as fast as the machine finishes connects, and no faster.
    Call on the loop's thread."""

    def __init__(self, loop: Loop, limit: int | None = None) -> None:
        self.loop = loop
        self.limit = limit
        self.held = 0
        self._waiting: deque[Callable[[], None]] = deque()

    def enter(self, admitted: Callable[[], None]) -> None:
        """Run `admitted` once a place is free; it must be given back with leave()."""
        if self.limit is None or self.held < self.limit:
            self.held += 1
            admitted()
        else:
            self._waiting.append(admitted)

    def leave(self) -> None:
        self.held -= 1
        if self._waiting and (self.limit is None or self.held < self.limit):
            self.held += 1
            # Not called here: leave() runs inside another client's callbacks.
            self.loop.call_later(0.0, self._waiting.popleft())

    def waiting(self) -> int:
        return len(self._waiting)


class Loop:
    def __init__(self, connect_workers: int = 4) -> None:
        self._sel = selectors.DefaultSelector()
        # Clients whose connect runs on a worker: their socket callbacks are ignored
        # until it is done (the loop then registers the new socket itself).
        self._connecting: set[paho.Client] = set()
        self._pool = ThreadPoolExecutor(connect_workers, thread_name_prefix="eucora-connect")
        # (when, seq, timer): tuples compare in C; a dataclass's generated __lt__ cost
        # 7% of a simulator's loop with 14,000 agents' timers.
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._clients: set[paho.Client] = set()
        # Clients with bytes to send, written at the end of the round (see
        # _on_register_write), and those whose socket is watched for writability.
        self._to_write: dict[paho.Client, None] = {}
        self._write_armed: set[paho.Client] = set()
        self.connect_gate = ConnectGate(self)
        self._stopping = False
        self.errors = 0  # exceptions raised by client callbacks (logged, not fatal)
        # The longest round of work (everything between two selects) since the last
        # take_busiest(): a loop whose rounds take seconds misses keepalives.
        self._busiest = 0.0

    # --- clients -----------------------------------------------------------------------
    def attach(self, client: paho.Client) -> None:
        """Drive `client` from this loop (call before connecting it)."""
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._clients.add(client)

    def detach(self, client: paho.Client) -> None:
        """Stop driving `client` without closing its socket: to the broker it looks
        like a frozen process (tests use it to leave a session half-open)."""
        self._clients.discard(client)
        self._write_armed.discard(client)
        self._to_write.pop(client, None)
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
        client.on_socket_open = None
        client.on_socket_close = None
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None

    def connect_in_background(
        self,
        client: paho.Client,
        connect: Callable[[], object],
        done: Callable[[BaseException | None], None],
    ) -> None:
        """Run `connect` (paho's blocking connect) on a worker thread; then, on this
        loop's thread, serve the new socket and call `done(error or None)`. Call on the
        loop's thread."""
        old = client.socket()
        if old is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(old)
        self._connecting.add(client)

        def work() -> None:
            error: BaseException | None = None
            try:
                connect()
            except Exception as exc:
                error = exc
            self.call_soon_threadsafe(lambda: self._connect_done(client, error, done))

        try:
            self._pool.submit(work)
        except RuntimeError as exc:  # the loop is closing
            self._connecting.discard(client)
            done(exc)

    def _connect_done(
        self,
        client: paho.Client,
        error: BaseException | None,
        done: Callable[[BaseException | None], None],
    ) -> None:
        self._connecting.discard(client)
        sock = client.socket()
        self._write_armed.discard(client)
        if error is None and sock is not None and client in self._clients:
            with contextlib.suppress(KeyError):
                self._sel.unregister(sock)
            self._sel.register(sock, selectors.EVENT_READ, client)
            if client.want_write():  # the CONNECT: written at the end of this round
                self._to_write[client] = None
        self._guard(lambda: done(error))

    def _on_socket_open(self, client: paho.Client, _u: Any, sock: Any) -> None:
        if client in self._connecting:
            return  # on the worker: registered when the connect is done
        with contextlib.suppress(KeyError):
            self._sel.unregister(sock)
        self._write_armed.discard(client)
        self._sel.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: paho.Client, _u: Any, sock: Any) -> None:
        self._write_armed.discard(client)
        self._to_write.pop(client, None)
        if client in self._connecting:
            return  # never registered (unregistered before the worker started)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    def _on_register_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        # Not an epoll change per publish (two syscalls, 9% of a simulator's loop): the
        # bytes are written at the end of this round, and the socket is watched for
        # writability only when the kernel's buffer did not take them all.
        if client in self._connecting:
            return
        self._to_write[client] = None

    def _on_unregister_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        if client in self._connecting or client not in self._write_armed:
            return
        self._write_armed.discard(client)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(sock, selectors.EVENT_READ, client)

    def _write_pending(self) -> None:
        while self._to_write:
            client = next(iter(self._to_write))
            del self._to_write[client]
            sock = client.socket()
            if sock is None or client in self._connecting or client not in self._clients:
                continue
            self._guard(client.loop_write)
            if client.want_write() and client.socket() is sock and client not in self._write_armed:
                self._write_armed.add(client)
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    # --- scheduling --------------------------------------------------------------------
    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run `fn` on the loop's thread after `delay` s (call from that thread)."""
        timer = Timer(time.monotonic() + max(delay, 0.0), fn)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop's thread soon; safe from any thread or signal handler."""
        self._calls.append(fn)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def stop(self) -> None:
        """Make run() return (thread-safe)."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def take_busiest(self) -> float:
        """The longest round of work since the last call, in seconds (and reset it)."""
        busiest, self._busiest = self._busiest, 0.0
        return busiest

    # --- running -----------------------------------------------------------------------
    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Serve clients and timers until stop() (or until `until()` holds)."""
        self._stopping = False
        next_misc = time.monotonic() + MISC_INTERVAL_S
        while not self._stopping and not (until is not None and until()):
            now = time.monotonic()
            wake_at = min(next_misc, self._timers[0][0]) if self._timers else next_misc
            ready = self._sel.select(max(wake_at - now, 0.0))
            began = time.monotonic()
            for key, mask in ready:
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    continue
                self._serve(key.data, key.fileobj, mask)
            while self._calls:
                self._guard(self._calls.popleft())
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                timer = heapq.heappop(self._timers)[2]
                if not timer.cancelled:
                    self._guard(timer.fn)
            if now >= next_misc:
                next_misc = now + MISC_INTERVAL_S
                for client in list(self._clients):
                    if client not in self._connecting:
                        self._guard(client.loop_misc)
            self._write_pending()
            self._busiest = max(self._busiest, time.monotonic() - began)

    def _serve(self, client: paho.Client, sock: Any, mask: int) -> None:
        if client.socket() is not sock:
            return  # replaced or closed by an earlier callback in this round
        if mask & selectors.EVENT_READ:
            self._guard(client.loop_read)
            # TLS can hold decrypted bytes that select() will never signal again.
            while isinstance(client.socket(), ssl.SSLSocket) and client.socket().pending():  # type: ignore[union-attr]
                self._guard(client.loop_read)
        if mask & selectors.EVENT_WRITE and client.socket() is sock:
            self._guard(client.loop_write)

    def _guard(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            # One agent's bug must not stop the others (paho re-raises callback errors).
            self.errors += 1
            log.exception("error in an agent callback")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()


def run_in_thread(loop: Loop, name: str = "eucora-agents") -> threading.Thread:
    """Start `loop.run()` in a daemon thread (tests, embedding)."""
    thread = threading.Thread(target=loop.run, name=name, daemon=True)
    thread.start()
    return thread
