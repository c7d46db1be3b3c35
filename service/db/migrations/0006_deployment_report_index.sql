-- 0006: the repeat check of an agent's deployment-status report (a QoS 1 redelivery, another
-- bridge's copy) looks up (deployment, agent, its ts): without this it scanned every event.
CREATE INDEX deployment_status_events_report_idx
    ON deployment_status_events (deployment_id, agent_id, agent_ts);
