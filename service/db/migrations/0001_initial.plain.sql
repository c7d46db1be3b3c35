-- 0001 on plain PostgreSQL: what TimescaleDB would otherwise provide.

-- time_bucket() with TimescaleDB's semantics, so dashboards run unchanged: buckets are
-- aligned on TimescaleDB's default origin, Monday 2000-01-03 00:00 UTC (weekly buckets
-- start on Mondays). date_bin() cannot bin by months or years: time_bucket('1 month', ...)
-- raises an error here, where TimescaleDB would return calendar months.
CREATE FUNCTION time_bucket(bucket_width interval, ts timestamptz)
RETURNS timestamptz LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT date_bin(bucket_width, ts, TIMESTAMPTZ '2000-01-03 00:00:00+00') $$;

CREATE FUNCTION time_bucket(bucket_width interval, ts timestamp)
RETURNS timestamp LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT date_bin(bucket_width, ts, TIMESTAMP '2000-01-03 00:00:00') $$;

CREATE FUNCTION time_bucket(bucket_width interval, ts timestamptz, origin timestamptz)
RETURNS timestamptz LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT date_bin(bucket_width, ts, origin) $$;

CREATE FUNCTION time_bucket(bucket_width interval, ts timestamp, origin timestamp)
RETURNS timestamp LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT date_bin(bucket_width, ts, origin) $$;

CREATE FUNCTION time_bucket(bucket_width interval, ts timestamptz, "offset" interval)
RETURNS timestamptz LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT date_bin(bucket_width, ts, TIMESTAMPTZ '2000-01-03 00:00:00+00' + "offset") $$;

-- Buckets in local time of a zone (daily buckets start at local midnight).
CREATE FUNCTION time_bucket(bucket_width interval, ts timestamptz, timezone text)
RETURNS timestamptz LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT date_bin(bucket_width, ts AT TIME ZONE timezone, TIMESTAMP '2000-01-03 00:00:00')
             AT TIME ZONE timezone $$;

-- Time-range scans without a hypertable's chunk exclusion: BRIN indexes are tiny and
-- cheap to maintain on append-mostly tables, so they cost ingest almost nothing.
CREATE INDEX telemetry_time_brin ON telemetry USING brin (time);
CREATE INDEX agent_status_events_time_brin ON agent_status_events USING brin (time);
CREATE INDEX task_events_time_brin ON task_events USING brin (time);
CREATE INDEX deployment_status_events_time_brin ON deployment_status_events USING brin (time);
CREATE INDEX dead_letters_time_brin ON dead_letters USING brin (time);
CREATE INDEX security_events_time_brin ON security_events USING brin (time);

-- Same columns as the continuous aggregate of the TimescaleDB variant, computed on read.
CREATE VIEW telemetry_1m AS
SELECT time_bucket(INTERVAL '1 minute', time) AS bucket,
       agent_id,
       avg(cpu_percent)    AS avg_cpu_percent,
       avg(memory_percent) AS avg_memory_percent,
       avg(disk_percent)   AS avg_disk_percent,
       sum(net_rx_bytes)::bigint AS net_rx_bytes,
       sum(net_tx_bytes)::bigint AS net_tx_bytes,
       count(*)            AS samples
FROM telemetry
GROUP BY 1, 2;
