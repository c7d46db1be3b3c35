"""Write the JSON Schemas from the models: `schemas/<kind>.schema.json` for each payload
kind (payloads.py), `schemas/event-<kind>.schema.json` for each event kind (events.py).

python -m schemas.generate           # (re)write the files
python -m schemas.generate --check   # exit 1 if a committed file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schemas import events
from schemas.payloads import ADAPTERS, DESCRIPTIONS, MODELS
from schemas.topics import Kind

SCHEMA_DIR = Path(__file__).resolve().parent
DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_ID = "https://eucora.example/schemas/v1/"


def schema_path(kind: Kind, directory: Path = SCHEMA_DIR) -> Path:
    return directory / f"{kind.value}.schema.json"


def build(kind: Kind) -> dict[str, Any]:
    """The JSON Schema of one payload kind, as a dict."""
    schema = ADAPTERS[kind].json_schema(mode="validation")
    if "oneOf" in schema:
        # The two unions are tagged by one key's presence (see payloads._dict_has);
        # if/then/else says exactly that, where oneOf would be ambiguous for an
        # object that satisfies both (extra fields are allowed).
        first, second = (entry["$ref"] for entry in schema.pop("oneOf"))
        tag = "samples" if kind is Kind.TELEMETRY else "cancel"
        schema.update(
            {"if": {"required": [tag]}, "then": {"$ref": second}, "else": {"$ref": first}}
        )
    examples: list[Any] = []
    for model in MODELS[kind]:
        extra = model.model_config.get("json_schema_extra")
        assert isinstance(extra, dict), f"{model.__name__} has no examples"
        examples.extend(extra["examples"])  # type: ignore[arg-type]
    schema.update(
        {
            "$schema": DIALECT,
            "$id": f"{BASE_ID}{kind.value}.schema.json",
            "title": f"EUCORA {kind.value} payload (topic eucora/v1/agents/{{agent_id}}/{kind})",
            "description": DESCRIPTIONS[kind],
            "examples": examples,
        }
    )
    return schema


def event_schema_path(kind: events.EventKind, directory: Path = SCHEMA_DIR) -> Path:
    return directory / f"event-{kind.value}.schema.json"


def build_event(kind: events.EventKind) -> dict[str, Any]:
    """The JSON Schema of one event kind: the envelope, with that kind's `data`."""
    schema = events.Envelope.model_json_schema(mode="serialization")
    data = events.DATA[kind].model_json_schema(mode="serialization")
    if "$defs" in data:
        schema.setdefault("$defs", {}).update(data.pop("$defs"))
    schema["properties"]["kind"] = {"const": kind.value, "title": "Kind", "type": "string"}
    schema["properties"]["data"] = data
    schema.update(
        {
            "$schema": DIALECT,
            "$id": f"{BASE_ID}event-{kind.value}.schema.json",
            "title": f"EUCORA event {kind.value}",
            "description": events.DESCRIPTIONS[kind],
        }
    )
    return schema


def _text(schema: dict[str, Any]) -> str:
    """Stable text: sorted keys, indent 2, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render(kind: Kind) -> str:
    return _text(build(kind))


def files(directory: Path) -> list[tuple[Path, str]]:
    """Every schema file and the text it should hold."""
    return [(schema_path(k, directory), render(k)) for k in Kind] + [
        (event_schema_path(k, directory), _text(build_event(k))) for k in events.EventKind
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.generate", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a file differs from what would be written"
    )
    parser.add_argument(
        "--dir", type=Path, default=SCHEMA_DIR, help="where the files are (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    stale = []
    every = files(args.dir)
    for path, text in every:
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path.name)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(
            f"stale JSON Schemas: {', '.join(stale)}; run python -m schemas.generate",
            file=sys.stderr,
        )
        return 1
    if not args.check:
        print(f"wrote {len(stale)} of {len(every)} schema files in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
