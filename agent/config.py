"""The reference agent's configuration: flags > environment > file > defaults.

The file is TOML or JSON (by its extension); the JSON that `eucora agents provision
ID --json` prints (agent_id, mqtt_url, username, password, ca_file, cert_file,
key_file) is a valid file. An agent authenticates with a password, or with a client
certificate (cert_file + key_file, from `agents provision --cert`) on the brokers'
certificate listener.
"""

from __future__ import annotations

import json
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.buffer import DEFAULT_MAX_AGE_S
from agent.session import Timing
from schemas.config import DEFAULT_TOPIC_ROOT, ConfigError, MqttUrl, check_topic_root
from schemas.constants import MQTT_VERSIONS
from schemas.topics import is_agent_id

# setting -> environment variable
ENV: dict[str, str] = {
    "agent_id": "EUCORA_AGENT_ID",
    "mqtt_url": "EUCORA_MQTT_URL",
    "password": "EUCORA_AGENT_PASSWORD",
    "topic_root": "EUCORA_TOPIC_ROOT",
    "ca_file": "EUCORA_CA_FILE",
    "cert_file": "EUCORA_CERT_FILE",
    "key_file": "EUCORA_KEY_FILE",
    "telemetry_interval": "EUCORA_AGENT_TELEMETRY_INTERVAL",
    "heartbeat_interval": "EUCORA_AGENT_HEARTBEAT_INTERVAL",
    "keepalive": "EUCORA_AGENT_KEEPALIVE",
    "inventory_interval": "EUCORA_AGENT_INVENTORY_INTERVAL",
    "buffer_size": "EUCORA_AGENT_BUFFER_SIZE",
    "buffer_max_age": "EUCORA_AGENT_BUFFER_MAX_AGE",
    "reconnect_max": "EUCORA_AGENT_RECONNECT_MAX",
    "tags": "EUCORA_AGENT_TAGS",
    "inventory": "EUCORA_AGENT_INVENTORY",
    "state_dir": "EUCORA_AGENT_STATE_DIR",
    "allow_list": "EUCORA_AGENT_ALLOW_LIST",
    "mqtt_version": "EUCORA_AGENT_MQTT_VERSION",
}
CONFIG_ENV = "EUCORA_AGENT_CONFIG"


@dataclass(frozen=True)
class AgentConfig:
    agent_id: str
    mqtt: MqttUrl
    password: str | None = field(default=None, repr=False)
    topic_root: str = DEFAULT_TOPIC_ROOT
    ca_file: str | None = None
    # A client certificate (CN = agent_id) and its private key: the identity instead
    # of a password, on a certificate listener.
    cert_file: str | None = None
    key_file: str | None = None
    timing: Timing = field(default_factory=Timing)
    tags: dict[str, str] = field(default_factory=dict)
    buffer_size: int = 10_000
    buffer_max_age: float = DEFAULT_MAX_AGE_S  # seconds a buffered sample is kept at most
    inventory: tuple[str, ...] | None = None  # None: the platform's default sources
    state_dir: Path | None = None
    # JSON file of the commands DEPLOY/REMEDIATE/UPDATE tasks may run (agent/tasks.py:
    # AllowList); none = such tasks are REJECTED.
    allow_list: Path | None = None
    mqtt_version: str = "5"  # or "3.1.1" (schemas.constants.MQTT_VERSIONS)


def parse_tags(value: str | list[str] | dict[str, str] | None) -> dict[str, str]:
    """'k=v,k2=v2', ['k=v', ...] or a mapping."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    items = value.split(",") if isinstance(value, str) else value
    tags: dict[str, str] = {}
    for item in items:
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"tag {item!r} is not key=value")
        tags[key.strip()] = val.strip()
    return tags


def read_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"agent config {path} is not valid: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"agent config {path} must be a table/object")
    return doc


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> AgentConfig:
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    path = config_file or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    doc = read_file(path) if path else {}
    # `username` (as `agents provision` prints it) must be the agent id.
    if "username" in doc and "agent_id" not in doc:
        doc["agent_id"] = doc["username"]

    def pick(name: str) -> Any:
        if name in flags:
            return flags[name]
        if env.get(ENV[name]):
            return env[ENV[name]]
        return doc.get(name)

    agent_id = pick("agent_id")
    if not agent_id:
        raise ConfigError("no agent id: set EUCORA_AGENT_ID or --agent-id")
    if not is_agent_id(str(agent_id)):
        raise ConfigError(f"agent id {agent_id!r} must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}$")
    url = pick("mqtt_url")
    if not url:
        raise ConfigError("no broker: set EUCORA_MQTT_URL (mqtt://AGENT_ID:PASSWORD@host:port)")
    mqtt = MqttUrl.parse(str(url))
    if mqtt.username and mqtt.username != agent_id:
        raise ConfigError(f"the MQTT username {mqtt.username!r} must be the agent id {agent_id!r}")
    if doc.get("username") and doc["username"] != agent_id:
        raise ConfigError(f"username {doc['username']!r} must be the agent id {agent_id!r}")
    cert_file, key_file = pick("cert_file"), pick("key_file")
    password = pick("password") or mqtt.password
    if not password and not cert_file:
        raise ConfigError(
            "no password: put it in EUCORA_MQTT_URL, EUCORA_AGENT_PASSWORD or the config file"
            " (or give a client certificate: cert_file and key_file)"
        )

    def number(name: str, default: float, *, minimum: float) -> float:
        value = pick(name)
        if value is None:
            return default
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if result < minimum:
            raise ConfigError(f"{name} must be at least {minimum:g}, got {value!r}")
        return result

    timing = replace(
        Timing(),
        telemetry_interval=number("telemetry_interval", 60, minimum=0.1),
        heartbeat_interval=number("heartbeat_interval", 60, minimum=0.1),
        keepalive=int(number("keepalive", 60, minimum=1)),
        inventory_interval=number("inventory_interval", 300, minimum=0.1),
        reconnect_max=number("reconnect_max", 30, minimum=0.1),
    )
    sources = pick("inventory")
    if isinstance(sources, str):
        sources = [s.strip() for s in sources.split(",") if s.strip()]
    if sources is not None:
        from agent.inventory import SOURCES

        unknown = [s for s in sources if s not in SOURCES and s != "none"]
        if unknown:
            raise ConfigError(f"unknown inventory source(s) {unknown}: use {sorted(SOURCES)}")
        sources = tuple(s for s in sources if s != "none")
    state_dir = pick("state_dir")
    allow_list = pick("allow_list")
    ca_file = pick("ca_file")
    if ca_file and not Path(str(ca_file)).is_file():
        where = "EUCORA_CA_FILE" if "ca_file" not in doc or env.get(ENV["ca_file"]) else path
        raise ConfigError(
            f"CA file {ca_file} (from {where}) not found: copy the broker's CA certificate"
            " to this host and set ca_file in the config file (or EUCORA_CA_FILE) to its path"
        )
    for name, value in (("cert_file", cert_file), ("key_file", key_file)):
        if value and not Path(str(value)).is_file():
            where = ENV[name] if name not in doc or env.get(ENV[name]) else path
            raise ConfigError(
                f"{'certificate' if name == 'cert_file' else 'key'} file {value} (from {where})"
                f" not found: copy the agent's certificate and key (from `eucora agents"
                f" provision --cert`) to this host and set {name} (or {ENV[name]}) to its path"
            )
    if bool(cert_file) != bool(key_file):
        raise ConfigError("cert_file and key_file go together: give both or neither")
    if cert_file:
        try:  # unreadable, not PEM, or a key of another certificate: say so at start
            ssl.create_default_context().load_cert_chain(str(cert_file), str(key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot use the certificate {cert_file} with the key {key_file}: {exc}"
            ) from None
    if cert_file and not mqtt.tls:
        raise ConfigError(f"a client certificate needs an mqtts:// broker URL, not {mqtt}")
    if allow_list and not Path(str(allow_list)).is_file():
        raise ConfigError(f"allow-list file not found: {allow_list}")
    mqtt_version = str(pick("mqtt_version") or "5")
    if mqtt_version not in MQTT_VERSIONS:
        raise ConfigError(
            f"mqtt_version must be one of {', '.join(MQTT_VERSIONS)}, got {mqtt_version!r}"
        )
    return AgentConfig(
        mqtt_version=mqtt_version,
        agent_id=str(agent_id),
        mqtt=mqtt,
        password=str(password) if password else None,
        topic_root=check_topic_root(str(pick("topic_root") or DEFAULT_TOPIC_ROOT)),
        ca_file=str(ca_file) if ca_file else None,
        cert_file=str(cert_file) if cert_file else None,
        key_file=str(key_file) if key_file else None,
        timing=timing,
        tags=parse_tags(pick("tags")),
        buffer_size=int(number("buffer_size", 10_000, minimum=1)),
        buffer_max_age=number("buffer_max_age", DEFAULT_MAX_AGE_S, minimum=1),
        inventory=tuple(sources) if sources is not None else None,
        state_dir=Path(state_dir) if state_dir else None,
        allow_list=Path(str(allow_list)) if allow_list else None,
    )


def prepare_state_dir(path: Path) -> None:
    """Create the state folder and prove it writable now, not at the first task."""
    probe = path / ".write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"state folder {path} is not writable ({exc.strerror or exc}): give --state-dir"
            " (EUCORA_AGENT_STATE_DIR) a folder this user may write"
        ) from None
