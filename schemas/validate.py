"""The one way to turn a payload received on a topic into a model: `parse()`.

Used on the bridge's hot path and by the reference agent. Every failure is a
`PayloadError` with a `reason` from a closed set (the dead-letter table and the
metrics use it as a label) and a short `detail` that names the field.

Checks, cheapest first: known kind, size (before any parsing), strict JSON (orjson:
UTF-8, RFC 8259, so no NaN/Infinity literals anywhere, no lone surrogates), a JSON
object, no U+0000 in any string (PostgreSQL text and jsonb refuse it), the model,
then identity (an `agent_id` in the payload must equal the topic's).
"""

from __future__ import annotations

from typing import Any, Final, Literal, get_args, overload

import orjson
from pydantic import ValidationError

from schemas.payloads import (
    MODELS,
    DeploymentStatusReport,
    Heartbeat,
    Inventory,
    Payload,
    Register,
    Status,
    TaskCancel,
    TaskCommand,
    TaskStatusReport,
    TelemetryBatch,
    TelemetrySample,
)
from schemas.topics import Kind

Reason = Literal["oversize", "not_json", "schema", "identity", "unknown_kind"]
REASONS: Final[frozenset[str]] = frozenset(get_args(Reason))

DEFAULT_MAX_BYTES: Final = 256 * 1024
INVENTORY_MAX_BYTES: Final = 768 * 1024  # 20 000 packages of ~40 bytes each
MAX_BYTES: Final[dict[Kind, int]] = {
    kind: INVENTORY_MAX_BYTES if kind is Kind.INVENTORY else DEFAULT_MAX_BYTES for kind in Kind
}
DETAIL_MAX_CHARS: Final = 300  # details land in logs and the dead-letter table

TelemetryMessage = TelemetrySample | TelemetryBatch
TaskMessage = TaskCommand | TaskCancel
AnyPayload = (
    Status
    | Register
    | Heartbeat
    | TelemetrySample
    | TelemetryBatch
    | Inventory
    | TaskCommand
    | TaskCancel
    | TaskStatusReport
    | DeploymentStatusReport
)

_KIND_OF_MODEL: Final[dict[type[Payload], Kind]] = {
    model: kind for kind, models in MODELS.items() for model in models
}
# The key whose presence selects a union kind's second model (see payloads).
_TAGS: Final[dict[Kind, str]] = {Kind.TELEMETRY: "samples", Kind.TASKS: "cancel"}
_Plan = tuple[Kind, int, type[Payload], str | None, type[Payload]]
# One lookup per message, by Kind or by the raw topic segment (Kind(...) and Enum
# hashing are slow enough to show in the hot path).
_PLANS: Final[dict[Kind | str, _Plan]] = {}
for _kind, _models in MODELS.items():
    _plan = (_kind, MAX_BYTES[_kind], _models[0], _TAGS.get(_kind), _models[-1])
    _PLANS[_kind] = _PLANS[_kind.value] = _plan
_JSON_TYPE_NAMES: Final[dict[type, str]] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class PayloadError(ValueError):
    """A payload that is not a valid instance of its kind."""

    def __init__(self, reason: Reason, detail: str) -> None:
        if len(detail) > DETAIL_MAX_CHARS:
            detail = detail[: DETAIL_MAX_CHARS - 3] + "..."
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail: str = detail


@overload
def parse(
    kind: Literal[Kind.STATUS], topic_agent_id: str, payload: bytes | bytearray
) -> Status: ...
@overload
def parse(
    kind: Literal[Kind.REGISTER], topic_agent_id: str, payload: bytes | bytearray
) -> Register: ...
@overload
def parse(
    kind: Literal[Kind.HEARTBEAT], topic_agent_id: str, payload: bytes | bytearray
) -> Heartbeat: ...
@overload
def parse(
    kind: Literal[Kind.TELEMETRY], topic_agent_id: str, payload: bytes | bytearray
) -> TelemetryMessage: ...
@overload
def parse(
    kind: Literal[Kind.INVENTORY], topic_agent_id: str, payload: bytes | bytearray
) -> Inventory: ...
@overload
def parse(
    kind: Literal[Kind.TASKS], topic_agent_id: str, payload: bytes | bytearray
) -> TaskMessage: ...
@overload
def parse(
    kind: Literal[Kind.TASK_STATUS], topic_agent_id: str, payload: bytes | bytearray
) -> TaskStatusReport: ...
@overload
def parse(
    kind: Literal[Kind.DEPLOYMENT_STATUS], topic_agent_id: str, payload: bytes | bytearray
) -> DeploymentStatusReport: ...
@overload
def parse(kind: Kind | str, topic_agent_id: str, payload: bytes | bytearray) -> AnyPayload: ...


def parse(kind: Kind | str, topic_agent_id: str, payload: bytes | bytearray) -> AnyPayload:
    """Validate `payload` received on `{root}/agents/{topic_agent_id}/{kind}`.

    `kind` may be the raw last topic segment; an unknown one is reason "unknown_kind".
    Raises PayloadError and nothing else, whatever the bytes.
    """
    plan = _PLANS.get(kind)
    if plan is None:
        raise PayloadError("unknown_kind", f"unknown message kind {str(kind)!r}")
    k, limit, main_model, tag, tagged_model = plan
    if len(payload) > limit:
        raise PayloadError("oversize", f"{k}: {len(payload)} bytes, over the {limit}-byte limit")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise PayloadError("not_json", f"{k}: invalid JSON: {exc}") from None
    if type(doc) is not dict:
        kind_of = _JSON_TYPE_NAMES.get(type(doc), "not an object")
        raise PayloadError("schema", f"{k}: payload must be a JSON object, got {kind_of}")
    # A cheap byte scan first: the walk only runs when an escaped NUL may be present.
    if b"\\u0000" in payload and _has_nul(doc):
        raise PayloadError("schema", f"{k}: strings must not contain U+0000 (\\u0000)")
    # Pick the model as ADAPTERS' discriminators do (by the tag key's presence), then
    # parse again with pydantic-core: measured faster than the adapter's callable
    # discriminator or than validating orjson's dict, and it keeps JSON-mode strictness.
    model_type = tagged_model if tag is not None and tag in doc else main_model
    try:
        model: AnyPayload = model_type.__pydantic_validator__.validate_json(payload)
    except ValidationError as exc:
        raise PayloadError("schema", _describe(k, exc)) from None
    agent_id = model.agent_id
    if (agent_id is not None and agent_id != topic_agent_id) or type(model) is TelemetryBatch:
        _check_identity(k, topic_agent_id, model)
    return model


def dump(model: AnyPayload) -> bytes:
    """Serialize a model for publishing, within its kind's size limit.

    Unset optional fields are left out rather than sent as null.
    """
    data = model.model_dump_json(exclude_unset=True).encode()
    kind = _KIND_OF_MODEL[type(model)]
    if len(data) > MAX_BYTES[kind]:
        raise PayloadError(
            "oversize", f"{kind}: {len(data)} bytes, over the {MAX_BYTES[kind]}-byte limit"
        )
    return data


def telemetry_samples(message: TelemetryMessage) -> list[TelemetrySample]:
    """The samples of a telemetry message, single or batch alike."""
    return list(message.samples) if isinstance(message, TelemetryBatch) else [message]


def _describe(kind: Kind, exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    first = errors[0]
    path = str(kind)
    for part in first["loc"]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: {first['msg']}{more}"


def _check_identity(kind: Kind, topic_agent_id: str, model: AnyPayload) -> None:
    if model.agent_id is not None and model.agent_id != topic_agent_id:
        raise PayloadError(
            "identity", _mismatch(f"{kind}.agent_id", model.agent_id, topic_agent_id)
        )
    if isinstance(model, TelemetryBatch):
        for i, sample in enumerate(model.samples):
            if sample.agent_id is not None and sample.agent_id != topic_agent_id:
                where = f"{kind}.samples[{i}].agent_id"
                raise PayloadError("identity", _mismatch(where, sample.agent_id, topic_agent_id))


def _mismatch(where: str, claimed: str, topic_agent_id: str) -> str:
    return f"{where}: {claimed!r} does not match the topic's agent id {topic_agent_id!r}"


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in key or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False
