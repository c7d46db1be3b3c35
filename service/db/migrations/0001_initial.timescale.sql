-- 0001 with TimescaleDB (>= 2.x; the runner has created the extension).
-- Hypertables work under the Apache license; compression, retention policies and
-- continuous aggregates need the TSL build and are skipped, with a WARNING, without it.
-- Uses the create_hypertable(table, column, ...) form, which every 2.x release accepts.

-- Telemetry: 1-day chunks (a day of a large fleet fits in memory; not so small that
-- planning gets slow). No default time index: the primary key (agent_id, time) serves
-- per-agent reads and chunk exclusion serves time ranges; every index slows COPY.
SELECT create_hypertable('telemetry', 'time',
                         chunk_time_interval => INTERVAL '1 day',
                         create_default_indexes => false);

-- Event tables: low volume, weekly chunks (monthly for security events), with the
-- default (time DESC) index that Grafana's time-range panels use.
SELECT create_hypertable('agent_status_events', 'time', chunk_time_interval => INTERVAL '7 days');
SELECT create_hypertable('task_events', 'time', chunk_time_interval => INTERVAL '7 days');
SELECT create_hypertable('deployment_status_events', 'time',
                         chunk_time_interval => INTERVAL '7 days');
SELECT create_hypertable('dead_letters', 'time', chunk_time_interval => INTERVAL '7 days');
SELECT create_hypertable('security_events', 'time', chunk_time_interval => INTERVAL '30 days');

DO $tsl$
BEGIN
    IF coalesce(current_setting('timescaledb.license', true), '') <> 'timescale' THEN
        RAISE WARNING 'TimescaleDB runs under the Apache license: compression, retention '
                      'and the telemetry_1m continuous aggregate are not available; '
                      'telemetry_1m is a plain view';
        EXECUTE $v$
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
            GROUP BY 1, 2
        $v$;
        RETURN;
    END IF;

    -- Compression after 7 days, so ON CONFLICT deduplication (buffered samples replayed
    -- after an absence) works on uncompressed chunks; several 2.x releases have bugs
    -- with ON CONFLICT into compressed chunks.
    EXECUTE $c$
        ALTER TABLE telemetry SET (timescaledb.compress,
                                   timescaledb.compress_segmentby = 'agent_id',
                                   timescaledb.compress_orderby = 'time DESC')
    $c$;
    PERFORM add_compression_policy('telemetry', INTERVAL '7 days');
    PERFORM add_retention_policy('telemetry', INTERVAL '90 days');
    PERFORM add_retention_policy('dead_letters', INTERVAL '30 days');

    -- WITH NO DATA: creating it WITH DATA cannot run inside a transaction.
    -- materialized_only = false: real-time aggregation, so dashboards do not lag
    -- behind the refresh policy (the default became true in 2.13).
    EXECUTE $a$
        CREATE MATERIALIZED VIEW telemetry_1m
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT time_bucket(INTERVAL '1 minute', time) AS bucket,
               agent_id,
               avg(cpu_percent)    AS avg_cpu_percent,
               avg(memory_percent) AS avg_memory_percent,
               avg(disk_percent)   AS avg_disk_percent,
               sum(net_rx_bytes)::bigint AS net_rx_bytes,
               sum(net_tx_bytes)::bigint AS net_tx_bytes,
               count(*)            AS samples
        FROM telemetry
        GROUP BY time_bucket(INTERVAL '1 minute', time), agent_id
        WITH NO DATA
    $a$;
    -- Refresh the last 7 days (samples buffered offline arrive late); older buckets are
    -- kept after telemetry retention drops the raw chunks, since the window ends
    -- far short of 90 days.
    PERFORM add_continuous_aggregate_policy('telemetry_1m',
        start_offset => INTERVAL '7 days',
        end_offset => INTERVAL '1 minute',
        schedule_interval => INTERVAL '1 minute');
END
$tsl$;
