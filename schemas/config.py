"""Configuration formats shared by the agent and the server (SPEC "Configuration").

The broker URL (`EUCORA_MQTT_URL`: mqtt://user:pass@host:port, mqtts:// for TLS) and
the topic root are read by the reference agent as well as by the bridge and the CLI,
so they live here, beside the rest of the contract, and the agent package needs
nothing from the server to read its configuration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from schemas.topics import DEFAULT_TOPIC_ROOT

__all__ = [
    "DEFAULT_TOPIC_ROOT",
    "ConfigError",
    "MqttUrl",
    "check_topic_root",
    "redact_url",
]

_TOPIC_ROOT_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


class ConfigError(ValueError):
    """The configuration is wrong; the message is fit for an operator's terminal."""


@dataclass(frozen=True)
class MqttUrl:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, *, var: str = "EUCORA_MQTT_URL") -> MqttUrl:
        """Parse a broker URL; `var` names the setting in error messages."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"{var} must start with mqtt:// or mqtts://, got {redact_url(url)!r}")
        if not parts.hostname:
            raise ConfigError(f"{var} has no host: {redact_url(url)!r}")
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError as exc:
            raise ConfigError(f"{var} has a bad port: {redact_url(url)!r}") from exc
        return cls(
            host=parts.hostname,
            port=port,
            tls=parts.scheme == "mqtts",
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        """The URL without its password: safe to log."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """scheme://host:port, without any credentials (what an agent is told to dial)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


def redact_url(url: str) -> str:
    """Replace the password of a URL (mqtt://, postgresql://) with '***'."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def check_topic_root(root: str) -> str:
    if not _TOPIC_ROOT_RE.match(root):
        raise ConfigError(
            f"EUCORA_TOPIC_ROOT must be plain topic levels without wildcards, got {root!r}"
        )
    return root
