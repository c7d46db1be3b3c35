"""Broker account administration at runtime, over the dynamic security $CONTROL topic.

Used by `eucora agents provision/revoke`, `eucora simulate` (the simulated fleet's
accounts), the stack and the benchmark; no broker restart is needed. The plugin
rewrites its whole JSON file after every control message, so bulk work goes in few,
large messages (`provision_many`).
"""

from __future__ import annotations

import queue
import secrets
import ssl
import threading
import time
from collections.abc import Iterable
from typing import Any, Self

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas.config import MqttUrl
from schemas.topics import TopicTree
from service import dynsec

REQUEST_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
# The broker refuses packets over max_packet_size (1 MiB in mosquitto/eucora.conf)
# by disconnecting the sender; a control message stays well under it.
MAX_MESSAGE_BYTES = 512 * 1024
# Mosquitto is single-threaded and the plugin (2.0.11) rewrites its whole file after
# every command: while a control message runs, the broker serves nobody. Bulk
# provisioning sizes its messages to stall the broker about this long at most.
MAX_STALL_S = 0.5
# Put in the answer queue when the connection drops: the waiting request fails at
# once instead of paho reconnecting and sending the request a second time.
_LOST: dict[str, Any] = {"lost": True}


class BrokerAdmin:
    """A synchronous admin session: `with BrokerAdmin(url) as admin: admin.provision(...)`."""

    def __init__(
        self,
        url: MqttUrl,
        *,
        tree: TopicTree | None = None,
        timeout: float = 10.0,
        ca_file: str | None = None,
    ):
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
            self._client.tls_set_context(ssl.create_default_context(cafile=ca_file))
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

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

    def _on_disconnect(self, client: paho.Client, *_: object) -> None:
        client.disconnect()  # no automatic reconnect: it would resend the request
        self._responses.put(_LOST)

    def __enter__(self) -> Self:
        try:
            # A long keepalive: the broker answers no PINGREQ while it runs a slow
            # control message, and a reconnect would run that message twice.
            self._client.connect(self.url.host, self.url.port, keepalive=300)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionError(f"cannot reach broker {self.url}: {exc}") from exc
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
        """Send commands in one control message; raise DynsecError on an unexpected error.

        The plugin runs the commands in order and answers each; one failing does not
        stop the others. Errors named in `ignore` are expected (e.g. "Role not found").
        """
        # The first command carries a request id that the plugin echoes, so an answer
        # that arrives after an earlier timeout is never taken for this one.
        request_id = secrets.token_hex(8)
        commands = [{**commands[0], "correlationData": request_id}, *commands[1:]]
        payload = orjson.dumps({"commands": commands})
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ValueError(f"control message of {len(payload)} bytes: send fewer commands")
        # The subscription is in place before the first request: a QoS 1 SUBACK comes
        # before our PUBLISH is processed since the broker handles them in order.
        info = self._client.publish(REQUEST_TOPIC, payload, qos=1)
        info.wait_for_publish(self.timeout)
        responses = self._await_answer(request_id)
        allowed = set(ignore)
        for r in responses:
            err = r.get("error")
            if err and err not in allowed:
                raise dynsec.DynsecError(str(r.get("command")), str(err))
        return responses

    def _await_answer(self, request_id: str) -> list[dict[str, Any]]:
        while True:
            try:
                answer = self._responses.get(timeout=self.timeout)
            except queue.Empty:
                raise TimeoutError("no answer from the broker's dynamic security plugin") from None
            if answer is _LOST:
                raise ConnectionError(f"lost the connection to broker {self.url}")
            responses: list[dict[str, Any]] = answer.get("responses", [])
            if responses and responses[0].get("correlationData") == request_id:
                return responses

    # --- agents -----------------------------------------------------------------
    def get_client(self, username: str) -> dict[str, Any] | None:
        """The plugin's record of an account (username, clientid, roles), or None."""
        (r,) = self.execute(
            [{"command": "getClient", "username": username}], ignore=("Client not found",)
        )
        if r.get("error"):
            return None
        client: dict[str, Any] = r["data"]["client"]
        return client

    def is_agent(self, agent_id: str) -> bool | None:
        """True: an agent account; False: some other account (the bridge...); None: none."""
        client = self.get_client(agent_id)
        if client is None:
            return None
        roles = {r.get("rolename") for r in client.get("roles", [])}
        return dynsec.agent_role_name(agent_id) in roles

    def provision(self, agent_id: str, password: str) -> None:
        """Create the agent's role and account; DynsecError if the account exists."""
        # A role left over from an interrupted revoke has the same ACLs: reuse it.
        self.execute(
            dynsec.provision_commands(self.tree, agent_id, password),
            ignore=("Role already exists",),
        )

    def provision_many(
        self, agents: dict[str, str], chunk: int = 10, *, max_stall: float | None = MAX_STALL_S
    ) -> int:
        """Provision many agents, up to `chunk` per control message; returns the number
        of messages sent.

        A message shrinks below `chunk` when it would exceed MAX_MESSAGE_BYTES, and the
        chunk adapts so that one message keeps the broker busy about `max_stall` seconds
        (None: a fixed chunk): each command costs a rewrite of the plugin's file, which
        grows with the fleet.
        """
        items = list(agents.items())
        sent = i = 0
        while i < len(items):
            batch: list[dict[str, Any]] = []
            size = n = 0
            for agent_id, password in items[i : i + max(1, chunk)]:
                commands = dynsec.provision_commands(self.tree, agent_id, password)
                size += len(orjson.dumps(commands))
                if batch and size > MAX_MESSAGE_BYTES - 1024:
                    break
                batch += commands
                n += 1
            started = time.monotonic()
            self.execute(batch, ignore=("Role already exists",))
            elapsed = time.monotonic() - started
            sent += 1
            i += n
            if max_stall is not None:  # aim at max_stall: shrink in proportion, grow by half
                chunk = max(1, min(int(n * max_stall / max(elapsed, 1e-3)), n + n // 2 + 1))
        return sent

    def provision_or_reset(self, agents: dict[str, str]) -> None:
        """Provision many agents (`provision_many`); if some accounts exist already
        (a fleet simulated before: same ids), every account gets its new password and
        any missing role or account is made, 100 agents per control message."""
        try:
            self.provision_many(agents)
        except dynsec.DynsecError as exc:
            if "already exists" not in exc.error:
                raise
            items = list(agents.items())
            for i in range(0, len(items), 100):
                commands: list[dict[str, Any]] = []
                for agent_id, password in items[i : i + 100]:
                    commands += dynsec.provision_commands(self.tree, agent_id, password)
                    commands.append(
                        {"command": "setClientPassword", "username": agent_id,
                         "password": password}
                    )  # fmt: skip
                self.execute(commands, ignore=("Role already exists", "Client already exists"))

    def rotate(self, agent_id: str, password: str) -> None:
        """A new password; the plugin disconnects a client connected with the old one."""
        self.execute([{"command": "setClientPassword", "username": agent_id, "password": password}])

    def revoke(self, agent_id: str) -> None:
        """Delete the account and its role; the plugin disconnects the client at once."""
        self.execute(
            dynsec.revoke_commands(agent_id),
            ignore=("Client not found", "Role not found"),
        )
