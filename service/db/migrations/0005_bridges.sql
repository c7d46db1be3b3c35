-- 0005 bridges: every running bridge says so here every few seconds, so `eucora status`
-- can tell whether one runs without knowing where (docs/architecture.md).
CREATE TABLE bridges (
    client_id  text PRIMARY KEY,
    hostname   text NOT NULL,
    pid        integer NOT NULL,
    version    text NOT NULL,
    started_at timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    -- connected to every broker and to the database at last_seen
    ready      boolean NOT NULL,
    brokers    jsonb NOT NULL DEFAULT '[]'
);
