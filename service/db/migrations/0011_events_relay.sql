-- 0011 event relays: where the bridge's relay to NATS JetStream is in the event stream
-- (docs/events.md, "From NATS JetStream"). One row per target stream. Only the bridge
-- holding the relay's advisory lock writes it; the position moves only after
-- JetStream acknowledged every event up to it, so a relay that dies resends (JetStream
-- drops what it already has by message id) and never skips.
CREATE TABLE event_relays (
    -- The JetStream stream's name.
    name        text PRIMARY KEY,
    -- The position (an events cursor, "<xid>.<id>"): every event at or before it is
    -- stored in the stream.
    cursor_xid  xid8 NOT NULL DEFAULT '0',
    cursor_id   bigint NOT NULL DEFAULT 0,
    -- Events acknowledged by the stream, in total (resends included).
    relayed     bigint NOT NULL DEFAULT 0 CONSTRAINT event_relays_relayed_nonneg CHECK (relayed >= 0),
    -- The bridge (client id) relaying, and the servers it sends to (no password).
    holder      text,
    target      text,
    -- Why the last attempt failed (NATS away, ...); NULL while it works.
    error       text,
    started_at  timestamptz,
    -- The position's last move, and the holder's last sign of life (every few seconds
    -- while it relays or retries): `eucora status` calls forwarding on while it is fresh.
    moved_at    timestamptz,
    seen_at     timestamptz
);
