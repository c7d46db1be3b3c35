"""The topic tree: building and parsing agent topics."""

from __future__ import annotations

import pytest

from schemas.topics import AGENT_KINDS, Kind, TopicError, TopicTree, is_agent_id


@pytest.mark.parametrize("agent_id", ["a", "web-01", "A.b_c-9", "x" * 64])
def test_valid_agent_ids(agent_id: str) -> None:
    assert is_agent_id(agent_id)


@pytest.mark.parametrize(
    "agent_id", ["", "-a", ".a", "a b", "a/b", "a+", "a#", "x" * 65, "é", "web-01\n"]
)
def test_invalid_agent_ids(agent_id: str) -> None:
    assert not is_agent_id(agent_id)


@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip(kind: Kind) -> None:
    tree = TopicTree("site/eucora/v1")
    topic = tree.agent("web-01", kind)
    assert topic == f"site/eucora/v1/agents/web-01/{kind.value}"
    parsed = tree.parse(topic)
    assert (parsed.agent_id, parsed.kind) == ("web-01", kind)


@pytest.mark.parametrize(
    "topic",
    [
        "eucora/v2/agents/web-01/status",
        "eucora/v1/agents/web-01",
        "eucora/v1/agents/web-01/status/extra",
        "eucora/v1/agents/-bad/status",
        "eucora/v1/agents/web-01/reboot",
        "eucora/v1/agents/+/status",
    ],
)
def test_parse_rejects(topic: str) -> None:
    with pytest.raises(TopicError):
        TopicTree().parse(topic)


def test_wildcards_and_agent_kinds() -> None:
    tree = TopicTree()
    assert tree.wildcard() == "eucora/v1/agents/+/#"
    assert tree.wildcard(Kind.TELEMETRY) == "eucora/v1/agents/+/telemetry"
    assert Kind.TASKS not in AGENT_KINDS and len(AGENT_KINDS) == len(Kind) - 1
    with pytest.raises(TopicError):
        tree.agent("bad id", Kind.STATUS)
