"""One agent's MQTT session: the protocol, for the reference agent and the simulator alike.

Runs entirely on a `Loop` thread (paho callbacks and timers); what differs between a
real and a simulated agent is the `Host` it reports on.

On every connect: a new epoch, a retained last will `offline` with that epoch, then
retained `online`, the registration, a heartbeat, the telemetry buffered while
disconnected (as batches) and the inventory if it changed since it was last sent.
Persistent session (clean_start=false with a session expiry), client id = username
= agent id. See docs/agents.md.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import protocol
from agent.buffer import Buffer, TelemetryBuffer
from agent.client import AgentClient
from agent.loop import Loop, Timer
from agent.protocol import AgentTopics, EpochClock, HostInfo, Metrics, OwnStatusAction
from schemas.config import MqttUrl
from schemas.constants import FATAL_CONNECT_REASONS, MQTT_VERSIONS, SESSION_EXPIRY_S
from schemas.payloads import MAX_BATCH, Software, Status
from schemas.states import AgentState
from schemas.topics import Kind, TopicTree
from schemas.validate import PayloadError, parse

log = logging.getLogger("eucora.agent")

SESSION_TAKEN_OVER: Final = 142  # MQTT 5 DISCONNECT reason: another client took our id
DISCONNECT_WITH_WILL: Final = 4  # MQTT 5 DISCONNECT reason: "publish my will anyway"
# A connection that lasted this long ends a takeover fight: back-off starts afresh.
STABLE_S: Final = 60.0


class Host(Protocol):
    """What a session reports on: a real machine (agent.host) or a simulated one."""

    def info(self) -> HostInfo: ...
    def metrics(self) -> Metrics: ...
    def software(self) -> Sequence[Software] | None: ...
    def uptime(self) -> float | None: ...


@dataclass(frozen=True)
class Timing:
    telemetry_interval: float = 60.0
    heartbeat_interval: float = 60.0
    keepalive: int = 60
    inventory_interval: float = 300.0  # how often the inventory is checked for changes
    reconnect_min: float = 1.0
    reconnect_max: float = 30.0
    # After "session taken over": another process runs with our id. Back off longer, so
    # two clones do not kick each other off (and flood the status history) in a loop.
    takeover_min: float = 5.0
    takeover_max: float = 120.0
    connack_timeout: float = 10.0
    stop_timeout: float = 5.0  # how long a graceful stop waits for its offline's PUBACK
    session_expiry: int = SESSION_EXPIRY_S
    # Start periodic timers at a random phase (a fleet must not beat in step).
    random_phase: bool = False


@dataclass
class Counters:
    connects: int = 0
    connect_failures: int = 0  # attempts that never reached CONNACK (refused, timed out)
    disconnects: int = 0
    takeovers: int = 0
    republished: int = 0
    reconnects_for_epoch: int = 0
    telemetry_sent: int = 0
    buffered_sent: int = 0
    batches_sent: int = 0
    heartbeats_sent: int = 0
    inventories_sent: int = 0


class AgentSession:
    def __init__(
        self,
        loop: Loop,
        *,
        agent_id: str,
        url: MqttUrl,
        host: Host,
        tree: TopicTree | None = None,
        timing: Timing | None = None,
        tags: dict[str, str] | None = None,
        agent_version: str = "0.1.0",
        epochs: EpochClock | None = None,
        buffer_size: int = 10_000,
        buffer: Buffer | None = None,  # default: in memory, buffer_size samples
        ca_file: str | None = None,
        password: str | None = None,
        cert_file: str | None = None,  # a client certificate (with key_file): mTLS
        key_file: str | None = None,
        rng: random.Random | None = None,
        on_fatal: Callable[[str], None] | None = None,
        on_stopped: Callable[[], None] | None = None,
        on_task: Callable[[bytes | bytearray], None] | None = None,
        mqtt_version: str = "5",
    ) -> None:
        if mqtt_version not in MQTT_VERSIONS:
            raise ValueError(f"MQTT version {mqtt_version!r}: choose one of {MQTT_VERSIONS}")
        self.mqtt5 = mqtt_version == "5"
        self.loop = loop
        self.agent_id = agent_id
        self.url = url
        self.host = host
        self.topics = AgentTopics.of(tree or TopicTree(), agent_id)
        self.timing = timing or Timing()
        self.tags = dict(tags or {})
        self.agent_version = agent_version
        self.epochs = epochs or EpochClock()
        self.buffer: Buffer = buffer if buffer is not None else TelemetryBuffer(buffer_size)
        self._buffered_mids: dict[int, int] = {}  # mid of a buffered batch -> its last seq
        self._buffer_said: tuple[int, int] | None = None  # (buffered, dropped) last reported
        self.rng = rng or random.Random()  # noqa: S311 (timing jitter, not security)
        self.on_fatal = on_fatal
        self.on_stopped = on_stopped
        # Messages on our tasks topic go here (the reference agent's TaskExecutor);
        # without it the session does not subscribe to tasks at all.
        self.on_task = on_task
        self.counters = Counters()

        self.epoch: int | None = None  # the epoch of the current (or last) session
        self.connected = False
        self.connecting = False  # a connect runs on the loop's worker thread
        self._in_gate = False  # holds a place in the loop's connect gate
        self._gate_queued = False  # waits for one
        self.stopping = False
        self.stopped = False
        self.ever_connected = False
        self._pending_epoch: int | None = None
        self._backoff = self.timing.reconnect_min
        self._takeover_backoff = self.timing.takeover_min
        self._connect_timer: Timer | None = None
        self._connack_timer: Timer | None = None
        self._periodic: dict[str, Timer] = {}
        self._connected_at = 0.0
        self._heartbeat_seq = 0
        self._inventory_sent: int | None = None  # digest of the last inventory sent
        self._inventory: Sequence[Software] | None = None
        self._offline_mid: int | None = None
        self._pause_next: float | None = None  # simulator: reconnect after this pause
        # Epochs this process used: a status with any other epoch comes from another
        # process with our agent id (Mosquitto 2.0 closes a taken-over connection
        # without telling why, so this is how a clone is noticed).
        self._own_epochs: deque[int] = deque(maxlen=32)
        self._clone_seen_at = -1e9

        if self.mqtt5:
            client = AgentClient(
                CallbackAPIVersion.VERSION2, client_id=agent_id, protocol=MQTTProtocolVersion.MQTTv5
            )
        else:  # a persistent session is clean_session=False, set once per client
            client = AgentClient(
                CallbackAPIVersion.VERSION2, client_id=agent_id,
                protocol=MQTTProtocolVersion.MQTTv311, clean_session=False,
            )  # fmt: skip
        # With a certificate the broker takes the username from its CN and ignores this.
        client.username_pw_set(url.username or agent_id, password or url.password)
        if url.tls:
            context = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                context.load_cert_chain(cert_file, key_file)
            client.tls_set_context(context)
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self.client = client
        loop.attach(client)

    # --- lifecycle (call on the loop's thread) ---------------------------------------
    def start(self, delay: float = 0.0) -> None:
        self._connect_timer = self.loop.call_later(delay, self._connect)
        t = self.timing
        self._every("telemetry", t.telemetry_interval, self._telemetry_tick)
        self._every("heartbeat", t.heartbeat_interval, self._heartbeat_tick)
        self._every("inventory", t.inventory_interval, self._inventory_tick, first=0.0)

    def stop(self) -> None:
        """Graceful stop: publish `offline` ourselves, then disconnect (no will)."""
        if self.stopping:
            return
        self.stopping = True
        self._cancel_timers()
        if self.connecting:
            return  # _connect_done finishes once the worker let go of the client
        if not self.connected:
            self._finish()
            return
        assert self.epoch is not None
        info = self.client.publish(
            self.topics.status,
            protocol.status(AgentState.OFFLINE, self.epoch, reason=protocol.STOP_REASON),
            qos=1,
            retain=True,
        )
        self._offline_mid = info.mid
        self.loop.call_later(self.timing.stop_timeout, self._disconnect_now)

    def register(self) -> None:
        """Send the registration (done on every connect; call again when facts change)."""
        if self.connected:
            self._publish(
                self.topics.register,
                protocol.register(self.host.info(), self.agent_version, self.tags),
                qos=1,
            )

    def crash(self, pause: float) -> None:
        """Simulate a crash: leave with the will published, come back after `pause` s."""
        if self.connected:
            self._pause_next = pause
            if self.mqtt5:
                self.client.disconnect(
                    reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=DISCONNECT_WITH_WILL)
                )
                return
            # MQTT 3.1.1 has no "disconnect with will": end the TCP connection without a
            # DISCONNECT, as a crashed process does; paho notices and reconnects.
            sock = self.client.socket()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def pause(self, pause: float) -> None:
        """Simulate a clean stop and restart of the agent after `pause` s."""
        if self.connected and self.epoch is not None:
            self._pause_next = pause
            self.client.publish(
                self.topics.status,
                protocol.status(AgentState.OFFLINE, self.epoch, reason=protocol.STOP_REASON),
                qos=1,
                retain=True,
            )
            self.client.disconnect()

    def abandon(self) -> None:
        """Stop everything without a word to the broker, socket left open: a frozen
        process (tests of the reconnect race)."""
        self.stopping = self.stopped = True
        self._cancel_timers()
        self._leave_gate()
        self.loop.detach(self.client)

    def _every(
        self, name: str, interval: float, fn: Callable[[], None], first: float | None = None
    ) -> None:
        """Run `fn` every `interval` s; the first run after `first` s (default: one
        interval, or a random part of it for a fleet)."""
        if first is None:
            first = interval * (self.rng.random() if self.timing.random_phase else 1.0)

        def tick() -> None:
            if self.stopping:
                return
            self._periodic[name] = self.loop.call_later(interval, tick)
            fn()

        self._periodic[name] = self.loop.call_later(first, tick)

    def _cancel_timers(self) -> None:
        for t in (*self._periodic.values(), self._connect_timer, self._connack_timer):
            if t is not None:
                t.cancel()
        self._periodic.clear()

    def _finish(self) -> None:
        self._leave_gate()
        if not self.stopped:
            self.stopped = True
            sock = self.client.socket()
            self.loop.detach(self.client)
            if sock is not None:  # e.g. stopped in the middle of connecting
                with contextlib.suppress(OSError):
                    sock.close()
            if self.on_stopped is not None:
                self.on_stopped()

    def _disconnect_now(self) -> None:
        if not self.stopped:
            self.client.disconnect()
            if not self.connected:
                self._finish()

    # --- connecting --------------------------------------------------------------------
    def _connect(self) -> None:
        if self.stopping or self._in_gate or self._gate_queued:
            return
        self._gate_queued = True
        self.loop.connect_gate.enter(self._connect_admitted)

    def _leave_gate(self) -> None:
        """The broker answered, or this connect ended without an answer."""
        if self._in_gate:
            self._in_gate = False
            self.loop.connect_gate.leave()

    def _connect_admitted(self) -> None:
        self._gate_queued = False
        self._in_gate = True
        if self.stopping:
            self._leave_gate()
            return
        if self._connack_timer is not None:
            self._connack_timer.cancel()
        epoch = self.epochs.next()
        self._pending_epoch = epoch
        self._own_epochs.append(epoch)
        self.client.will_set(self.topics.status, protocol.will(epoch), qos=1, retain=True)
        url, keepalive = self.url, self.timing.keepalive
        props: Properties | None = None
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.timing.session_expiry

        def connect() -> None:  # on a worker thread: DNS, TCP and TLS may stall there
            if props is not None:
                self.client.connect(
                    url.host, url.port, keepalive=keepalive, clean_start=False, properties=props
                )
            else:
                self.client.connect(url.host, url.port, keepalive=keepalive)

        self.connecting = True
        self.loop.connect_in_background(self.client, connect, self._connect_done)

    def _connect_done(self, error: BaseException | None) -> None:
        self.connecting = False
        if self.stopping:
            self._finish()  # not CONNACKed yet: close; a will that may go out says offline
            return
        if error is not None:
            self._leave_gate()
            self.counters.connect_failures += 1
            log.warning(
                "cannot reach the broker",
                extra={"agent_id": self.agent_id, "broker": str(self.url), "error": str(error)},
            )
            self._schedule_reconnect(self._next_backoff())
            return
        self._tune_socket()
        self._connack_timer = self.loop.call_later(self.timing.connack_timeout, self._no_connack)

    def _tune_socket(self) -> None:
        """Let the kernel find a dead link too: TCP keepalive probes after `keepalive` s of
        silence, and (Linux) TCP_USER_TIMEOUT, which aborts a connection whose sent data
        stays unacknowledged for 1.5 x keepalive, so telemetry on a half-open link ends
        it without waiting for MQTT's ping. Options a platform lacks are skipped."""
        sock = self.client.socket()
        if not isinstance(sock, socket.socket):
            return
        ka = max(1, self.timing.keepalive)
        options = [
            (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
            (socket.IPPROTO_TCP, "TCP_KEEPIDLE", ka),
            (socket.IPPROTO_TCP, "TCP_KEEPINTVL", max(1, ka // 3)),
            (socket.IPPROTO_TCP, "TCP_KEEPCNT", 3),
            (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", int(1500 * ka)),
        ]
        for level, name, value in options:
            option = getattr(socket, name, None)
            if option is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(level, option, value)

    def _no_connack(self) -> None:
        if not self.connected and not self.stopping:
            log.warning("no CONNACK from the broker", extra={"agent_id": self.agent_id})
            self._leave_gate()
            self.client.disconnect()

    def _next_backoff(self) -> float:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self.timing.reconnect_max)
        return delay * (0.5 + self.rng.random())  # jitter: a fleet must not reconnect in step

    def _schedule_reconnect(self, delay: float) -> None:
        if self.stopping:
            return
        if self._connect_timer is not None:
            self._connect_timer.cancel()
        self._connect_timer = self.loop.call_later(delay, self._connect)

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._leave_gate()
        if self._connack_timer is not None:
            self._connack_timer.cancel()
        if reason.is_failure:
            text = str(reason)
            log.error(
                "the broker refused the connection",
                extra={"agent_id": self.agent_id, "reason": text},
            )
            if (
                text in FATAL_CONNECT_REASONS
                and not self.ever_connected
                and self.on_fatal is not None
            ):
                self.stopping = True
                self._cancel_timers()
                self.on_fatal(text)
            return  # the broker closes the connection; _on_disconnect plans a retry
        assert self._pending_epoch is not None
        self.epoch = self._pending_epoch
        self.connected = self.ever_connected = True
        self._connected_at = time.monotonic()
        self.counters.connects += 1
        self._backoff = self.timing.reconnect_min
        log.info(
            "connected",
            extra={"agent_id": self.agent_id, "epoch": self.epoch,
                   "session_present": flags.session_present},
        )  # fmt: skip
        # Our own status: to repair it if an older last will overwrites it. Subscribed
        # before our online goes out, so the retained message we get is the previous
        # state: an `online` of a foreign epoch there means a clone (see _on_message).
        self._subscribe(client, self.topics.status)
        if self.on_task is not None:
            # Also on a resumed session: re-subscribing is harmless, and a session the
            # broker lost (session_present false) would otherwise receive no tasks.
            self._subscribe(client, self.topics.tasks)
        client.publish(
            self.topics.status,
            protocol.status(AgentState.ONLINE, self.epoch, session_present=flags.session_present),
            qos=1,
            retain=True,
        )
        self.register()
        self._buffer_said = None  # this connection's first heartbeat tells the counts
        self._heartbeat_tick()
        self._send_buffered()
        self._inventory_tick()  # what changed while we were away

    def _subscribe(self, client: paho.Client, topic: str) -> None:
        if self.mqtt5:
            client.subscribe(topic, options=SubscribeOptions(qos=1))
        else:
            client.subscribe(topic, qos=1)

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        was_connected = self.connected
        self.connected = False
        self._leave_gate()
        if self._connack_timer is not None:
            self._connack_timer.cancel()
        if was_connected:
            self.counters.disconnects += 1
            if not self.stopping:
                log.warning(
                    "disconnected", extra={"agent_id": self.agent_id, "reason": str(reason)}
                )
            if time.monotonic() - self._connected_at >= STABLE_S:
                self._takeover_backoff = self.timing.takeover_min
        if self.stopping:
            self._finish()
            return
        clone = time.monotonic() - self._clone_seen_at < self.timing.takeover_max
        if reason.value == SESSION_TAKEN_OVER or (clone and self._pause_next is None):
            self.counters.takeovers += 1
            delay = self._takeover_backoff * (0.5 + self.rng.random())
            self._takeover_backoff = min(self._takeover_backoff * 2, self.timing.takeover_max)
            log.error(
                "another client connected with this agent id; backing off",
                extra={"agent_id": self.agent_id, "retry_in_s": round(delay, 1)},
            )
        elif self._pause_next is not None:
            delay, self._pause_next = self._pause_next, None
        else:
            delay = (
                self._next_backoff()
                if not was_connected
                else self.timing.reconnect_min * (0.5 + self.rng.random())
            )
        self._schedule_reconnect(delay)

    def _on_publish(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        _reason: ReasonCode,
        _props: Properties,
    ) -> None:
        seq = self._buffered_mids.pop(mid, None)
        if seq is not None:
            self.buffer.acked(seq)
        if self.stopping and mid == self._offline_mid:
            self.client.disconnect()

    # --- our own status ------------------------------------------------------------------
    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.topics.tasks and self.on_task is not None:
            self.on_task(msg.payload)
            return
        if msg.topic != self.topics.status:
            return
        try:
            seen: Status = parse(Kind.STATUS, self.agent_id, msg.payload)
        except PayloadError:
            return
        if seen.state is AgentState.ONLINE and seen.epoch not in self._own_epochs:
            self._clone_seen_at = time.monotonic()
            log.warning(
                "an online status with a foreign epoch: another client may use this agent id",
                extra={"agent_id": self.agent_id, "seen_epoch": seen.epoch},
            )
        if msg.retain:
            # Sent because we subscribed, which we do before publishing our online: it
            # is the state before this session and our online replaces it anyway.
            return
        action = protocol.on_own_status(
            self.epoch if self.connected else None, seen.state, seen.epoch, stopping=self.stopping
        )
        if action is OwnStatusAction.REPUBLISH and self.epoch is not None:
            self.counters.republished += 1
            log.info(
                "republishing online over an older offline",
                extra={"agent_id": self.agent_id, "epoch": self.epoch, "seen_epoch": seen.epoch},
            )
            self.client.publish(
                self.topics.status,
                protocol.status(AgentState.ONLINE, self.epoch, reason=protocol.REPUBLISH_REASON),
                qos=1,
                retain=True,
            )
        elif action is OwnStatusAction.RECONNECT:
            self.counters.reconnects_for_epoch += 1
            self.epochs.observe(seen.epoch)
            log.warning(
                "our status shows an offline our epoch cannot override; reconnecting",
                extra={"agent_id": self.agent_id, "epoch": self.epoch, "seen_epoch": seen.epoch},
            )
            # A normal DISCONNECT (no will); the next session gets a newer epoch.
            self._pause_next = 0.0
            self.client.disconnect()

    # --- periodic work -------------------------------------------------------------------
    def _telemetry_tick(self) -> None:
        sample = protocol.sample(self.host.metrics())
        if self.connected:
            self._publish(self.topics.telemetry, protocol.telemetry(sample), qos=1)
            self.counters.telemetry_sent += 1
        else:
            self.buffer.append(sample)

    def _send_buffered(self) -> None:
        """What the buffer holds and this process has not handed to the client yet,
        oldest first, in batches; each batch is forgotten by the buffer only once the
        broker acknowledged it (`_on_publish`)."""
        pending = self.buffer.unsent()
        if not pending:
            return
        messages = 0
        for i in range(0, len(pending), MAX_BATCH):
            chunk = pending[i : i + MAX_BATCH]
            payloads = protocol.telemetry_batches([s for _, s in chunk])
            for payload in payloads:
                info = self.client.publish(self.topics.telemetry, payload, qos=1)
                messages += 1
            # QoS 1 is acknowledged in order on a connection: the chunk's last message
            # acknowledged means all of it was taken.
            self._buffered_mids[info.mid] = chunk[-1][0]
            self.buffer.sent(chunk[-1][0])
        self.counters.buffered_sent += len(pending)
        self.counters.batches_sent += messages
        log.info(
            "sent buffered telemetry",
            extra={"agent_id": self.agent_id, "samples": len(pending), "messages": messages,
                   "dropped": self.buffer.dropped},
        )  # fmt: skip

    def _heartbeat_tick(self) -> None:
        if self.connected:
            # The buffer's counts go with the first heartbeat of a connection and with
            # any that follows a change: cheap for the bridge, current for operators.
            counts = (len(self.buffer), self.buffer.dropped)
            said = counts if counts != self._buffer_said else None
            self._buffer_said = counts
            payload = protocol.heartbeat(self._heartbeat_seq, self.host.uptime(), said)
            self._heartbeat_seq += 1
            self._publish(self.topics.heartbeat, payload, qos=0)
            self.counters.heartbeats_sent += 1

    def _inventory_tick(self) -> None:
        software = self.host.software()
        if software is None:
            return
        self._inventory = software
        if self.connected:
            self._send_inventory(software)

    def _send_inventory(self, software: Sequence[Software]) -> None:
        digest = protocol.software_digest(software)
        if digest == self._inventory_sent:
            return
        self._publish(self.topics.inventory, protocol.inventory(software), qos=1)
        self._inventory_sent = digest
        self.counters.inventories_sent += 1
        log.info("inventory sent", extra={"agent_id": self.agent_id, "packages": len(software)})

    def report_task(self, doc: dict[str, Any]) -> None:
        """Publish a task-status report; callable from any thread (task workers)."""
        payload = orjson.dumps(doc)
        self.loop.call_soon_threadsafe(lambda: self._publish(self.topics.task_status, payload, 1))

    def report_deployment(self, doc: dict[str, Any]) -> None:
        """Publish a deployment-status report; callable from any thread. Through the
        same queue as task reports, so the two keep the order they were made in."""
        payload = orjson.dumps(doc)
        topic = self.topics.deployment_status
        self.loop.call_soon_threadsafe(lambda: self._publish(topic, payload, 1))

    def _publish(self, topic: str, payload: bytes, qos: int) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("publish failed", extra={"agent_id": self.agent_id, "rc": int(info.rc)})
