"""The product's version (the installed distribution's), for `--version`, the bridge's
heartbeat and the agent's registration."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "eucora-agent-plane"


@cache
def product_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"
