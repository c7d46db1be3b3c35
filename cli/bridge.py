"""`eucora bridge run`."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import EXIT_UNREACHABLE, fail
from schemas.config import ConfigError
from service.config import Settings

app = typer.Typer(help="The bridge between the broker and the database.", no_args_is_help=True)


@app.command()
def run(
    mqtt_url: Annotated[
        str | None,
        typer.Option(envvar="EUCORA_MQTT_URL", show_envvar=True, help="mqtt://user:pass@host:port"),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(envvar="EUCORA_DATABASE_URL", show_envvar=True)
    ] = None,
    topic_root: Annotated[str | None, typer.Option(envvar="EUCORA_TOPIC_ROOT")] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="EUCORA_METRICS_PORT", help="HTTP port for /metrics, /healthz, /readyz; 0 = off"
        ),
    ] = None,
    metrics_bind: Annotated[
        str | None,
        typer.Option(
            envvar="EUCORA_METRICS_BIND",
            help="address for /metrics, /healthz, /readyz (default 127.0.0.1; 0.0.0.0 = all)",
        ),
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option(
            envvar="EUCORA_BRIDGE_CLIENT_ID",
            help="MQTT client id; stable per instance so its persistent session survives restarts",
        ),
    ] = None,
    connect_timeout: Annotated[
        float | None,
        typer.Option(envvar="EUCORA_CONNECT_TIMEOUT", help="seconds to keep retrying at start-up"),
    ] = None,
    log_level: Annotated[
        str, typer.Option(envvar="EUCORA_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR")
    ] = "INFO",
    events_url: Annotated[
        str | None,
        typer.Option(
            envvar="EUCORA_EVENTS_URL",
            help="forward events to NATS JetStream: nats://user:pass@host:port[,...]",
        ),
    ] = None,
) -> None:
    """Run the bridge until SIGTERM: validate agent messages, store them, publish tasks."""
    from service import logs
    from service.bridge import app as bridge_app

    try:
        logs.setup(log_level)
    except ValueError:
        fail(f"--log-level {log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    try:
        settings = Settings.from_env(
            mqtt_url=mqtt_url,
            database_url=database_url,
            topic_root=topic_root,
            metrics_port=metrics_port,
            metrics_bind=metrics_bind,
            client_id=client_id,
            connect_timeout_s=connect_timeout,
            events_url=events_url,
        )
        bridge_app.run(settings)
    except ConfigError as exc:
        fail(str(exc))
    except bridge_app.Unreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE)
