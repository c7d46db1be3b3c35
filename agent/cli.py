"""`eucora-agent run` (= `python -m agent run`): the reference agent on an endpoint.

argparse, so an endpoint needs nothing of the server (no Typer, no database driver).
The operator CLI's `eucora agent run` (cli/agent.py) has the same options and calls
`start` below. Exit codes: 0 stopped, 2 configuration refused (bad settings, bad
credentials); see agent/reference.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from agent import config, logs, reference
from schemas.config import ConfigError
from schemas.constants import MQTT_VERSIONS

LOG_LEVEL_ENV: Final = "EUCORA_LOG_LEVEL"
# The `run` options that are settings of agent/config.py (flags > environment > file).
SETTINGS: Final = (
    "agent_id", "mqtt_url", "telemetry_interval", "heartbeat_interval", "keepalive",
    "inventory_interval", "inventory", "tags", "buffer_size", "buffer_max_age", "reconnect_max",
    "state_dir", "allow_list", "mqtt_version",
)  # fmt: skip
RUN_HELP: Final = "Run the agent until SIGTERM/SIGINT (then it publishes `offline` itself)."


def start(
    flags: Mapping[str, Any], *, config_file: Path | None = None, log_level: str | None = None
) -> int:
    """Set up JSON logging, load the configuration (None flags: not given) and run the
    agent until it stops; returns the exit code. A refused configuration is one
    `error: ...` line on stderr (secrets masked) and 2."""
    try:
        level = log_level or os.environ.get(LOG_LEVEL_ENV) or "INFO"
        try:
            logs.setup(level)
        except ValueError:
            raise ConfigError(f"--log-level {level!r}: use DEBUG, INFO, WARNING or ERROR") from None
        cfg = config.load(flags, config_file=config_file)
        if cfg.state_dir is not None:
            config.prepare_state_dir(cfg.state_dir)
    except ConfigError as exc:
        print(f"error: {logs.scrub(' '.join(str(exc).split()))}", file=sys.stderr)
        return 2
    return reference.run(cfg)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog=prog, description="The EUCORA reference agent (real metrics of this host)."
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help=RUN_HELP, description=RUN_HELP)
    add = run.add_argument
    add("--agent-id", help="this agent's id (= MQTT username) [env: EUCORA_AGENT_ID]")
    add("--mqtt-url", help="mqtt://AGENT_ID:PASSWORD@host:port [env: EUCORA_MQTT_URL]")
    add(
        "--config",
        type=Path,
        help="TOML or JSON file (e.g. the output of `eucora agents provision ID --json`)"
        f" [env: {config.CONFIG_ENV}]",
    )
    add("--telemetry-interval", type=float, help="seconds between samples (default 60)")
    add("--heartbeat-interval", type=float, help="seconds between heartbeats (default 60)")
    add("--keepalive", type=int, help="MQTT keepalive, seconds (default 60)")
    add("--inventory-interval", type=float, help="seconds between inventory checks (default 300)")
    add("--inventory", help="inventory sources: dpkg,python or none (default: auto)")
    add(
        "--tag",
        dest="tags",
        action="append",
        metavar="K=V",
        help="k=v, repeatable [env: EUCORA_AGENT_TAGS]",
    )
    add("--buffer-size", type=int, help="samples kept while disconnected (default 10000)")
    add(
        "--buffer-max-age",
        type=float,
        help="seconds a sample is kept while disconnected (default 604800: 7 days)",
    )
    add("--reconnect-max", type=float, help="longest wait between reconnect attempts (default 30)")
    add(
        "--state-dir",
        type=Path,
        help="folder for what survives a restart: last epoch, handled task ids",
    )
    add(
        "--allow-list",
        type=Path,
        help='JSON {"commands": [[argv...]]}: what DEPLOY/REMEDIATE/UPDATE tasks may run'
        " [env: EUCORA_AGENT_ALLOW_LIST]",
    )
    add(
        "--mqtt-version",
        choices=MQTT_VERSIONS,
        help="MQTT protocol version (default 5) [env: EUCORA_AGENT_MQTT_VERSION]",
    )
    add("--log-level", help=f"DEBUG, INFO, WARNING, ERROR (default INFO) [env: {LOG_LEVEL_ENV}]")
    return top


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """The `eucora-agent` console script."""
    args = parser(prog).parse_args(argv)
    # `run` is the only command (the parser requires one).
    flags = {name: getattr(args, name) for name in SETTINGS}
    return start(flags, config_file=args.config, log_level=args.log_level)
