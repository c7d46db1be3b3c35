"""The payload contract: models, generated JSON Schemas, parse(), task lifecycle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import generate
from schemas.payloads import ADAPTERS, MODELS, TaskCommand, TelemetryBatch, TelemetrySample
from schemas.states import (
    AGENT_SETTABLE,
    SERVER_SETTABLE,
    TERMINAL,
    TaskStatus,
    task_transition_allowed,
)
from schemas.topics import Kind
from schemas.validate import (
    DEFAULT_MAX_BYTES,
    INVENTORY_MAX_BYTES,
    MAX_BYTES,
    REASONS,
    PayloadError,
    dump,
    parse,
    telemetry_samples,
)

AGENT = "web-01"
TASK_ID = "0b5e2c1e-8a43-4f0e-9d0c-5d2f6b1a7c11"
TS = "2025-01-15T10:30:00Z"

# One valid payload per kind, the base the bad cases below are derived from.
VALID: dict[Kind, dict[str, Any]] = {
    Kind.STATUS: {"state": "online", "epoch": 7, "ts": TS},
    Kind.REGISTER: {
        "hostname": "web-01",
        "platform": "linux",
        "os_version": "Debian 12",
        "agent_version": "1.0.0",
        "hardware": {"cpu_count": 4, "memory_bytes": 8 << 30, "disk_bytes": 100 << 30},
        "ip_address": "10.0.0.5",
        "mac_address": "52:54:00:aa:bb:cc",
        "tags": {"env": "prod"},
        "ts": TS,
    },
    Kind.HEARTBEAT: {"ts": TS, "seq": 3},
    Kind.TELEMETRY: {
        "ts": TS,
        "cpu_percent": 12.5,
        "memory_percent": 40,
        "disk_percent": 50,
        "net_rx_bytes": 100,
        "net_tx_bytes": 200,
    },
    Kind.INVENTORY: {"ts": TS, "software": [{"name": "curl", "version": "8.5.0"}]},
    Kind.TASKS: {
        "task_id": TASK_ID,
        "type": "COLLECT",
        "payload": {"what": "logs"},
        "timeout_seconds": 60,
        "expires_at": "2025-01-16T10:30:00Z",
        "correlation_id": "c-1",
        "created_at": TS,
        "attempt": 1,
    },
    Kind.TASK_STATUS: {"task_id": TASK_ID, "status": "IN_PROGRESS", "progress": 50, "ts": TS},
    Kind.DEPLOYMENT_STATUS: {
        "deployment_id": TASK_ID,
        "status": "SUCCESS",
        "progress": 100,
        "ts": TS,
    },
}

# Per kind: (a required field, a field whose enum or type can be broken, a bad value).
BREAKABLE: dict[Kind, tuple[str, str, Any]] = {
    Kind.STATUS: ("state", "state", "sleeping"),
    Kind.REGISTER: ("hostname", "platform", "beos"),
    Kind.HEARTBEAT: ("ts", "seq", "three"),
    Kind.TELEMETRY: ("cpu_percent", "cpu_percent", "high"),
    Kind.INVENTORY: ("software", "software", {"curl": "8.5"}),
    Kind.TASKS: ("task_id", "type", "REBOOT"),
    Kind.TASK_STATUS: ("status", "status", "DONE"),
    Kind.DEPLOYMENT_STATUS: ("deployment_id", "status", "OK"),
}


def _bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _with(kind: Kind, **changes: Any) -> bytes:
    doc = dict(VALID[kind])
    doc.update(changes)
    return _bytes(doc)


def _without(kind: Kind, field: str) -> bytes:
    return _bytes({k: v for k, v in VALID[kind].items() if k != field})


def _reject(kind: Kind | str, payload: bytes, reason: str, *in_detail: str) -> PayloadError:
    with pytest.raises(PayloadError) as caught:
        parse(kind, AGENT, payload)
    err = caught.value
    assert err.reason == reason, err
    for text in in_detail:
        assert text in err.detail, err.detail
    assert len(err.detail) <= 300
    return err


def _schema(kind: Kind) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(generate.schema_path(kind).read_text(encoding="utf-8"))
    return loaded


def _validator(kind: Kind) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        _schema(kind), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


# --- generated files ---------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_committed_schema_is_generated(kind: Kind) -> None:
    path = generate.schema_path(kind)
    assert path.read_text(encoding="utf-8") == generate.render(kind), (
        f"{path.name} is stale: run python -m schemas.generate"
    )


def test_generate_check_exits_zero_when_up_to_date() -> None:
    assert generate.main(["--check"]) == 0


@pytest.mark.parametrize("kind", list(Kind))
def test_schema_file_metadata(kind: Kind) -> None:
    schema = _schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://eucora.example/schemas/v1/{kind.value}.schema.json"
    assert schema["title"] and schema["description"]
    assert len(schema["examples"]) >= 2
    assert schema.get("additionalProperties") is True or "if" in schema


def test_union_kinds_have_an_example_of_each_form() -> None:
    tele = _schema(Kind.TELEMETRY)["examples"]
    assert any("samples" in ex for ex in tele) and any("samples" not in ex for ex in tele)
    tasks = _schema(Kind.TASKS)["examples"]
    assert any("cancel" in ex for ex in tasks) and any("task_id" in ex for ex in tasks)


def test_format_checking_is_active() -> None:
    # Without rfc3339-validator installed, jsonschema skips "date-time" silently.
    naive = json.loads(_with(Kind.HEARTBEAT, ts="2025-01-15T10:30:00"))
    assert not _validator(Kind.HEARTBEAT).is_valid(naive)


def _all_examples() -> list[tuple[Kind, Any]]:
    return [(kind, ex) for kind in Kind for ex in _schema(kind)["examples"]]


@pytest.mark.parametrize(("kind", "example"), _all_examples())
def test_example_is_valid_for_jsonschema_and_parse(kind: Kind, example: Any) -> None:
    _validator(kind).validate(example)
    agent_id = example.get("agent_id", AGENT)
    model = parse(kind, agent_id, _bytes(example))
    assert type(model) in MODELS[kind]
    # parse() picks the same model as the TypeAdapter's discriminator.
    assert type(ADAPTERS[kind].validate_json(_bytes(example))) is type(model)


@pytest.mark.parametrize("kind", list(Kind))
def test_valid_base_payloads(kind: Kind) -> None:
    _validator(kind).validate(VALID[kind])
    parse(kind, AGENT, _bytes(VALID[kind]))


# --- rejections --------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_missing_field(kind: Kind) -> None:
    field = BREAKABLE[kind][0]
    _reject(kind, _without(kind, field), "schema", f"{kind}.{field}", "Field required")


@pytest.mark.parametrize("kind", list(Kind))
def test_bad_value(kind: Kind) -> None:
    _, field, bad = BREAKABLE[kind]
    _reject(kind, _with(kind, **{field: bad}), "schema", f"{kind}.{field}: ")
    assert not _validator(kind).is_valid(json.loads(_with(kind, **{field: bad})))


@pytest.mark.parametrize("kind", list(Kind))
def test_oversize_before_parsing(kind: Kind) -> None:
    # Not even JSON: the size check comes first.
    _reject(kind, b"{" * 1_000_000, "oversize", str(kind), "bytes")
    _reject(kind, b" " * (MAX_BYTES[kind] + 1), "oversize")
    assert MAX_BYTES[kind] < 1_000_000


def test_size_limits() -> None:
    assert MAX_BYTES[Kind.INVENTORY] == INVENTORY_MAX_BYTES == 768 * 1024
    assert MAX_BYTES[Kind.TELEMETRY] == DEFAULT_MAX_BYTES == 256 * 1024
    padded = _with(Kind.HEARTBEAT, pad="x" * DEFAULT_MAX_BYTES)
    _reject(Kind.HEARTBEAT, padded, "oversize")
    ok = _with(Kind.HEARTBEAT, pad="x" * (DEFAULT_MAX_BYTES - 100))
    parse(Kind.HEARTBEAT, AGENT, ok)


TIMESTAMP_FIELDS = {
    Kind.TASKS: "expires_at",
    **{k: "ts" for k in Kind if k is not Kind.TASKS},
}


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize(
    "value",
    [
        "2025-01-15T10:30:00",  # naive
        "2025-01-15 10:30:00",  # naive, space
        "2025-01-15T10:30Z",  # no seconds
        "2025-01-15",
        "yesterday",
        "2025-13-45T99:99:99Z",
        "",
        1736937000,  # a unix number is not RFC 3339
    ],
)
def test_bad_timestamp(kind: Kind, value: Any) -> None:
    field = TIMESTAMP_FIELDS[kind]
    _reject(kind, _with(kind, **{field: value}), "schema", f"{kind}.{field}: ")
    assert not _validator(kind).is_valid(json.loads(_with(kind, **{field: value})))


@pytest.mark.parametrize(
    "value", ["2025-01-15T10:30:00Z", "2025-01-15T10:30:00.123456+05:30", "2025-01-15t10:30:00z"]
)
def test_good_timestamps(value: str) -> None:
    model = parse(Kind.HEARTBEAT, AGENT, _with(Kind.HEARTBEAT, ts=value))
    assert model.ts.tzinfo is not None
    assert _validator(Kind.HEARTBEAT).is_valid(json.loads(_with(Kind.HEARTBEAT, ts=value)))


@pytest.mark.parametrize("kind", list(Kind))
def test_agent_id_must_match_topic(kind: Kind) -> None:
    parse(kind, AGENT, _with(kind, agent_id=AGENT))
    err = _reject(kind, _with(kind, agent_id="web-02"), "identity", f"{kind}.agent_id")
    assert "web-02" in err.detail


def test_agent_id_inside_batch_must_match_topic() -> None:
    sample = dict(VALID[Kind.TELEMETRY])
    batch = {"samples": [sample, {**sample, "agent_id": "intruder"}]}
    _reject(Kind.TELEMETRY, _bytes(batch), "identity", "telemetry.samples[1].agent_id")


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b'{"ts": "2025-01-15T10:30:00Z"',  # truncated
        b"\xff\xfe{}",  # invalid UTF-8
        b'{"ts": "\xc3\x28"}',  # invalid UTF-8 inside a string
        b'{"x": "\\ud800"}',  # lone surrogate
        b"{'ts': 1}",
        b'{"a": NaN}',  # NaN anywhere, even in an extra field
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1e999}',  # overflows to infinity
    ],
)
def test_not_json(kind: Kind, payload: bytes) -> None:
    _reject(kind, payload, "not_json", str(kind))


@pytest.mark.parametrize("kind", list(Kind))
def test_nan_in_a_typed_field_is_not_json(kind: Kind) -> None:
    doc = _with(kind, ts="X").replace(b'"X"', b"NaN")
    _reject(kind, doc, "not_json")


def test_pydantic_json_parser_alone_would_accept_nan() -> None:
    # Why parse() gates with orjson: pydantic-core reads NaN literals, and with
    # extra="allow" an unknown field would carry a NaN through to storage.
    doc = VALID[Kind.HEARTBEAT] | {"x": "X"}
    raw = _bytes(doc).replace(b'"X"', b"NaN")
    model = ADAPTERS[Kind.HEARTBEAT].validate_json(raw)
    assert model.model_extra is not None and model.model_extra["x"] != model.model_extra["x"]
    # ...while typed floats are rejected by allow_inf_nan=False.
    tele = _with(Kind.TELEMETRY, cpu_percent="X").replace(b'"X"', b"NaN")
    with pytest.raises(ValueError, match="finite number"):
        ADAPTERS[Kind.TELEMETRY].validate_json(tele)


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize(
    ("payload", "what"),
    [(b"[1]", "an array"), (b'"x"', "a string"), (b"1", "a number"), (b"null", "null")],
)
def test_non_object_json(kind: Kind, payload: bytes, what: str) -> None:
    _reject(kind, payload, "schema", f"{kind}: payload must be a JSON object, got {what}")


def test_unknown_kind() -> None:
    _reject("reboot", b"{}", "unknown_kind", "reboot")
    _reject("", b"{}", "unknown_kind")
    # The raw topic segment works as well as the enum.
    assert isinstance(parse("telemetry", AGENT, _bytes(VALID[Kind.TELEMETRY])), TelemetrySample)


def test_nul_in_strings_rejected() -> None:
    _reject(Kind.HEARTBEAT, _with(Kind.HEARTBEAT, note="a\x00b"), "schema", "U+0000")
    _reject(Kind.HEARTBEAT, _bytes({**VALID[Kind.HEARTBEAT], "k\x00": 1}), "schema", "U+0000")
    # An escaped backslash followed by "u0000" is not a NUL.
    parse(Kind.HEARTBEAT, AGENT, _with(Kind.HEARTBEAT, note="\\u0000"))


def test_extra_fields_are_kept() -> None:
    model = parse(Kind.HEARTBEAT, AGENT, _with(Kind.HEARTBEAT, load_avg=[0.5, 0.3, 0.1]))
    assert model.model_extra == {"load_avg": [0.5, 0.3, 0.1]}


def test_optional_null_means_absent() -> None:
    model = parse(Kind.HEARTBEAT, AGENT, _with(Kind.HEARTBEAT, seq=None, agent_id=None))
    assert model.seq is None and model.agent_id is None


# --- telemetry batches and specific bounds -----------------------------------------


def test_telemetry_single_and_batch() -> None:
    sample = VALID[Kind.TELEMETRY]
    single = parse(Kind.TELEMETRY, AGENT, _bytes(sample))
    batch = parse(Kind.TELEMETRY, AGENT, _bytes({"samples": [sample] * 1000}))
    assert isinstance(single, TelemetrySample) and isinstance(batch, TelemetryBatch)
    assert telemetry_samples(single) == [single]
    assert len(telemetry_samples(batch)) == 1000


def test_empty_and_too_large_batches() -> None:
    _reject(Kind.TELEMETRY, b'{"samples": []}', "schema", "telemetry.samples: ", "at least 1")
    big = _bytes({"samples": [VALID[Kind.TELEMETRY]] * 1001})
    _reject(Kind.TELEMETRY, big, "schema", "telemetry.samples: ", "at most 1000")


def test_batch_error_names_the_sample() -> None:
    bad = {**VALID[Kind.TELEMETRY], "cpu_percent": 101}
    err = _reject(Kind.TELEMETRY, _bytes({"samples": [VALID[Kind.TELEMETRY], bad]}), "schema")
    assert err.detail == (
        "telemetry.samples[1].cpu_percent: Input should be less than or equal to 100"
    )


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (Kind.TELEMETRY, "cpu_percent", -0.1),
        (Kind.TELEMETRY, "memory_percent", 100.01),
        (Kind.TELEMETRY, "net_rx_bytes", -1),
        (Kind.TELEMETRY, "net_tx_bytes", 2**63),
        (Kind.TELEMETRY, "net_tx_bytes", 1.5),
        (Kind.TELEMETRY, "net_tx_bytes", "12"),
        (Kind.TELEMETRY, "cpu_percent", True),
        (Kind.TELEMETRY, "net_rx_bytes", True),
        (Kind.TELEMETRY, "net_rx_bytes", 1e300),
        (Kind.STATUS, "epoch", -1),
        (Kind.STATUS, "session_present", "yes"),
        (Kind.TASK_STATUS, "progress", 101),
        (Kind.DEPLOYMENT_STATUS, "progress", -5),
        (Kind.TASKS, "timeout_seconds", 0),
        (Kind.TASKS, "attempt", 0),
        (Kind.TASKS, "task_id", "not-a-uuid"),
        (Kind.TASKS, "payload", [1, 2]),
        (Kind.REGISTER, "hostname", "h" * 256),
        (Kind.REGISTER, "hostname", ""),
        (Kind.REGISTER, "mac_address", "52:54:00:aa:bb"),
        (Kind.REGISTER, "ip_address", "10.0.0.256"),
        (Kind.REGISTER, "tags", {f"k{i}": "v" for i in range(65)}),
        (Kind.REGISTER, "tags", {"a=b": "v"}),
        (Kind.REGISTER, "tags", {"k": 1}),
        (Kind.INVENTORY, "software", [{"name": "", "version": "1"}]),
        (Kind.INVENTORY, "software", [{"name": "x"}]),
    ],
)
def test_bounds(kind: Kind, field: str, value: Any) -> None:
    _reject(kind, _with(kind, **{field: value}), "schema", f"{kind}.{field}")
    assert not _validator(kind).is_valid(json.loads(_with(kind, **{field: value})))


def test_integral_float_is_an_integer() -> None:
    # JSON Schema's "integer" accepts 42.0, so the bridge must too.
    doc = json.loads(_with(Kind.TELEMETRY, net_rx_bytes=42.0))
    assert _validator(Kind.TELEMETRY).is_valid(doc)
    model = parse(Kind.TELEMETRY, AGENT, _with(Kind.TELEMETRY, net_rx_bytes=42.0))
    assert isinstance(model, TelemetrySample) and model.net_rx_bytes == 42


def test_inventory_limits() -> None:
    item = {"name": "p", "version": "1"}
    parse(Kind.INVENTORY, AGENT, _with(Kind.INVENTORY, software=[item] * 20_000))
    _reject(
        Kind.INVENTORY,
        _with(Kind.INVENTORY, software=[item] * 20_001),
        "schema",
        "inventory.software: ",
    )


def test_task_forms() -> None:
    command = parse(Kind.TASKS, AGENT, _bytes(VALID[Kind.TASKS]))
    cancel = parse(Kind.TASKS, AGENT, _bytes({"cancel": TASK_ID}))
    assert type(command).__name__ == "TaskCommand" and type(cancel).__name__ == "TaskCancel"
    _reject(Kind.TASKS, b'{"cancel": 5}', "schema", "tasks.cancel: ")


@pytest.mark.parametrize("status", sorted(set(TaskStatus) - AGENT_SETTABLE))
def test_agent_cannot_report_server_states(status: TaskStatus) -> None:
    payload = _with(Kind.TASK_STATUS, status=status.value)
    _reject(Kind.TASK_STATUS, payload, "schema", "task-status.status: ", "set by the server")
    assert not _validator(Kind.TASK_STATUS).is_valid(json.loads(payload))


@pytest.mark.parametrize("status", sorted(AGENT_SETTABLE))
def test_agent_reports_its_states(status: TaskStatus) -> None:
    model = parse(Kind.TASK_STATUS, AGENT, _with(Kind.TASK_STATUS, status=status.value))
    assert model.status is status


def test_dump_round_trips() -> None:
    for kind in Kind:
        model = parse(kind, AGENT, _bytes(VALID[kind]))
        again = parse(kind, AGENT, dump(model))
        assert again == model
        assert _validator(kind).is_valid(orjson.loads(dump(model)))


def test_dump_enforces_the_size_limit() -> None:
    model = TaskCommand.model_validate_json(
        _with(Kind.TASKS, payload={"blob": "x" * DEFAULT_MAX_BYTES})
    )
    with pytest.raises(PayloadError) as caught:
        dump(model)
    assert caught.value.reason == "oversize"


# --- properties --------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from([*Kind, "bogus"]), payload=st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_payload_error(kind: Kind | str, payload: bytes) -> None:
    try:
        parse(kind, AGENT, payload)
    except PayloadError as err:
        assert err.reason in REASONS


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(list(Kind)), value=_json_values, data=st.data())
def test_mutated_payloads_only_raise_payload_error(
    kind: Kind, value: Any, data: st.DataObject
) -> None:
    doc = dict(VALID[kind])
    field = data.draw(st.sampled_from([*sorted(doc), "agent_id", "samples", "cancel", "x"]))
    doc[field] = value
    raw = json.dumps(doc, allow_nan=True).encode()  # NaN included on purpose
    try:
        parse(kind, AGENT, raw)
    except PayloadError as err:
        assert err.reason in REASONS
        assert err.detail


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(list(Kind)), value=_json_values, data=st.data())
def test_json_schema_valid_implies_parse_ok(kind: Kind, value: Any, data: st.DataObject) -> None:
    """A payload that passes the published JSON Schema is never dead-lettered."""
    doc = dict(VALID[kind])
    field = data.draw(st.sampled_from(sorted(doc)))
    doc[field] = value
    if not _validator(kind).is_valid(doc):
        return
    try:
        raw = json.dumps(doc, allow_nan=False).encode()
    except ValueError:
        return
    try:
        parse(kind, AGENT, raw)
    except PayloadError as err:
        assert err.reason == "schema" and "U+0000" in err.detail, err


# --- task lifecycle ----------------------------------------------------------------

S = TaskStatus


def test_sets() -> None:
    assert {S.ASSIGNED, S.IN_PROGRESS, S.COMPLETED, S.FAILED, S.REJECTED} == AGENT_SETTABLE
    assert {S.COMPLETED, S.FAILED, S.REJECTED, S.TIMEOUT, S.EXPIRED, S.CANCELLED} == TERMINAL
    assert not AGENT_SETTABLE & SERVER_SETTABLE
    assert AGENT_SETTABLE | SERVER_SETTABLE | {S.PENDING} == set(S)


@pytest.mark.parametrize("current", sorted(TERMINAL))
def test_terminal_states_are_final(current: TaskStatus) -> None:
    assert not any(task_transition_allowed(current, new) for new in S)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (S.PENDING, S.ASSIGNED),
        (S.ASSIGNED, S.IN_PROGRESS),
        (S.IN_PROGRESS, S.COMPLETED),
        (S.IN_PROGRESS, S.FAILED),
        # lost ASSIGNED / IN_PROGRESS reports
        (S.PENDING, S.IN_PROGRESS),
        (S.PENDING, S.COMPLETED),
        (S.ASSIGNED, S.FAILED),
        (S.PENDING, S.REJECTED),
        (S.ASSIGNED, S.REJECTED),
        (S.IN_PROGRESS, S.TIMEOUT),
        (S.ASSIGNED, S.TIMEOUT),
        (S.PENDING, S.EXPIRED),
        (S.ASSIGNED, S.EXPIRED),
        (S.PENDING, S.CANCELLED),
        (S.ASSIGNED, S.CANCELLED),
        (S.IN_PROGRESS, S.CANCELLED),
    ],
)
def test_allowed(current: TaskStatus, new: TaskStatus) -> None:
    assert task_transition_allowed(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (S.IN_PROGRESS, S.ASSIGNED),  # backwards (a late, reordered ack)
        (S.IN_PROGRESS, S.REJECTED),  # too late to refuse
        (S.IN_PROGRESS, S.EXPIRED),  # expires_at only applies before start
        (S.PENDING, S.TIMEOUT),  # the timeout runs from the start
        (S.ASSIGNED, S.PENDING),
        (S.PENDING, S.PENDING),
        (S.IN_PROGRESS, S.IN_PROGRESS),  # a progress update is not a transition
    ],
)
def test_not_allowed(current: TaskStatus, new: TaskStatus) -> None:
    assert not task_transition_allowed(current, new)


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("new", list(S))
def test_sources(current: TaskStatus, new: TaskStatus) -> None:
    by_agent = task_transition_allowed(current, new, source="agent")
    by_server = task_transition_allowed(current, new, source="server")
    anyone = task_transition_allowed(current, new)
    assert by_agent == (anyone and new in AGENT_SETTABLE)
    assert by_server == (anyone and new in SERVER_SETTABLE)
    assert not task_transition_allowed(current, S.PENDING)


def test_lifecycle_reaches_terminal_from_pending() -> None:
    # Every non-terminal state can still end; nothing is a dead end.
    for state in set(S) - TERMINAL:
        assert any(task_transition_allowed(state, t) for t in TERMINAL)


def test_generate_check_detects_a_stale_file(tmp_path: Path) -> None:
    where = ["--dir", str(tmp_path)]
    assert generate.main([*where, "--check"]) == 1  # missing files
    assert generate.main(where) == 0
    assert generate.main([*where, "--check"]) == 0
    (tmp_path / "tasks.schema.json").write_text("{}\n")
    assert generate.main([*where, "--check"]) == 1
    assert generate.main(where) == 0
    assert (tmp_path / "tasks.schema.json").read_text() == generate.render(Kind.TASKS)
