"""Structured logging: one JSON object per line on stderr, secrets scrubbed."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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

# Fields every line carries while a `context` block runs (this thread, this asyncio
# task): the ids of the message or task being handled, so a line logged deep inside
# (a domain, a library callback) can be found by agent_id, task_id, deployment_id or
# correlation_id without each call passing them.
_context: ContextVar[dict[str, Any] | None] = ContextVar("eucora_log_context", default=None)


@contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Log lines inside the block carry `fields` (None values are left out)."""
    token = _context.set({**(_context.get() or {}), **_known(fields)})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the innermost `context` block (learnt while handling it, e.g. a
    task's correlation id read from the database); nothing outside a block."""
    current = _context.get()
    if current is not None:
        current.update(_known(fields))


def _known(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) for k, v in fields.items() if v is not None}


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
        doc.update(_context.get() or {})
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
