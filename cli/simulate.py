"""`eucora simulate --agents N`: a fleet of simulated agents, for demos and load.

The server side of the simulation: the fleet's broker accounts are provisioned here,
in bulk, as `eucora agents provision` does (registry + the brokers' password file,
cli/access.py), and their passwords and home brokers handed to agent/simulator.py,
which only connects.

Registered by cli/main.py as a command: `app.command("simulate")(simulate)`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated

import typer

from cli.access import AuthDirOption
from cli.common import emit_json, fail, open_database
from cli.db import DATABASE_URL_OPTION
from schemas.config import DEFAULT_TOPIC_ROOT, ConfigError, MqttUrl, check_topic_root
from schemas.states import Platform
from schemas.topics import is_agent_id


def simulate(
    agents: Annotated[int, typer.Option(min=1, help="how many agents to simulate")] = 10,
    telemetry_interval: Annotated[
        float, typer.Option(min=0.1, help="seconds between samples, per agent")
    ] = 10.0,
    duration: Annotated[
        float | None, typer.Option(min=0, help="stop after this many seconds (default: SIGINT)")
    ] = None,
    churn: Annotated[
        float,
        typer.Option(
            min=0, max=1, help="fraction of the fleet that leaves and comes back, per minute"
        ),
    ] = 0.0,
    prefix: Annotated[str, typer.Option(help="agent ids are PREFIX-00000, PREFIX-00001...")] = (
        "sim"
    ),
    heartbeat_interval: Annotated[float, typer.Option(min=0.1)] = 60.0,
    keepalive: Annotated[int, typer.Option(min=1, max=300)] = 60,
    connect_rate: Annotated[float, typer.Option(min=1, help="connections per second at start")] = (
        200.0
    ),
    seed: Annotated[int, typer.Option(help="same seed, same fleet")] = 1,
    platform: Annotated[
        Platform | None, typer.Option(help="every agent on this platform (default: a mix)")
    ] = None,
    deploy_duration: Annotated[
        float, typer.Option(min=0, help="seconds a DEPLOY task runs, +-30 % per agent")
    ] = 3.0,
    deploy_fail_rate: Annotated[
        float, typer.Option(min=0, max=1, help="fraction of DEPLOY tasks that fail (seeded)")
    ] = 0.0,
    database_url: str | None = DATABASE_URL_OPTION,
    auth_dir: AuthDirOption = None,
    topic_root: Annotated[str, typer.Option(envvar="EUCORA_TOPIC_ROOT")] = DEFAULT_TOPIC_ROOT,
    ca_file: Annotated[str | None, typer.Option(envvar="EUCORA_CA_FILE")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="print a JSON summary when the fleet stops")
    ] = False,
) -> None:
    """Run N simulated agents (varied platforms, tags, metrics) until --duration or Ctrl-C."""
    from agent import simulator
    from cli.access import auth_folder, provision_fleet
    from service import identity
    from service.domains.accounts import AccountError
    from service.stack.process import StackError

    if not is_agent_id(simulator.FleetOptions(agents, prefix=prefix).agent_ids()[-1]):
        fail(f"--prefix {prefix!r} does not make valid agent ids (letters, digits, _ . -)")
    try:
        check_topic_root(topic_root)
    except ConfigError as exc:
        fail(str(exc))
    auth = auth_folder(auth_dir)
    options = simulator.FleetOptions(
        agents=agents, prefix=prefix, telemetry_interval=telemetry_interval,
        heartbeat_interval=heartbeat_interval, keepalive=keepalive, churn=churn,
        connect_rate=connect_rate, seed=seed, topic_root=topic_root, ca_file=ca_file,
        platform=platform, deploy_duration=deploy_duration, deploy_fail_rate=deploy_fail_rate,
    )  # fmt: skip

    def say(message: str) -> None:
        typer.echo(message, err=True)

    try:
        # The accounts are made here, on the server side; the simulator only connects,
        # each agent to its home broker.
        started = time.monotonic()
        passwords = {a: identity.new_password() for a in options.agent_ids()}
        with open_database(database_url) as conn:
            homes = provision_fleet(conn, auth, passwords)
        say(f"provisioned {agents} agents in {time.monotonic() - started:.1f} s")
        urls = {a: MqttUrl.parse(u) for a, u in homes.items()}
        report = simulator.run(options, urls, passwords, duration=duration, on_progress=say)
    except (ConnectionError, TimeoutError, StackError, OSError, AccountError) as exc:
        fail(f"simulation failed: {exc}")
    except Exception as exc:  # one line, not a traceback
        fail(f"simulation failed: {type(exc).__name__}: {exc}")
    if json_output:
        emit_json(asdict(report))
    else:
        say(
            f"stopped {report.agents} agents: {report.telemetry_sent} samples, "
            f"{report.churn_events} churn events, {report.extra['deploys_succeeded']} deploys"
            f" succeeded, {report.extra['deploys_failed']} failed, {report.extra['rollbacks']}"
            f" rollbacks, cpu {report.cpu_percent:.1f}% of a core, "
            f"max rss {report.max_rss_bytes / 2**20:.0f} MiB"
        )


# For tests and for running this command alone; cli/main.py registers `simulate` itself.
app = typer.Typer(name="simulate", add_completion=False)
app.command()(simulate)
