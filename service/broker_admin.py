"""Broker account administration at runtime, over the dynamic security $CONTROL topic.

Used by `eucora agents provision/revoke` and the stack; no broker restart is needed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from typing import Any, Self

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas.topics import TopicTree
from service import dynsec
from service.config import MqttUrl

REQUEST_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"


class BrokerAdmin:
    """A synchronous admin session: `with BrokerAdmin(url) as admin: admin.provision(...)`."""

    def __init__(self, url: MqttUrl, *, tree: TopicTree | None = None, timeout: float = 10.0):
        self.url = url
        self.tree = tree or TopicTree()
        self.timeout = timeout
        self._responses: queue.Queue[dict[str, Any]] = queue.Queue()
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="", protocol=MQTTProtocolVersion.MQTTv5
        )
        if url.username:
            self._client.username_pw_set(url.username, url.password)
        if url.tls:
            self._client.tls_set()
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def _on_connect(
        self, client: paho.Client, _u: object, _f: object, reason: Any, _p: object
    ) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
        else:
            client.subscribe(RESPONSE_TOPIC, qos=1)
        self._connected.set()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self._responses.put(orjson.loads(msg.payload))

    def __enter__(self) -> Self:
        self._client.connect(self.url.host, self.url.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(self.timeout):
            self.close()
            raise ConnectionError(f"broker {self.url} did not answer within {self.timeout:.0f} s")
        if self._connect_error:
            self.close()
            raise ConnectionError(f"broker {self.url} refused the admin: {self._connect_error}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def execute(
        self, commands: list[dict[str, Any]], *, ignore: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """Send commands in one control message; raise DynsecError on an unexpected error."""
        # The subscription must be in place before the first request; a QoS 1 SUBACK
        # arrives before our PUBLISH is processed since the broker handles them in order.
        info = self._client.publish(REQUEST_TOPIC, orjson.dumps({"commands": commands}), qos=1)
        info.wait_for_publish(self.timeout)
        try:
            answer = self._responses.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError("no answer from the broker's dynamic security plugin") from None
        responses: list[dict[str, Any]] = answer.get("responses", [])
        allowed = set(ignore)
        for r in responses:
            err = r.get("error")
            if err and err not in allowed:
                raise dynsec.DynsecError(str(r.get("command")), str(err))
        return responses

    def provision(self, agent_id: str, password: str) -> None:
        self.execute(dynsec.provision_commands(self.tree, agent_id, password))

    def provision_many(self, agents: dict[str, str], chunk: int = 200) -> None:
        items = list(agents.items())
        for i in range(0, len(items), chunk):
            commands: list[dict[str, Any]] = []
            for agent_id, password in items[i : i + chunk]:
                commands += dynsec.provision_commands(self.tree, agent_id, password)
            self.execute(commands)

    def revoke(self, agent_id: str) -> None:
        self.execute(
            dynsec.revoke_commands(agent_id),
            ignore=("Client not found", "Role not found"),
        )
