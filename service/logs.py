"""Structured logging: one JSON object per line on stderr, secrets scrubbed."""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

# Anything that looks like a credential in a URL or a key=value pair is masked, so a
# library's exception text that quotes a connection string cannot leak a password.
_SECRET_PATTERNS = (
    (re.compile(r"(://[^:/@\s]*:)[^@/\s]*@"), r"\1***@"),
    (re.compile(r"(?i)(password[\"']?\s*[=:]\s*[\"']?)[^\s\"',}]+"), r"\1***"),
)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def scrub(text: str) -> str:
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class JsonFormatter(logging.Formatter):
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.setLevel(level.upper())  # first: an unknown level (ValueError) changes nothing
    root.handlers[:] = [handler]
