-- 0007 identity: the brokers of a sharded fleet, and each agent's broker account in the
-- registry (docs/broker.md). The database is the source of truth for accounts; the
-- brokers read them from password files that `eucora agents provision/revoke` write.

CREATE TABLE brokers (
    broker_id integer PRIMARY KEY CONSTRAINT brokers_id_positive CHECK (broker_id > 0),
    -- The service listener the bridge and operators use: mqtt://host:port, no credentials.
    url       text NOT NULL UNIQUE,
    -- What agents are given (mqtts:// when the broker has TLS), no credentials.
    agent_url text NOT NULL UNIQUE,
    -- false: keeps its agents, gets no new ones.
    accepting boolean NOT NULL DEFAULT true,
    added_at  timestamptz NOT NULL DEFAULT now(),
    -- Agents with an account at home here, kept by provision/revoke/delete (choosing a
    -- home must not count 100,000 rows per command) and recounted by `stack up`.
    agents    integer NOT NULL DEFAULT 0
);

-- The agent's home broker; NULL for agents that predate shards or that connected
-- without being provisioned: they belong to broker 1 (the single broker).
ALTER TABLE agents ADD COLUMN IF NOT EXISTS broker_id integer REFERENCES brokers;
-- Mosquitto `$7$` hash of its password; NULL when it has no account (never
-- provisioned, or revoked).
ALTER TABLE agents ADD COLUMN IF NOT EXISTS password_hash text;
ALTER TABLE agents ADD COLUMN IF NOT EXISTS provisioned_at timestamptz;
ALTER TABLE agents ADD COLUMN IF NOT EXISTS revoked_at timestamptz;

-- Recounting brokers.agents, and the foreign key's lookups.
CREATE INDEX IF NOT EXISTS agents_broker_idx ON agents (broker_id);
