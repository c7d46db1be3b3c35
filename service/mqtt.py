"""paho-mqtt 2.x clients as the bridge, the CLI and the agents build them.

paho is used (not aiomqtt) wherever messages flow in bulk: measured on our machines at
2-3 x aiomqtt's throughput, and it has the public manual ack the bridge needs to
acknowledge a QoS 1 message only after its rows are committed.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from schemas.config import MqttUrl
from schemas.constants import FATAL_CONNECT_REASONS, SESSION_EXPIRY_S

OnConnect = Callable[[paho.Client, Any, paho.ConnectFlags, ReasonCode, Properties | None], None]


class MqttConnectError(ConnectionError):
    """The broker refused us (code kept) or could not be reached."""

    def __init__(self, message: str, *, reason: str | None = None, fatal: bool = False):
        super().__init__(message)
        self.reason = reason
        self.fatal = fatal  # retrying cannot help (bad credentials, not authorised)


class BufferedSocket:
    """Serves paho's many small reads from one large recv().

    paho reads each packet with at least three recv() calls (type byte, length bytes,
    body) and goes back to select() after every packet. Profiling the bridge showed
    those syscalls as a large share of its CPU; with this buffer one recv() brings in
    dozens of messages, and `pending()` (which paho consults, as for TLS sockets)
    tells its loop to read on without waiting.
    """

    def __init__(self, sock: Any, size: int = 256 * 1024):
        self._sock = sock
        self._size = size
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            data: bytes = self._sock.recv(self._size)  # raises BlockingIOError when dry
            if not data:
                return b""
            self._buf, self._pos = data, 0
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + int(inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class BufferedClient(paho.Client):
    """paho's client with buffered socket reads (see BufferedSocket)."""

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        # paho reads one packet per select(); drain what is already buffered first.
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(self._sock, BufferedSocket):
            if self._sock.pending() <= 0:
                break
            rc = super().loop_read(max_packets)
        return rc

    def ack_many(self, mids: Iterable[int]) -> None:
        """PUBACK many QoS 1 messages as one queued write.

        paho's ack() queues one 4-byte packet per message, and each costs a wake-up of
        its loop and a send() of its own; after a committed batch of thousands that was
        a measurable share of the bridge's CPU. MQTT is a byte stream, so the PUBACKs
        concatenated are the same packets to the broker.
        """
        # Each PUBACK is 4 bytes, fixed header 0x40, remaining length 2, packet id: one
        # big-endian 32-bit word, so the batch packs in one call.
        words = [_PUBACK_WORD | mid for mid in mids]
        if words:
            self._packet_queue(_PUBACK_BYTE, struct.pack(f"!{len(words)}I", *words), 0, 0)


_PUBACK_BYTE = 0x40
_PUBACK_WORD = 0x4002_0000


def make_client(
    url: MqttUrl,
    client_id: str,
    *,
    manual_ack: bool = False,
    ca_file: str | None = None,
) -> BufferedClient:
    client = BufferedClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=manual_ack,
    )
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        context = ssl.create_default_context(cafile=ca_file)
        client.tls_set_context(context)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def connect_properties(
    *, session_expiry: int = SESSION_EXPIRY_S, receive_maximum: int | None = None
) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    return props


@dataclass
class ConnectResult:
    session_present: bool


async def connect(
    client: paho.Client,
    url: MqttUrl,
    *,
    clean_start: bool = False,
    keepalive: int = 30,
    properties: Properties | None = None,
    connack_timeout: float = 10.0,
) -> ConnectResult:
    """Connect and start paho's network thread; return once the broker's CONNACK came.

    The blocking socket connect runs in a worker thread, never on the event loop.
    Afterwards paho reconnects by itself (loop_start) when the broker goes away.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[ConnectResult] = loop.create_future()
    previous = cast(OnConnect | None, client.on_connect)
    lock = threading.Lock()

    def on_connect(
        c: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        with lock:
            if not done.done():
                if reason.is_failure:
                    err = MqttConnectError(
                        f"broker {url} refused the connection: {reason}",
                        reason=str(reason),
                        fatal=str(reason) in FATAL_CONNECT_REASONS,
                    )
                    loop.call_soon_threadsafe(_settle, done, None, err)
                else:
                    result = ConnectResult(bool(flags.session_present))
                    loop.call_soon_threadsafe(_settle, done, result, None)
        if previous is not None:
            previous(c, userdata, flags, reason, props)

    client.on_connect = on_connect
    try:
        await asyncio.to_thread(
            client.connect,
            url.host,
            url.port,
            keepalive=keepalive,
            clean_start=clean_start,
            properties=properties,
        )
    except (OSError, ssl.SSLError) as exc:
        client.on_connect = previous
        raise MqttConnectError(f"cannot reach broker {url}: {exc}") from exc
    client.loop_start()
    try:
        return await asyncio.wait_for(done, connack_timeout)
    except BaseException:
        client.loop_stop()
        raise
    finally:
        client.on_connect = previous


def _settle(
    fut: asyncio.Future[ConnectResult], result: ConnectResult | None, err: Exception | None
) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        assert result is not None
        fut.set_result(result)
