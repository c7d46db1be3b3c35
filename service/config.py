"""Settings, read once from the environment (or CLI options) and checked before anything connects.

One place reads EUCORA_* variables; everything else receives a `Settings` value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from schemas.config import (
    DEFAULT_TOPIC_ROOT,
    ConfigError,
    MqttUrl,
    check_topic_root,
    redact_url,
)


def check_database_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"EUCORA_DATABASE_URL must start with postgresql://, got {redact_url(url)!r}"
        )
    return url


def check_events_url(value: str | None) -> str | None:
    """None or '' (no forwarding), or one or more nats:// (tls://) URLs, comma-separated
    (the servers of one cluster)."""
    if not value:
        return None
    for url in value.split(","):
        parts = urlsplit(url.strip())
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ConfigError(
                "EUCORA_EVENTS_URL must be nats://[user:password@]host:port (several"
                f" comma-separated), got {redact_url(url.strip())!r}"
            )
    return value


@dataclass(frozen=True)
class Settings:
    mqtt: MqttUrl
    database_url: str = field(repr=False)
    topic_root: str = DEFAULT_TOPIC_ROOT
    metrics_port: int = 9108  # 0 disables the HTTP endpoint
    # The address /metrics, /healthz, /readyz listen on: loopback unless asked (a
    # container publishes the port, so compose.yaml sets 0.0.0.0).
    metrics_bind: str = "127.0.0.1"
    client_id: str = "eucora-bridge"
    # How long the bridge keeps retrying a broker or database that is down at start.
    connect_timeout_s: float = 30.0
    ca_file: str | None = None
    # Ingest: messages per transaction, the longest a lone message waits for company,
    # and the most messages held unacknowledged (memory bound and back-pressure).
    ingest_max_batch: int = 5000
    ingest_max_delay_s: float = 0.2
    ingest_max_pending: int = 20000
    # An agent whose status is online but that sent nothing for this long is marked
    # stale (SPEC "Online status"); the sweep runs several times per period.
    offline_after_s: float = 300.0
    # Tasks (docs/tasks.md): a task published but not acknowledged (ASSIGNED) by an
    # online agent is published again after this long; the TIMEOUT/EXPIRED sweep
    # runs this often.
    task_redelivery_s: float = 60.0
    task_sweep_interval_s: float = 5.0
    # Deployments (docs/deployments.md): how often the rollout engine steps every
    # active deployment besides its wake-ups (also the rate's resolution).
    rollout_interval_s: float = 0.5
    # MQTT 5 shared subscription group, for several bridges splitting the load; None =
    # plain subscriptions. Off by default: Mosquitto 2.0.11 forgets an offline member's
    # shared subscription over a restart, dropping what agents send until it returns
    # (docs/ingest.md); a plain subscription keeps queuing.
    share_group: str | None = None
    # Broker log files to follow for refused credentials (service/bridge/broker_logs.py);
    # empty: none (the brokers run elsewhere).
    broker_logs: tuple[str, ...] = ()
    # The event relay (docs/events.md, "From NATS JetStream"): the NATS server(s) the
    # bridge forwards events to (None: no forwarding), and the replicas of the stream
    # it creates when the stream does not exist yet.
    events_url: str | None = field(default=None, repr=False)
    events_replicas: int = 1

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: str | int | float | None
    ) -> Settings:
        """Build settings from EUCORA_* variables; explicit overrides (CLI options) win."""
        env = os.environ if env is None else env

        def pick(name: str, var: str, default: str | None = None) -> str | None:
            value = overrides.get(name)
            if value is not None:
                return str(value)
            return env.get(var, default)

        mqtt = pick("mqtt_url", "EUCORA_MQTT_URL")
        if not mqtt:
            raise ConfigError(
                "EUCORA_MQTT_URL is not set (e.g. mqtt://bridge:secret@127.0.0.1:1883)"
            )
        db = pick("database_url", "EUCORA_DATABASE_URL")
        if not db:
            raise ConfigError(
                "EUCORA_DATABASE_URL is not set (e.g. postgresql://eucora@127.0.0.1:5432/eucora)"
            )
        try:
            metrics_port = int(pick("metrics_port", "EUCORA_METRICS_PORT", "9108") or 0)
            timeout = float(pick("connect_timeout_s", "EUCORA_CONNECT_TIMEOUT", "30") or 0)
            max_batch = int(pick("ingest_max_batch", "EUCORA_INGEST_MAX_BATCH", "5000") or 0)
            max_delay = float(pick("ingest_max_delay_s", "EUCORA_INGEST_MAX_DELAY", "0.2") or 0)
            max_pending = int(pick("ingest_max_pending", "EUCORA_INGEST_MAX_PENDING", "20000") or 0)
            offline_after = float(pick("offline_after_s", "EUCORA_OFFLINE_AFTER", "300") or 0)
            redelivery = float(pick("task_redelivery_s", "EUCORA_TASK_REDELIVERY", "60") or 0)
            rollout = float(pick("rollout_interval_s", "EUCORA_ROLLOUT_INTERVAL", "0.5") or 0)
            task_sweep = float(
                pick("task_sweep_interval_s", "EUCORA_TASK_SWEEP_INTERVAL", "5") or 0
            )
            replicas = int(pick("events_replicas", "EUCORA_EVENTS_REPLICAS", "1") or 0)
        except ValueError as exc:
            raise ConfigError(f"bad number in configuration: {exc}") from exc
        return cls(
            mqtt=MqttUrl.parse(mqtt),
            database_url=check_database_url(db),
            topic_root=check_topic_root(
                pick("topic_root", "EUCORA_TOPIC_ROOT", DEFAULT_TOPIC_ROOT) or DEFAULT_TOPIC_ROOT
            ),
            metrics_port=metrics_port,
            metrics_bind=pick("metrics_bind", "EUCORA_METRICS_BIND", "127.0.0.1") or "127.0.0.1",
            client_id=pick("client_id", "EUCORA_BRIDGE_CLIENT_ID", "eucora-bridge")
            or "eucora-bridge",
            connect_timeout_s=timeout,
            ca_file=pick("ca_file", "EUCORA_CA_FILE"),
            ingest_max_batch=_positive("EUCORA_INGEST_MAX_BATCH", max_batch),
            ingest_max_delay_s=max_delay,
            ingest_max_pending=_positive("EUCORA_INGEST_MAX_PENDING", max(max_pending, max_batch)),
            offline_after_s=_positive_float("EUCORA_OFFLINE_AFTER", offline_after),
            task_redelivery_s=_positive_float("EUCORA_TASK_REDELIVERY", redelivery),
            task_sweep_interval_s=_positive_float("EUCORA_TASK_SWEEP_INTERVAL", task_sweep),
            rollout_interval_s=_positive_float("EUCORA_ROLLOUT_INTERVAL", rollout),
            share_group=_share_group(pick("share_group", "EUCORA_SHARE_GROUP")),
            broker_logs=tuple(
                p for p in (pick("broker_logs", "EUCORA_BROKER_LOGS") or "").split(os.pathsep) if p
            ),
            events_url=check_events_url(pick("events_url", "EUCORA_EVENTS_URL")),
            events_replicas=_positive("EUCORA_EVENTS_REPLICAS", replicas),
        )


def _share_group(value: str | None) -> str | None:
    if not value:
        return None
    if any(c in value for c in "/+#"):
        raise ConfigError(f"EUCORA_SHARE_GROUP must be one topic level, got {value!r}")
    return value


def _positive(name: str, value: int) -> int:
    if value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value}")
    return value


def _positive_float(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
    return value
