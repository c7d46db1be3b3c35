"""Every Prometheus metric the bridge exports, in one place (the domains count here too)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter("eucora_messages_received", "MQTT messages received by the bridge")
STORED = Counter("eucora_messages_stored", "Messages whose data is committed", ["kind"])
ROWS = Counter("eucora_rows_stored", "Rows written, by table", ["table"])
DUPLICATES = Counter("eucora_duplicates", "Samples already stored (QoS 1 redelivery, replay)")
DEAD_LETTERS = Counter("eucora_dead_letters", "Messages rejected into dead_letters", ["reason"])
IDENTITY_VIOLATIONS = Counter(
    "eucora_identity_violations", "Payloads claiming an agent id other than their topic's"
)
BATCH_SIZE = Histogram(
    "eucora_batch_messages",
    "Messages per committed batch",
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000),
)
FLUSH_SECONDS = Histogram(
    "eucora_batch_seconds",
    "Time to store one batch (COPY and COMMIT)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
FLUSH_FAILURES = Counter("eucora_batch_failures", "Batches that failed to store and were retried")
PENDING = Gauge("eucora_unacked_in_flight", "Messages received but not yet acknowledged")
QOS0_DROPPED = Counter(
    "eucora_qos0_dropped", "QoS 0 messages dropped because max_pending were unacknowledged"
)
MQTT_CONNECTED = Gauge(
    "eucora_mqtt_connected", "1 while the bridge is connected to every broker it links"
)
BROKER_CONNECTED = Gauge(
    "eucora_broker_connected", "1 while the bridge is connected to this broker", ["broker"]
)

# Tasks (docs/tasks.md)
TASKS_PUBLISHED = Counter(
    "eucora_tasks_published", "Task messages acknowledged by the broker", ["message"]
)  # command, cancel
TASK_REPORTS = Counter(
    "eucora_task_reports", "Task-status reports from agents, by outcome", ["outcome"]
)  # accepted, progress, duplicate, out_of_order, after_terminal, illegal, foreign, unknown_task,
# repeat (the same message again: redelivery, or another bridge's copy)
TASKS_SWEPT = Counter("eucora_tasks_swept", "Tasks the sweep moved, by new status", ["status"])
TASKS_OWED_AGAIN = Counter(
    "eucora_tasks_owed_again", "Tasks queued for republishing to an agent that lost its session"
)
OUTBOX_BACKLOG = Gauge(
    "eucora_outbox_backlog",
    "Task messages due now and not yet published (counted every few seconds, capped)",
)
OUTBOX_FAILURES = Counter(
    "eucora_outbox_failures", "Outbox rounds that failed (database or broker) and were retried"
)

# Agents (docs/agents.md)
STATUS_TRANSITIONS = Counter(
    "eucora_status_transitions", "Accepted online/offline transitions", ["state"]
)
STATUS_IGNORED = Counter(
    "eucora_status_ignored", "Status messages ignored as out of order (older epoch)"
)
REGISTRATIONS = Counter(
    "eucora_registrations", "Registrations applied", ["outcome"]
)  # new, unchanged, changed, out_of_order
MARKED_STALE = Counter("eucora_agents_marked_stale", "Online agents marked stale by the sweep")
INVENTORY_CHANGES = Counter(
    "eucora_inventory_changes", "Software added, removed or changed", ["change"]
)

# Deployments (docs/deployments.md)
DEPLOYMENTS = Counter(
    "eucora_deployment_transitions", "Deployment state changes, by new state", ["state"]
)
DEPLOYMENT_STARTS = Counter("eucora_deployment_starts", "Targets sent their DEPLOY task")
DEPLOYMENT_AGENTS = Counter(
    "eucora_deployment_agent_transitions", "Per-target state changes, by new state", ["state"]
)
DEPLOYMENT_REPORTS = Counter(
    "eucora_deployment_reports", "deployment-status reports from agents, by outcome", ["outcome"]
)  # accepted, progress, repeat, duplicate, illegal, after_final, not_started, unknown

# The event relay to NATS JetStream (docs/events.md, "From NATS JetStream")
RELAY_ACTIVE = Gauge(
    "eucora_events_relay_active", "1 while this bridge is the one relaying events to JetStream"
)
RELAYED = Counter("eucora_events_relayed", "Events acknowledged by JetStream (resends included)")
RELAY_DUPLICATES = Counter(
    "eucora_events_relay_duplicates", "Resent events JetStream already had (dropped by msg id)"
)
RELAY_FAILURES = Counter(
    "eucora_events_relay_failures", "Relay sessions ended by an error (NATS or database away)"
)
RELAY_BEHIND = Gauge(
    "eucora_events_relay_behind", "Events recorded but not yet acknowledged by JetStream"
)
RELAY_LAG_SECONDS = Gauge(
    "eucora_events_relay_lag_seconds",
    "Age of the oldest event not yet acknowledged by JetStream (0 when caught up)",
)
