"""The bridge's link to one broker: the MQTT connection and nothing else.

A `BrokerLink` owns one paho client (its network thread, its persistent session, its
reconnects). It offers what the rest of the bridge needs and no more:

- `subscribe(filters)` before `start()`: the subscriptions are made again on every
  connect (a broker restarted without its store has forgotten them);
- `consume(on_message, index)`: paho's on_message, on its network thread;
- `ack(messages)`: the manual QoS 1 acknowledgements, each sent only if the
  message came on the current connection (`generation`), since packet ids of an
  earlier connection mean nothing on this one and the broker redelivers those;
- `publish(...)`: a QoS 1 publish whose broker PUBACK is awaited as a future.

Ingest consumes from a link and the outbox publishes through it; neither knows the
other. The composition root (app.py) builds one link per broker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from schemas.config import MqttUrl
from service import metrics, mqtt

log = logging.getLogger("eucora.bridge.link")

# paho's own on_message signature: (client, userdata, message), on paho's thread. The
# userdata is the index the link was given, so one consumer serves several links
# without a wrapper call per message.
OnMessage = Callable[[paho.Client, Any, paho.MQTTMessage], None]


class Ackable(Protocol):
    mid: int
    qos: int
    generation: int


class BrokerLink:
    def __init__(
        self,
        url: MqttUrl,
        client_id: str,
        *,
        ca_file: str | None = None,
        receive_maximum: int = 65535,
    ) -> None:
        self.url = url
        self.client_id = client_id
        self.receive_maximum = min(receive_maximum, 65535)
        self.connected = False
        self.generation = 0  # +1 per connection; written on paho's thread only
        self._filters: list[tuple[str, int]] = []
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # PUBACK futures by packet id. A PUBACK can arrive before publish() has
        # registered its future (paho's thread is fast): it is parked in _early.
        self._lock = threading.Lock()
        self._pubacks: dict[int, asyncio.Future[bool]] = {}
        self._early: dict[int, bool] = {}
        # Packet ids nobody waits for any more (timed out, or published while down):
        # their late PUBACK must not be taken for the next message with the same id.
        self._ignored: set[int] = set()
        self._client = mqtt.make_client(url, client_id, manual_ack=True, ca_file=ca_file)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    def __str__(self) -> str:
        return str(self.url)

    def subscribe(self, filters: list[tuple[str, int]]) -> None:
        self._filters.extend(filters)

    def consume(self, on_message: OnMessage, index: int) -> None:
        """Deliver every message to `on_message` (on paho's thread), with `index` as
        its userdata argument. Read `generation` there for the message's connection."""
        self._client.user_data_set(index)
        self._client.on_message = on_message

    async def start(self) -> None:
        """Connect (raises service.mqtt.MqttConnectError); messages start flowing."""
        self._loop = asyncio.get_running_loop()
        props = mqtt.connect_properties(receive_maximum=self.receive_maximum)
        await mqtt.connect(self._client, self.url, clean_start=False, properties=props)

    def ack(self, messages: Iterable[Ackable]) -> None:
        """Acknowledge QoS 1 messages that came on the current connection."""
        generation = self.generation
        self._client.ack_many(
            [m.mid for m in messages if m.qos == 1 and m.generation == generation]
        )

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        properties: Properties | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 (a PUBACK wait, not the caller's)
    ) -> bool:
        """Publish at QoS 1; True once the broker acknowledged it with success, False
        when it refused it, the link is down, or no PUBACK came within `timeout`."""
        assert self._loop is not None, "start() first"
        fut: asyncio.Future[bool] = self._loop.create_future()
        try:
            info = self._client.publish(topic, payload, qos=1, properties=properties)
        except ValueError as exc:  # paho's own checks (size, topic)
            log.warning("publish refused by the client", extra={"topic": topic, "error": str(exc)})
            return False
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # Not connected: paho may still send it after a reconnect (a harmless
            # duplicate, agents dedupe by task id); the caller keeps the row due.
            with self._lock:
                self._ignored.add(info.mid)
            return False
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pubacks[info.mid] = fut
        if early is not None:
            return early
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return False
        finally:
            with self._lock:
                if self._pubacks.get(info.mid) is fut:
                    del self._pubacks[info.mid]
                    self._ignored.add(info.mid)

    async def close(self) -> None:
        self._closing = True
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        with self._lock:
            pending = list(self._pubacks.values())
            self._pubacks.clear()
        for fut in pending:
            if not fut.done():
                fut.cancel()

    # --- paho's network thread ---------------------------------------------------
    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            return
        self.generation += 1
        if self._filters:
            client.subscribe(self._filters)
        self.connected = True
        metrics.BROKER_CONNECTED.labels(self.url.endpoint).set(1)
        log.info(
            "connected to broker",
            extra={"broker": str(self.url), "session_present": bool(flags.session_present)},
        )

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        self.connected = False
        metrics.BROKER_CONNECTED.labels(self.url.endpoint).set(0)
        if not self._closing:
            log.warning(
                "disconnected from broker", extra={"broker": str(self.url), "reason": str(reason)}
            )

    def _on_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        ok = not reason.is_failure
        with self._lock:
            fut = self._pubacks.pop(mid, None)
            if fut is None:
                if mid in self._ignored:
                    self._ignored.discard(mid)
                else:
                    self._early[mid] = ok
                return
        if self._loop is not None:
            self._loop.call_soon_threadsafe(_settle, fut, ok)


def _settle(fut: asyncio.Future[bool], ok: bool) -> None:
    if not fut.done():
        fut.set_result(ok)
