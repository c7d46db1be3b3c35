-- 0010 with TimescaleDB: events as a hypertable of daily chunks (with the default
-- (ts DESC) index). Retention is not a TimescaleDB policy: the bridge deletes what is
-- older than event_retention.days and records the newest position it deleted, which
-- readers need to tell a cursor that lost events (docs/events.md); the chunks it
-- empties are then dropped.
SELECT create_hypertable('events', 'ts', chunk_time_interval => INTERVAL '1 day');
