"""`eucora simulate --agents N`: a fleet of simulated agents, for demos and load.

The server side of the simulation: the fleet's broker accounts are provisioned here
(service/broker_admin.py) and their passwords handed to agent/simulator.py, which
only connects.

Registered by cli/main.py as a command: `app.command("simulate")(simulate)`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Annotated

import typer

from cli.common import emit_json, fail
from schemas.config import DEFAULT_TOPIC_ROOT, ConfigError, MqttUrl, check_topic_root
from schemas.constants import MqttVersion
from schemas.states import Platform
from schemas.topics import TopicTree, is_agent_id
from service.config import ADMIN_URL_ENV


def admin_url_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """The broker admin account's URL (EUCORA_MQTT_ADMIN_URL, see `eucora stack env`)."""
    return (os.environ if env is None else env).get(ADMIN_URL_ENV) or None


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
    processes: Annotated[
        int,
        typer.Option(
            min=0, help="simulator processes (0: one per 15,000 agents, under the open-file limit)"
        ),
    ] = 0,
    mqtt_version: Annotated[
        MqttVersion, typer.Option(help="the agents' MQTT protocol version")
    ] = MqttVersion.V5,
    mqtt_url: Annotated[
        str | None,
        typer.Option(envvar="EUCORA_MQTT_URL", help="the broker (its credentials are not used)"),
    ] = None,
    admin_url: Annotated[
        str | None,
        typer.Option(help=f"broker admin account, to provision the agents [env: {ADMIN_URL_ENV}]"),
    ] = None,
    topic_root: Annotated[str, typer.Option(envvar="EUCORA_TOPIC_ROOT")] = DEFAULT_TOPIC_ROOT,
    ca_file: Annotated[str | None, typer.Option(envvar="EUCORA_CA_FILE")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="print a JSON summary when the fleet stops")
    ] = False,
) -> None:
    """Run N simulated agents (varied platforms, tags, metrics) until --duration or Ctrl-C."""
    from agent import simulator
    from service import dynsec
    from service.broker_admin import BrokerAdmin
    from service.stack.process import StackError

    admin = admin_url or admin_url_from_env()
    if not mqtt_url:
        fail("EUCORA_MQTT_URL is not set (the broker to connect the agents to)")
    if not admin:
        fail(f"{ADMIN_URL_ENV} is not set: the simulator provisions its agents' accounts")
    if not is_agent_id(simulator.FleetOptions(agents, prefix=prefix).agent_ids()[-1]):
        fail(f"--prefix {prefix!r} does not make valid agent ids (letters, digits, _ . -)")
    try:
        broker = MqttUrl.parse(mqtt_url)
        admin_mqtt = MqttUrl.parse(admin, var=ADMIN_URL_ENV)
        tree = TopicTree(check_topic_root(topic_root))
    except ConfigError as exc:
        fail(str(exc))
    options = simulator.FleetOptions(
        agents=agents, prefix=prefix, telemetry_interval=telemetry_interval,
        heartbeat_interval=heartbeat_interval, keepalive=keepalive, churn=churn,
        connect_rate=connect_rate, seed=seed, topic_root=topic_root, ca_file=ca_file,
        platform=platform, deploy_duration=deploy_duration, deploy_fail_rate=deploy_fail_rate,
        mqtt_version=mqtt_version.value,
    )  # fmt: skip

    def say(message: str) -> None:
        typer.echo(message, err=True)

    try:
        # The accounts are made here, on the server side; the simulator only connects.
        started = time.monotonic()
        passwords = {a: dynsec.new_password() for a in options.agent_ids()}
        with BrokerAdmin(admin_mqtt, tree=tree, timeout=60, ca_file=ca_file) as broker_admin:
            broker_admin.provision_or_reset(passwords)
        say(f"provisioned {agents} agents in {time.monotonic() - started:.1f} s")
        report = simulator.run_many(
            options, broker, passwords, duration=duration, on_progress=say,
            processes=processes or simulator.processes_for(agents),
        )  # fmt: skip
    except (ConnectionError, TimeoutError, StackError, OSError, RuntimeError) as exc:
        fail(f"simulation failed: {exc}")
    except Exception as exc:  # DynsecError and the like: one line, not a traceback
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
