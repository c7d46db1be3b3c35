"""Contract constants other than states and topics, each spelled once.

The agent, the bridge, the CLI and the migrations' tests all read these; nothing else
may repeat the literal (tests/test_contract.py looks for copies).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

# MQTT 5 session expiry an agent and the bridge ask for: a persistent session (the
# offline task queue) outlives a week-long absence.
SESSION_EXPIRY_S: Final = 7 * 24 * 3600


# MQTT versions an agent may speak: 5 (the default) or 3.1.1, which has no session
# expiry (the broker's persistent_client_expiration applies) and no reason codes.
class MqttVersion(StrEnum):
    V5 = "5"
    V311 = "3.1.1"


MQTT_VERSIONS: Final = tuple(v.value for v in MqttVersion)

# The `reason` an agent puts in its last will's payload: the bridge records such an
# offline with source "last_will" rather than "agent".
WILL_REASON: Final = "last will"

# CONNACK reasons where retrying with the same credentials cannot help.
FATAL_CONNECT_REASONS: Final = frozenset(
    {
        "Bad user name or password",
        "Not authorized",
        "Client identifier not valid",
        "Banned",
        "Bad authentication method",
    }
)

# Tasks (SPEC "Tasks"): how long a started task may run, and how long an undelivered
# one may wait before it is EXPIRED.
TASK_DEFAULT_TIMEOUT_S: Final = 3600
TASK_MAX_TIMEOUT_S: Final = 30 * 86400
TASK_DEFAULT_EXPIRES_IN_S: Final = 7 * 86400

# An agent that says it is online but sent nothing for this long is marked stale.
OFFLINE_AFTER_S: Final = 300.0

# PostgreSQL NOTIFY channels: "a task message is owed, the outbox should look now";
# "a deployment changed, the rollout engine should look now".
OUTBOX_CHANNEL: Final = "eucora_outbox"
DEPLOYMENTS_CHANNEL: Final = "eucora_deployments"

# Deployments: a failure percentage aborts a rollout only once this many targets
# finished (a first failure out of one is not 100% of a fleet).
DEPLOYMENT_ABORT_MIN_FINISHED: Final = 20

# The metrics of one telemetry sample, in storage order (payload fields, telemetry
# columns, the CLI's output). The payload model is checked against this list.
TELEMETRY_METRICS: Final = (
    "cpu_percent",
    "memory_percent",
    "disk_percent",
    "net_rx_bytes",
    "net_tx_bytes",
)
