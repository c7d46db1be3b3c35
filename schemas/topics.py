"""The topic tree, in one place: `{root}/agents/{agent_id}/{kind}`.

Agents, the bridge and the CLI all build and parse topics through this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import NamedTuple

DEFAULT_TOPIC_ROOT = "eucora/v1"
AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_AGENT_ID_RE = re.compile(AGENT_ID_PATTERN)


class Kind(StrEnum):
    """The closed set of message kinds under an agent's topic."""

    STATUS = "status"
    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    TELEMETRY = "telemetry"
    INVENTORY = "inventory"
    TASKS = "tasks"
    TASK_STATUS = "task-status"
    DEPLOYMENT_STATUS = "deployment-status"


_KIND_BY_NAME: dict[str, Kind] = {k.value: k for k in Kind}  # faster than Kind(name)

# Kinds an agent publishes (and the bridge consumes); TASKS flows the other way.
AGENT_KINDS: tuple[Kind, ...] = tuple(k for k in Kind if k is not Kind.TASKS)


class TopicError(ValueError):
    """A topic that is not in the tree."""


def is_agent_id(value: str) -> bool:
    # fullmatch: with match(), "$" would also accept a trailing newline.
    return _AGENT_ID_RE.fullmatch(value) is not None


class AgentTopic(NamedTuple):
    # A tuple, not a frozen dataclass: built for every message the bridge receives,
    # where a frozen dataclass's __init__ cost as much as the rest of the parse.
    agent_id: str
    kind: Kind


@dataclass(frozen=True)
class TopicTree:
    root: str = DEFAULT_TOPIC_ROOT

    def agent(self, agent_id: str, kind: Kind) -> str:
        if not is_agent_id(agent_id):
            raise TopicError(f"invalid agent id {agent_id!r}")
        return f"{self.root}/agents/{agent_id}/{kind.value}"

    @cached_property
    def _prefix(self) -> str:
        return f"{self.root}/agents/"

    def wildcard(self, kind: Kind | None = None) -> str:
        """Subscription filter for one kind from every agent (or every kind)."""
        return f"{self.root}/agents/+/{kind.value if kind else '#'}"

    def parse(self, topic: str) -> AgentTopic:
        """Split an agent topic; raise TopicError for anything outside the tree."""
        prefix = self._prefix
        if not topic.startswith(prefix):
            raise TopicError(f"topic outside {prefix}: {topic!r}")
        rest = topic[len(prefix) :].split("/")
        if len(rest) != 2:
            raise TopicError(f"not an agent topic: {topic!r}")
        agent_id, kind = rest
        if not is_agent_id(agent_id):
            raise TopicError(f"invalid agent id in topic: {topic!r}")
        found = _KIND_BY_NAME.get(kind)
        if found is None:
            raise TopicError(f"unknown message kind {kind!r}")
        return AgentTopic(agent_id, found)
