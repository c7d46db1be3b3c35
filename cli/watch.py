"""`eucora agents watch`: what agents say, live, over MQTT (docs/agents.md, "Watching").

A read-only subscriber with the operator's account on the service listener: status
changes, registrations, task and deployment reports, one line each as they arrive
(`--json`: one object per line). It is a plain, non-persistent QoS 0 subscription that
asks for no retained messages, so it takes nothing from the bridge (each subscriber
gets its own copy) and leaves nothing queued at the broker when it goes. Low volume,
async: aiomqtt's ground (paho stays the bridge's, for its manual acks).

Exit codes: 0 on Ctrl-C or after --count messages; 2 a bad URL or an account the broker
refuses; 4 the broker cannot be reached or goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import aiomqtt
import orjson
import typer
from paho.mqtt.subscribeoptions import SubscribeOptions

from cli.common import EXIT_UNREACHABLE, EXIT_USAGE, fail
from schemas.config import DEFAULT_TOPIC_ROOT, ConfigError, MqttUrl, check_topic_root
from schemas.payloads import DeploymentStatusReport, Register, Status, TaskStatusReport
from schemas.topics import Kind, TopicTree, is_agent_id
from schemas.validate import PayloadError, parse

WATCHED: Final = (Kind.STATUS, Kind.REGISTER, Kind.TASK_STATUS, Kind.DEPLOYMENT_STATUS)
# MQTT 5 CONNACK reason codes (and 3.1.1 return codes) that mean "not this account".
REFUSED: Final = {4, 5, 134, 135}


def describe(kind: Kind, model: Any) -> str:
    """The readable part of one line, by kind."""
    if isinstance(model, Status):
        reason = f" ({model.reason})" if model.reason else ""
        return f"{model.state.value} (epoch {model.epoch}){reason}"
    if isinstance(model, Register):
        return (
            f"registered {model.hostname} {model.platform.value} {model.os_version},"
            f" agent {model.agent_version}, {model.ip_address}"
        )
    if isinstance(model, TaskStatusReport):
        progress = f" {model.progress:g}%" if model.progress is not None else ""
        error = f": {model.error[:120]}" if model.error else ""
        return f"task {model.task_id} {model.status.value}{progress}{error}"
    if isinstance(model, DeploymentStatusReport):
        message = f": {model.message[:120]}" if model.message else ""
        return f"deployment {model.deployment_id} {model.status.value} {model.progress:g}%{message}"
    return str(kind)


def render(message: aiomqtt.Message, tree: TopicTree, as_json: bool) -> str | None:
    """One output line for a message; None for what is not an agent's report."""
    try:
        where = tree.parse(str(message.topic))
    except ValueError:
        return None
    raw = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
    received = datetime.now(UTC).isoformat()
    try:
        model = parse(where.kind, where.agent_id, raw)
    except PayloadError as exc:
        if as_json:
            doc = {"received": received, "agent_id": where.agent_id, "kind": str(where.kind),
                   "invalid": exc.reason, "detail": exc.detail}  # fmt: skip
            return orjson.dumps(doc).decode()
        return (
            f"{received[:23]}  {where.agent_id}  {where.kind}  invalid ({exc.reason}): {exc.detail}"
        )
    if as_json:
        doc = {"received": received, "agent_id": where.agent_id, "kind": str(where.kind),
               "payload": orjson.loads(raw)}  # fmt: skip
        return orjson.dumps(doc).decode()
    return f"{received[:23]}  {where.agent_id}  {where.kind}  {describe(where.kind, model)}"


async def stream(
    url: MqttUrl, tree: TopicTree, agent: str | None, ca_file: str | None, as_json: bool,
    count: int | None,
) -> None:  # fmt: skip
    tls = ssl.create_default_context(cafile=ca_file) if url.tls else None
    client = aiomqtt.Client(
        url.host, url.port, username=url.username, password=url.password,
        identifier=f"eucora-watch-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5, tls_context=tls, timeout=10,
    )  # fmt: skip
    # Live only: retained status messages (every agent's last one) are not replayed.
    options = SubscribeOptions(qos=0, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
    seen = 0
    async with client:
        for kind in WATCHED:
            topic = tree.agent(agent, kind) if agent else tree.wildcard(kind)
            await client.subscribe(topic, options=options)
        # On stderr, so that --json keeps stdout to one object per line.
        print(f"watching {url} ({'agent ' + agent if agent else 'every agent'}); Ctrl-C stops",
              file=sys.stderr, flush=True)  # fmt: skip
        async for message in client.messages:
            line = render(message, tree, as_json)
            if line is None:
                continue
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                return


def watch(
    agent: Annotated[str | None, typer.Option("--agent", help="only this agent")] = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="one JSON object per line (received, agent_id, kind, payload)"),
    ] = False,
    count: Annotated[int | None, typer.Option(min=1, help="stop after this many messages")] = None,
    mqtt_url: Annotated[
        str | None,
        typer.Option(envvar="EUCORA_MQTT_URL", help="the broker, with the operator's account"),
    ] = None,
    ca_file: Annotated[
        str | None, typer.Option(envvar="EUCORA_CA_FILE", help="CA of an mqtts:// broker")
    ] = None,
    topic_root: Annotated[
        str, typer.Option(envvar="EUCORA_TOPIC_ROOT", help="the topic root")
    ] = DEFAULT_TOPIC_ROOT,
) -> None:
    """Follow agents live: status changes, registrations, task and deployment reports,
    one line each as they happen (Ctrl-C stops)."""
    if agent is not None and not is_agent_id(agent):
        fail(f"--agent {agent!r} is not a valid agent id")
    if not mqtt_url:
        fail("EUCORA_MQTT_URL is not set and --mqtt-url was not given (`eucora stack env`)")
    try:
        url = MqttUrl.parse(mqtt_url)
        tree = TopicTree(check_topic_root(topic_root))
    except ConfigError as exc:
        fail(str(exc))
    try:
        asyncio.run(stream(url, tree, agent, ca_file, json_output, count))
    except KeyboardInterrupt:
        return
    except aiomqtt.MqttCodeError as exc:
        code = exc.rc if isinstance(exc.rc, int) else getattr(exc.rc, "value", None)
        if code in REFUSED:
            fail(f"the broker {url} refused the account {url.username!r}: {exc}", EXIT_USAGE)
        fail(f"lost the broker {url}: {exc}", EXIT_UNREACHABLE)
    except (aiomqtt.MqttError, OSError) as exc:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        fail(f"cannot reach the broker {url}: {exc}", EXIT_UNREACHABLE)
