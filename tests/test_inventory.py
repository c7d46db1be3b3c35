"""Inventory: the reference agent's Python source end to end, and the diff rules."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.inventory import dpkg_packages, python_distributions
from schemas.payloads import Software
from service.domains.inventory import diff, listing
from service.stack.broker import Broker
from tests.fix_services import BridgeProcess
from tests.test_agents_support import AgentProcess, agent_factory, provision, query, wait

__all__ = ["agent_factory"]  # a fixture, imported for the tests below


def make_site(root: Path, name: str, dists: dict[str, str]) -> Path:
    """A folder of installed distributions (just their metadata)."""
    site = root / name
    site.mkdir()
    for dist, version in dists.items():
        info = site / f"{dist}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return site


def test_inventory_history_shows_exactly_what_was_added_removed_and_changed(
    broker: Broker,
    bridge: BridgeProcess,
    database: str,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    before = make_site(tmp_path, "v1", {"alpha": "1.0", "beta": "2.0", "gamma": "3.0"})
    after = make_site(tmp_path, "v2", {"alpha": "1.1", "gamma": "3.0", "delta": "0.1"})
    # The agent's sys.path holds a symlink that the test swaps in one step, so the agent
    # never sees a half-changed folder.
    link = tmp_path / "site"
    link.symlink_to(before)
    pw = provision(broker, "inv")["inv"]
    agent_factory(
        broker, "inv", pw, "--inventory", "python", "--inventory-interval", "0.5",
        EUCORA_AGENT_INVENTORY="python", PYTHONPATH=str(link),
    )  # fmt: skip

    def versions() -> dict[str, Any]:
        rows = query(
            database,
            "SELECT name, version FROM inventory WHERE agent_id = 'inv' AND name = ANY(%s)",
            (["python:alpha", "python:beta", "python:gamma", "python:delta"],),
        )
        return dict(rows)

    wait(lambda: len(versions()) == 3, 30, "the first inventory")
    assert versions() == {"python:alpha": "1.0", "python:beta": "2.0", "python:gamma": "3.0"}
    first = query(database, "SELECT count(*), max(time) FROM inventory_changes")[0]
    # The first list is history too: everything was added (the venv's packages as well).
    assert (
        first[0] == query(database, "SELECT count(*) FROM inventory WHERE agent_id = 'inv'")[0][0]
    )

    tmp_link = tmp_path / "site.new"
    tmp_link.symlink_to(after)
    os.replace(tmp_link, link)
    wait(lambda: "python:delta" in versions(), 30, "the changed inventory")
    changes = query(
        database,
        "SELECT name, change, old_version, new_version FROM inventory_changes"
        " WHERE agent_id = 'inv' AND time > %s ORDER BY name",
        (first[1],),
    )
    assert changes == [
        ("python:alpha", "changed", "1.0", "1.1"),
        ("python:beta", "removed", "2.0", None),
        ("python:delta", "added", None, "0.1"),
    ]
    assert versions() == {"python:alpha": "1.1", "python:gamma": "3.0", "python:delta": "0.1"}
    # Nothing changes any more, so nothing more is stored (the agent checks twice a second).
    (updated,) = query(database, "SELECT inventory_updated_at FROM agents WHERE agent_id = 'inv'")[
        0
    ]
    total = query(database, "SELECT count(*) FROM inventory_changes")[0][0]
    assert updated is not None and total == first[0] + 3


def test_diff_and_duplicate_names() -> None:
    def sw(name: str, version: str, publisher: str | None = None) -> Software:
        return Software(name=name, version=version, publisher=publisher)

    old = listing([sw("a", "1"), sw("b", "1"), sw("c", "1", "X")])
    new = listing([sw("a", "2"), sw("c", "1", "Y"), sw("d", "1"), sw("d", "0.9")])
    d = diff(old, new)
    assert d.added == [("d", "0.9, 1", None)]  # both installs of d, nothing dropped
    assert d.removed == [("b", "1", None)]
    assert d.changed == [("a", "1", "2", None), ("c", "1", "1", "Y")]
    assert not diff(new, new)


def test_local_sources_read_this_machine(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text(
        "Package: dpkg\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.21\n"
        "Maintainer: Dpkg Developers <debian-dpkg@lists.debian.org>\n\n"
        "Package: libc6\nStatus: install ok installed\nArchitecture: i386\nVersion: 2.36\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n"
    )
    names = {(s.name, s.version) for s in dpkg_packages(status)}
    assert names == {("dpkg", "1.21"), ("libc6:i386", "2.36")}
    site = make_site(tmp_path, "site", {"zeta": "9.9"})
    assert [(s.name, s.version) for s in python_distributions([str(site)])] == [
        ("python:zeta", "9.9")
    ]
