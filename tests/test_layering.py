"""The agent stands alone: what `pip install .` (no `server` extra) gives an endpoint.

That nothing imports upward in the source (agent/ never imports service/ or cli/) is
tests/test_architecture.py::test_layers_point_one_way. Here, the running proof: in an
interpreter whose imports of the server's packages (and of service/ and cli/) raise
ImportError, every module of agent/ imports, the endpoint's commands answer --help,
and the reference agent runs against a real broker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from service.stack.broker import Broker
from tests.test_agents_support import AgentProcess, agent_factory, provision, wait

__all__ = ["agent_factory"]  # a fixture, imported for the tests below

ROOT = Path(__file__).resolve().parent.parent
# What the agent must do without: the `server` extra's packages (and what they bring),
# and the server's own code.
SERVER_ONLY = (
    "psycopg", "psycopg_pool", "sqlmodel", "sqlalchemy", "typer", "click",
    "prometheus_client", "cryptography", "aiomqtt", "service", "cli",
)  # fmt: skip

BLOCKER = f"""
import sys

BLOCKED = {SERVER_ONLY!r}
already = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
if already:
    raise SystemExit(f"imported before the blocker: {{already}}")


class ServerBlocker:
    '''Refuses the server's packages, as an endpoint without them would.'''

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed on an endpoint (blocked)", name=name)
        return None


sys.meta_path.insert(0, ServerBlocker())
"""


def python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def endpoint_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose interpreters cannot import the server's packages: the
    blocker is a sitecustomize module, so a plain `python -m agent ...` gets it."""
    site = tmp_path / "endpoint-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return os.environ | {"PYTHONPATH": str(site)}


def test_every_agent_module_imports_without_the_server(endpoint_env: dict[str, str]) -> None:
    script = """
import importlib, pkgutil, sys
import agent

for blocked in ("psycopg", "typer", "service.identity", "cli.agent"):
    try:
        importlib.import_module(blocked)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the blocker let {blocked} through")
names = sorted(m.name for m in pkgutil.walk_packages(agent.__path__, "agent."))
for name in names:
    if name != "agent.__main__":  # runs the command: tested below
        importlib.import_module(name)
print(" ".join(names))
"""
    done = python("-c", script, env=endpoint_env)
    assert done.returncode == 0, done.stderr
    imported = done.stdout.split()
    assert {"agent.cli", "agent.reference", "agent.simulator", "agent.logs"} <= set(imported)


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]])
def test_agent_commands_answer_without_the_server(
    endpoint_env: dict[str, str], args: list[str]
) -> None:
    done = python("-m", "agent", *args, env=endpoint_env)
    assert done.returncode == 0, done.stderr
    assert "run" in done.stdout
    # The console script `eucora-agent`, as pyproject.toml declares it.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["eucora-agent"].split(":")
    entry = f"import sys, {module} as m; sys.exit(m.{func}())"
    same = python("-c", entry, *args, env=endpoint_env)
    assert same.returncode == 0, same.stderr
    assert "--mqtt-url" in same.stdout if args[0] == "run" else "run" in same.stdout


def test_reference_agent_runs_without_the_server(
    broker: Broker,
    endpoint_env: dict[str, str],
    agent_factory: Callable[..., AgentProcess],
) -> None:
    password = provision(broker, "endpoint-only")["endpoint-only"]  # the server's side
    agent = agent_factory(broker, "endpoint-only", password, PYTHONPATH=endpoint_env["PYTHONPATH"])
    wait(lambda: '"msg":"connected"' in agent.log(), 20, "the agent connected")
    assert agent.stop() == 0, agent.log()
    assert "ImportError" not in agent.log() and password not in agent.log()
