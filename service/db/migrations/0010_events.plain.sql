-- 0010 on plain PostgreSQL: time-range scans (retention, dashboards) by a BRIN index.
CREATE INDEX events_ts_brin ON events USING brin (ts);
