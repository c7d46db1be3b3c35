"""`eucora agent run`: the reference agent, reporting on this machine.

The operator's spelling of the endpoint's own command (`eucora-agent run`,
agent/cli.py): the same options, the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The reference agent (real metrics of this host).", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """The reference agent (real metrics of this host)."""


@app.command()
def run(
    agent_id: Annotated[
        str | None, typer.Option(help="this agent's id (= MQTT username) [env: EUCORA_AGENT_ID]")
    ] = None,
    mqtt_url: Annotated[
        str | None,
        typer.Option(help="mqtt://AGENT_ID:PASSWORD@host:port [env: EUCORA_MQTT_URL]"),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="EUCORA_AGENT_CONFIG",
            help="TOML or JSON file (e.g. the output of `eucora agents provision ID --json`)",
        ),
    ] = None,
    telemetry_interval: Annotated[
        float | None, typer.Option(help="seconds between samples (default 60)")
    ] = None,
    heartbeat_interval: Annotated[
        float | None, typer.Option(help="seconds between heartbeats (default 60)")
    ] = None,
    keepalive: Annotated[int | None, typer.Option(help="MQTT keepalive, seconds (default 60)")] = (
        None
    ),
    inventory_interval: Annotated[
        float | None, typer.Option(help="seconds between inventory checks (default 300)")
    ] = None,
    inventory: Annotated[
        str | None, typer.Option(help="inventory sources: dpkg,python or none (default: auto)")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="k=v, repeatable [env: EUCORA_AGENT_TAGS]")
    ] = None,
    buffer_size: Annotated[
        int | None, typer.Option(help="samples kept while disconnected (default 10000)")
    ] = None,
    reconnect_max: Annotated[
        float | None, typer.Option(help="longest wait between reconnect attempts (default 30)")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="folder for what survives a restart: last epoch, handled task ids"),
    ] = None,
    allow_list: Annotated[
        Path | None,
        typer.Option(
            help='JSON {"commands": [[argv...]]}: what DEPLOY/REMEDIATE/UPDATE tasks may run'
            " [env: EUCORA_AGENT_ALLOW_LIST]"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="EUCORA_LOG_LEVEL")] = "INFO",
) -> None:
    """Run the agent until SIGTERM/SIGINT (then it publishes `offline` itself)."""
    from agent import cli as agent_cli  # the endpoint's own command: the same code

    flags = {
        "agent_id": agent_id,
        "mqtt_url": mqtt_url,
        "telemetry_interval": telemetry_interval,
        "heartbeat_interval": heartbeat_interval,
        "keepalive": keepalive,
        "inventory_interval": inventory_interval,
        "inventory": inventory,
        "tags": tag or None,
        "buffer_size": buffer_size,
        "state_dir": state_dir,
        "allow_list": allow_list,
        "reconnect_max": reconnect_max,
    }
    code = agent_cli.start(flags, config_file=config, log_level=log_level)
    if code:
        raise typer.Exit(code)
