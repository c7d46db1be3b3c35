-- 0010 events: the event stream (docs/events.md). Every recorded state change is also
-- one row here, written by the domain code in the same transaction as the change.

CREATE TABLE events (
    -- Insertion order; with `xid`, the stream position (the cursor "<xid>.<id>").
    id             bigint GENERATED ALWAYS AS IDENTITY,
    -- The writing transaction's id (pg_current_xact_id()), or for an agent's event the
    -- position of that agent's previous event when it is higher, so positions follow
    -- agent_seq. Readers only return rows with xid below the oldest transaction still
    -- running: nothing can commit behind a cursor later (service/domains/events.py).
    xid            xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id       uuid NOT NULL DEFAULT gen_random_uuid(),
    -- NULL for events about no single agent (a deployment's state, a message whose
    -- topic named no agent); agent_seq then is NULL too.
    agent_id       text,
    -- 1, 2, 3... per agent, without gaps (event_seqs).
    agent_seq      bigint,
    kind           text NOT NULL,
    ts             timestamptz NOT NULL DEFAULT clock_timestamp(),
    correlation_id text,
    data           jsonb NOT NULL DEFAULT '{}'
                   CONSTRAINT events_data_object CHECK (jsonb_typeof(data) = 'object'),
    CONSTRAINT events_seq_with_agent CHECK ((agent_id IS NULL) = (agent_seq IS NULL))
);
-- The readers' order. Not unique: a hypertable's unique keys must hold its time column.
CREATE INDEX events_position_idx ON events (xid, id);
CREATE INDEX events_agent_seq_idx ON events (agent_id, agent_seq) WHERE agent_id IS NOT NULL;

-- The last agent_seq given to each agent, and the position of its last event. Keyed
-- by text without a foreign key: events of unknown or deleted agents still number.
-- The row is locked until COMMIT by the transaction that numbers an event, so numbers
-- are given in commit order and a rolled-back number is given again.
CREATE TABLE event_seqs (
    agent_id text PRIMARY KEY,
    last_seq bigint NOT NULL,
    last_xid xid8 NOT NULL
);

-- Retention: events older than `days` are deleted by the bridge (docs/events.md);
-- `horizon_*` is the newest position deleted so far, so a reader whose cursor is
-- older learns that events after it are gone. One row; `eucora events retention DAYS`
-- sets days.
CREATE TABLE event_retention (
    only_row    boolean PRIMARY KEY DEFAULT true CONSTRAINT event_retention_one_row CHECK (only_row),
    days        integer NOT NULL DEFAULT 30
                CONSTRAINT event_retention_days_positive CHECK (days > 0),
    horizon_xid xid8 NOT NULL DEFAULT '0',
    horizon_id  bigint NOT NULL DEFAULT 0,
    pruned_at   timestamptz
);
INSERT INTO event_retention DEFAULT VALUES;
