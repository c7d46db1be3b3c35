"""Which agents a command is for: the one target selection of `tasks create`,
`deployments create` and `agents list` (docs/agents.md, "Labels and tags").

`--tag k=v` matches an agent whose reported tags OR whose operator labels hold k=v;
with several, every one must match (each in either place). Both columns have a GIN
index, so the planner combines them with a BitmapOr per pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb

from schemas.states import Platform


@dataclass(frozen=True)
class Target:
    agents: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    @property
    def empty(self) -> bool:
        return not (self.agents or self.tags or self.platform is not None)


def target_where(target: Target, alias: str = "a") -> tuple[str, dict[str, Any]]:
    """A WHERE condition on `agents AS alias` for `target` (`true` when empty: the
    callers that need a target say so), and its named parameters (prefixed `target_`,
    so they never clash with the caller's)."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if target.agents:
        where.append(f"{alias}.agent_id = ANY(%(target_agents)s)")
        params["target_agents"] = list(target.agents)
    for i, (key, value) in enumerate(sorted(target.tags.items())):
        name = f"target_tag_{i}"
        where.append(f"({alias}.tags @> %({name})s OR {alias}.labels @> %({name})s)")
        params[name] = Jsonb({key: value})
    if target.platform is not None:
        where.append(f"{alias}.platform = %(target_platform)s")
        params["target_platform"] = target.platform.value
    return (" AND ".join(where) or "true"), params
