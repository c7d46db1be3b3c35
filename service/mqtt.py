"""paho-mqtt 2.x clients as the bridge, the CLI and the agents build them.

paho is used (not aiomqtt) wherever messages flow in bulk: FACTS.md measured it at
2-3 x aiomqtt's throughput, and it has the public manual ack the bridge needs to
acknowledge a QoS 1 message only after its rows are committed.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from service.config import MqttUrl

OnConnect = Callable[[paho.Client, Any, paho.ConnectFlags, ReasonCode, Properties | None], None]

SESSION_EXPIRY_S = 7 * 24 * 3600  # a persistent session outlives a week-long absence


class MqttConnectError(ConnectionError):
    """The broker refused us (code kept) or could not be reached."""

    def __init__(self, message: str, *, reason: str | None = None, fatal: bool = False):
        super().__init__(message)
        self.reason = reason
        self.fatal = fatal  # retrying cannot help (bad credentials, not authorised)


def make_client(
    url: MqttUrl,
    client_id: str,
    *,
    manual_ack: bool = False,
    ca_file: str | None = None,
) -> paho.Client:
    client = paho.Client(
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


_FATAL_REASONS = {
    "Bad user name or password",
    "Not authorized",
    "Client identifier not valid",
    "Banned",
    "Bad authentication method",
}


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
                        fatal=str(reason) in _FATAL_REASONS,
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
