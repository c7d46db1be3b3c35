"""The agent's logs: one JSON object per line on stderr, secrets masked.

The same line format as the server's (service/logs.py), written apart on purpose: the
agent installs without the server, and a log format is no part of the contract that
schemas/ holds. What the agent could leak is its own password (in its broker URL or a
`password=...` pair, e.g. quoted in a library's exception text): both are masked.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

_SECRET_PATTERNS = (
    (re.compile(r"(://[^:/@\s]*:)[^@/\s]*@"), r"\1***@"),
    (re.compile(r"(?i)(password[\"']?\s*[=:]\s*[\"']?)[^\s\"',}]+"), r"\1***"),
)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def scrub(text: str) -> str:
    """Mask credentials in URLs and `password=...`/`"password": ...` pairs."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class JsonFormatter(logging.Formatter):
    """ts, level, logger, msg, then the record's `extra` fields; the whole line scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return scrub(orjson.dumps(doc, default=str).decode())


def setup(level: str = "INFO") -> None:
    """JSON lines on stderr for every logger; ValueError for an unknown level name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.setLevel(level.upper())  # first: an unknown level changes nothing
    root.handlers[:] = [handler]
