"""Installed software of this machine: Debian packages and Python distributions.

Sources are plain functions returning `Software` items; the reference agent combines
the ones it is configured with (`--inventory dpkg,python`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from schemas.payloads import MAX_SOFTWARE, Software

log = logging.getLogger("eucora.agent.inventory")

DPKG_STATUS = Path("/var/lib/dpkg/status")
Source = Callable[[], list[Software]]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def dpkg_packages(status_file: Path = DPKG_STATUS) -> list[Software]:
    """Installed packages from dpkg's status database (Debian, Ubuntu...)."""
    try:
        text = status_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    native = _native_arch(text)
    out: list[Software] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if not fields.get("Package") or "installed" not in fields.get("Status", "").split():
            continue
        if fields.get("Status", "").split()[-1] != "installed":
            continue  # half-installed, config-files...
        name = fields["Package"]
        arch = fields.get("Architecture", "")
        if arch and arch not in ("all", native):
            name = f"{name}:{arch}"  # multiarch: libc6:i386 next to libc6
        out.append(
            Software(
                name=_clip(name, 512),
                version=_clip(fields.get("Version", ""), 256),
                publisher=_clip(fields["Maintainer"], 512) if fields.get("Maintainer") else None,
            )
        )
    return out


def _native_arch(text: str) -> str:
    # The architecture of dpkg itself is the native one.
    for stanza in text.split("\n\n"):
        if "\nPackage: dpkg\n" in f"\n{stanza}\n" or stanza.startswith("Package: dpkg\n"):
            for line in stanza.splitlines():
                if line.startswith("Architecture:"):
                    return line.partition(":")[2].strip()
    return ""


def python_distributions(paths: Sequence[str] | None = None) -> list[Software]:
    """Python distributions importable by this interpreter (its sys.path)."""
    seen: dict[str, Software] = {}
    dists: Iterable[importlib.metadata.Distribution] = (
        importlib.metadata.distributions(path=list(paths))
        if paths is not None
        else importlib.metadata.distributions()
    )
    for dist in dists:
        name = dist.metadata["Name"] if dist.metadata else None
        if not name:
            continue
        # The first on sys.path is the one imported; later copies are shadowed.
        key = name.lower()
        if key not in seen:
            seen[key] = Software(
                name=_clip(f"python:{name}", 512),
                version=_clip(dist.version or "", 256),
                publisher="Python package",
            )
    return list(seen.values())


SOURCES: dict[str, Source] = {
    "dpkg": dpkg_packages,
    "python": python_distributions,
}


def default_sources() -> tuple[str, ...]:
    if sys.platform.startswith("linux") and DPKG_STATUS.exists():
        return ("dpkg", "python")
    return ("python",)


def collect(sources: Sequence[str]) -> list[Software]:
    """Every item of the named sources, sorted by name, capped at MAX_SOFTWARE."""
    items: list[Software] = []
    for name in sources:
        try:
            items += SOURCES[name]()
        except Exception:  # a broken package database must not stop the agent
            log.exception("inventory source failed", extra={"source": name})
    items.sort(key=lambda s: (s.name, s.version))
    if len(items) > MAX_SOFTWARE:
        log.warning("inventory truncated", extra={"items": len(items), "limit": MAX_SOFTWARE})
        items = items[:MAX_SOFTWARE]
    return items
